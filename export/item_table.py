"""The item table of two-part serving: per-item arrays on disk, versioned, replaced atomically (numpy only).

The user encoder (encoder.onnx) turns a history into a user vector; everything per item lives here, outside
the graph, so items can be added or taken out of serving without a new export (`distillrec add-items` /
`remove-items`) and a running server picks the new version up with `Recommender.reload()`.

    onnx/items/
        CURRENT              "v000003\\n": the served version (replaced with os.replace: readers see old or new)
        .lock                writers hold an exclusive flock on it (one update at a time)
        v000003/
            meta.json        version, parent, model_id (the export the rows belong to), n_items, n_active,
                             trained_items, change, array shapes
            ids.json         raw item ids, one per row (row = internal id)
            vectors.npy      float32 [N, d]  item vectors (ID embedding + text projection): next_item score
                             of item i for user vector u is u @ vectors[i] + bias[i]
            bias.npy         float32 [N]
            active.npy       bool [N]        False: removed from serving (never recommended; a history that
                                             holds it still encodes it, so rows are never deleted)
            popularity.npy   int64 [N]       training interactions (0 for added items)
            rating.npy       float32 [N, h]  the rating tower's item features (models with a rating head)
            like.npy         float32 [N, h]  the like tower's item features (models with a like head)
            text.npy         float32 [N, T]  the standardised teacher text vectors (the text projection's
                                             input; models trained with text vectors)

Rows 0..trained_items-1 are the catalog the student was trained on, in its internal id order; added items
follow. A version folder is written whole under a temporary name and renamed, then CURRENT is replaced: a
failed update leaves the previous version served and intact. The last KEEP_VERSIONS versions are kept (a
reader that opened an older one with mmap keeps its pages: POSIX unlink semantics).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
META_FILE = "meta.json"
IDS_FILE = "ids.json"
KEEP_VERSIONS = 3
"""Versions kept on disk: the served one and two before it (rollback by rewriting CURRENT)."""
REQUIRED = {"vectors": np.float32, "bias": np.float32, "active": np.bool_, "popularity": np.int64}
OPTIONAL = {"rating": np.float32, "like": np.float32, "text": np.float32}
FEATURE_FIELDS = ("rating", "like")
"""Per-task tower features, named by task (export/contract.py SCORER_INPUTS)."""
_VERSION_RE = re.compile(r"^v(\d{6,})$")
_HINT = "re-export the run (`distillrec export <run>`) to rebuild the item table"


class ItemTableError(RuntimeError):
    """The item table on disk is missing, corrupt or inconsistent."""


class ItemUpdateError(ValueError):
    """An update (add / remove items) was refused: duplicate or unknown ids, wrong shapes, NaN, ...
    Nothing was written: the served version is unchanged."""


def version_name(version: int) -> str:
    return f"v{int(version):06d}"


def _parse_version(name: str) -> Optional[int]:
    m = _VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def current_version(items_dir: Union[str, Path]) -> int:
    """The served version number (reads the small CURRENT file: cheap enough to poll)."""
    path = Path(items_dir) / CURRENT_FILE
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        raise ItemTableError(f"{path} is missing: {Path(items_dir)} holds no item table; {_HINT}") from None
    v = _parse_version(name)
    if v is None:
        raise ItemTableError(f"{path} is corrupt (holds {name[:40]!r}, expected a version like v000001); {_HINT}")
    return v


def versions_on_disk(items_dir: Union[str, Path]) -> list[int]:
    d = Path(items_dir)
    if not d.is_dir():
        return []
    return sorted(v for v in (_parse_version(p.name) for p in d.iterdir() if p.is_dir()) if v is not None)


@dataclass
class ItemTable:
    """One loaded version. Arrays are read-only (memory-mapped by default: workers share the pages)."""

    folder: Path
    version: int
    ids: list[str]
    arrays: dict[str, np.ndarray]
    meta: dict
    _index: Optional[dict] = field(default=None, repr=False)

    @property
    def n_items(self) -> int:
        return len(self.ids)

    @property
    def vectors(self) -> np.ndarray:
        return self.arrays["vectors"]

    @property
    def bias(self) -> np.ndarray:
        return self.arrays["bias"]

    @property
    def active(self) -> np.ndarray:
        return self.arrays["active"]

    @property
    def popularity(self) -> np.ndarray:
        return self.arrays["popularity"]

    @property
    def n_active(self) -> int:
        return int(np.count_nonzero(self.active))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def index(self) -> dict[str, int]:
        """raw id -> row (internal id), built on first use."""
        if self._index is None:
            self._index = {x: i for i, x in enumerate(self.ids)}
        return self._index

    def features(self, task: str) -> Optional[np.ndarray]:
        return self.arrays.get(task)


def load_table(items_dir: Union[str, Path], version: Optional[int] = None, mmap: bool = True) -> ItemTable:
    """Load a version (default: CURRENT) and check that its files agree with each other."""
    items_dir = Path(items_dir)
    v = current_version(items_dir) if version is None else int(version)
    vdir = items_dir / version_name(v)
    if not vdir.is_dir():
        raise ItemTableError(f"{vdir} is missing (CURRENT names version {v}); {_HINT}")
    try:
        meta = json.loads((vdir / META_FILE).read_text())
        ids = json.loads((vdir / IDS_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ItemTableError(f"{vdir}: meta.json / ids.json unreadable ({e}); {_HINT}") from e
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
        raise ItemTableError(f"{vdir / IDS_FILE} must be a JSON list of strings; {_HINT}")
    arrays = {}
    for name in list(REQUIRED) + list(OPTIONAL):
        path = vdir / f"{name}.npy"
        if not path.exists():
            if name in REQUIRED:
                raise ItemTableError(f"{path} is missing; {_HINT}")
            continue
        try:
            # np.asarray drops the np.memmap subclass (its __getitem__ costs ~20 us per gather on the request
            # path) while keeping the same mapped, read-only memory
            arrays[name] = np.asarray(np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise ItemTableError(f"{path} is corrupt ({e}); {_HINT}") from e
    table = ItemTable(folder=items_dir, version=v, ids=ids, arrays=arrays, meta=meta)
    problems = check_arrays(ids, arrays)
    if problems:
        raise ItemTableError(f"{vdir} is inconsistent: {'; '.join(problems)}; {_HINT}")
    if meta.get("version") != v or meta.get("n_items") != len(ids):
        raise ItemTableError(f"{vdir / META_FILE} disagrees with the folder (version {meta.get('version')} vs {v}, "
                             f"n_items {meta.get('n_items')} vs {len(ids)} ids); {_HINT}")
    return table


def check_arrays(ids: Sequence[str], arrays: dict) -> list[str]:
    """Problems with a set of table arrays (empty list: consistent)."""
    n, out = len(ids), []
    if len(set(ids)) != n:
        out.append("ids contain duplicates")
    for name, dtype in {**REQUIRED, **OPTIONAL}.items():
        a = arrays.get(name)
        if a is None:
            if name in REQUIRED:
                out.append(f"{name} is missing")
            continue
        if a.dtype != dtype:
            out.append(f"{name} has dtype {a.dtype}, expected {np.dtype(dtype).name}")
        if a.shape[:1] != (n,):
            out.append(f"{name} has {a.shape[0] if a.ndim else 0} rows for {n} ids")
        want_ndim = 1 if name in ("bias", "active", "popularity") else 2
        if a.ndim != want_ndim:
            out.append(f"{name} must be {want_ndim}-D, got shape {a.shape}")
    return out


# ------------------------------------------------------------------------------------------------ writing
@contextlib.contextmanager
def _locked(items_dir: Path):
    """An exclusive lock on items/.lock: concurrent add/remove commands run one after the other."""
    import fcntl
    items_dir.mkdir(parents=True, exist_ok=True)
    with open(items_dir / LOCK_FILE, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)


def _write_version(items_dir: Path, version: int, ids: list[str], arrays: dict, meta: dict) -> Path:
    """Write a whole version folder under a temporary name, then rename it into place."""
    final = items_dir / version_name(version)
    if final.exists():
        raise ItemTableError(f"{final} already exists; refusing to overwrite a published version")
    tmp = items_dir / f".tmp-{version_name(version)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, a in arrays.items():
            _write_file(tmp / f"{name}.npy", lambda f, a=a: np.save(f, np.ascontiguousarray(a), allow_pickle=False))
        _write_file(tmp / IDS_FILE, lambda f: f.write(json.dumps(ids).encode()))
        _write_file(tmp / META_FILE, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _publish(items_dir: Path, version: int) -> None:
    """Point CURRENT at `version` atomically (write + fsync a temp file, os.replace, fsync the folder)."""
    tmp = items_dir / f".{CURRENT_FILE}.{os.getpid()}.tmp"
    _write_file(tmp, lambda f: f.write((version_name(version) + "\n").encode()))
    os.replace(tmp, items_dir / CURRENT_FILE)
    _fsync_dir(items_dir)


def publish_version(items_dir: Union[str, Path], version: int) -> None:
    """Serve an existing version again (a rollback): CURRENT is replaced atomically, under the writers' lock."""
    items_dir = Path(items_dir)
    with _locked(items_dir):
        if not (items_dir / version_name(version)).is_dir():
            raise ItemTableError(f"{items_dir / version_name(version)} does not exist (on disk: "
                                 f"{versions_on_disk(items_dir)})")
        _publish(items_dir, version)


def _prune(items_dir: Path, keep: int) -> None:
    cur = current_version(items_dir)
    old = [v for v in versions_on_disk(items_dir) if v != cur]
    for v in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(items_dir / version_name(v), ignore_errors=True)


def _normalise(ids: Sequence, arrays: dict) -> tuple[list[str], dict]:
    ids = [str(x) for x in ids]
    out = {}
    for name, a in arrays.items():
        if a is None:
            continue
        dtype = {**REQUIRED, **OPTIONAL}.get(name)
        if dtype is None:
            raise ItemUpdateError(f"unknown item table array {name!r}; known: {sorted({**REQUIRED, **OPTIONAL})}")
        a = np.asarray(a)
        if dtype is np.float32 and not np.all(np.isfinite(a)):
            raise ItemUpdateError(f"{name} holds NaN/inf values")
        out[name] = a.astype(dtype, copy=False)
    return ids, out


def _meta(version: int, parent: Optional[int], ids: list[str], arrays: dict, trained_items: int, change: dict,
          model_id: Optional[str] = None) -> dict:
    return {"version": version, "parent": parent, "model_id": model_id, "n_items": len(ids),
            "n_active": int(np.count_nonzero(arrays["active"])), "trained_items": int(trained_items),
            "dim": int(arrays["vectors"].shape[1]),
            "arrays": {k: {"dtype": str(a.dtype), "shape": list(a.shape)} for k, a in arrays.items()},
            "change": change, "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def write_table(items_dir: Union[str, Path], ids: Sequence, arrays: dict, change: Optional[dict] = None,
                trained_items: Optional[int] = None, keep: int = KEEP_VERSIONS, model_id: Optional[str] = None) -> int:
    """Publish a whole table as a new version (max version on disk + 1, so a running server always sees a
    change) and return its number. `arrays` needs vectors and bias; active defaults to all True and popularity
    to 0. Used by the export (the trained catalog) and by the updates below."""
    items_dir = Path(items_dir)
    ids, arrays = _normalise(ids, arrays)
    n = len(ids)
    arrays.setdefault("active", np.ones(n, dtype=bool))
    arrays.setdefault("popularity", np.zeros(n, dtype=np.int64))
    problems = check_arrays(ids, arrays)
    if problems:
        raise ItemUpdateError("the item table to write is inconsistent: " + "; ".join(problems))
    with _locked(items_dir):
        on_disk = versions_on_disk(items_dir)
        parent = None
        with contextlib.suppress(ItemTableError):
            parent = current_version(items_dir)
        version = max(on_disk + [parent or 0]) + 1
        meta = _meta(version, parent, ids, arrays, n if trained_items is None else trained_items,
                     change or {"kind": "write"}, model_id)
        _write_version(items_dir, version, ids, arrays, meta)
        _publish(items_dir, version)
        _prune(items_dir, keep)
    return version


def _update(items_dir: Path, edit, keep: int) -> tuple[int, dict]:
    """Load CURRENT under the lock, let `edit(table) -> (ids, arrays, change)` build the next one, publish it."""
    with _locked(items_dir):
        table = load_table(items_dir, mmap=False)
        ids, arrays, change = edit(table)
        problems = check_arrays(ids, arrays)
        if problems:
            raise ItemUpdateError("the updated item table is inconsistent: " + "; ".join(problems))
        version = max(versions_on_disk(items_dir) + [table.version]) + 1
        meta = _meta(version, table.version, ids, arrays, table.meta.get("trained_items", table.n_items), change,
                     table.meta.get("model_id"))  # an update serves the same model as its parent
        _write_version(items_dir, version, ids, arrays, meta)
        _publish(items_dir, version)
        _prune(items_dir, keep)
    return version, change


def append_items(items_dir: Union[str, Path], ids: Sequence, arrays: dict, keep: int = KEEP_VERSIONS) -> tuple[int, dict]:
    """Append new items (rows after the current ones) as a new version; returns (version, change record).

    `arrays` must hold every array the current table has except active / popularity (new items are active,
    popularity 0 unless given): vectors, bias and, when the table has them, rating / like / text. Duplicate ids
    (within the new ones or against the table, removed items included) are refused before anything is written."""
    items_dir = Path(items_dir)
    new_ids, new = _normalise(ids, arrays)
    if not new_ids:
        raise ItemUpdateError("no items to add")
    dup = sorted({x for x in new_ids if new_ids.count(x) > 1}) if len(set(new_ids)) != len(new_ids) else []
    if dup:
        raise ItemUpdateError(f"{len(dup)} id(s) appear more than once among the new items: {dup[:20]}")
    m = len(new_ids)
    new.setdefault("active", np.ones(m, dtype=bool))
    new.setdefault("popularity", np.zeros(m, dtype=np.int64))

    def edit(table: ItemTable):
        clash = [x for x in new_ids if x in table.index]
        if clash:
            inactive = [x for x in clash if not table.active[table.index[x]]]
            raise ItemUpdateError(f"{len(clash)} id(s) are already in the catalog: {clash[:20]}"
                                  + (f" ({len(inactive)} of them removed from serving; ids are never reused)"
                                     if inactive else ""))
        have, got = set(table.arrays), set(new)
        if have != got:
            raise ItemUpdateError(f"the new items carry arrays {sorted(got)}, the table has {sorted(have)}")
        for name, a in new.items():
            old = table.arrays[name]
            if a.shape[0] != m or a.shape[1:] != old.shape[1:]:
                raise ItemUpdateError(f"{name} of the new items has shape {a.shape}, expected ({m}, "
                                      f"{', '.join(map(str, old.shape[1:]))})")
        arrays_out = {k: np.concatenate([table.arrays[k], new[k]]) for k in table.arrays}
        change = {"kind": "add", "count": m, "first_row": table.n_items, "ids": new_ids[:50]}
        return table.ids + new_ids, arrays_out, change

    return _update(items_dir, edit, keep)


def set_active(items_dir: Union[str, Path], ids: Sequence, active: bool, keep: int = KEEP_VERSIONS) -> tuple[int, dict]:
    """Take items out of serving (active=False) or back in (True) as a new version. Unknown ids are refused;
    items already in the requested state are listed in the change record ("unchanged"), not an error."""
    items_dir = Path(items_dir)
    wanted = [str(x) for x in ids]
    if not wanted:
        raise ItemUpdateError("no item ids given")

    def edit(table: ItemTable):
        unknown = [x for x in wanted if x not in table.index]
        if unknown:
            raise ItemUpdateError(f"{len(unknown)} unknown item id(s): {unknown[:20]}; the catalog has "
                                  f"{table.n_items} items")
        rows = np.array([table.index[x] for x in wanted], dtype=np.int64)
        flags = np.array(table.active, copy=True)
        unchanged = [x for x, r in zip(wanted, rows) if bool(flags[r]) == active]
        flags[rows] = active
        arrays_out = {k: np.array(a, copy=True) for k, a in table.arrays.items()}
        arrays_out["active"] = flags
        change = {"kind": "activate" if active else "remove", "count": len(wanted) - len(unchanged),
                  "ids": wanted[:50], "unchanged": unchanged[:50]}
        return list(table.ids), arrays_out, change

    return _update(items_dir, edit, keep)
