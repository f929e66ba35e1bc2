"""Triton Python-backend model of two-part serving: `model.py` of the `<prefix>_recommend` model.

export/triton.py copies THIS file, byte for byte, into `<repository>/<prefix>_recommend/<version>/model.py`.
Inside Triton it runs stand-alone: stdlib + numpy only (both are in every tritonserver image); it imports
nothing from distillrec, so the stock image serves it. Outside Triton (tests, tools) it imports as
`export.triton_model`, and its numpy core, `RecommendCore`, runs without `triton_python_backend_utils`.

Version folder layout (written by export/triton.py; one Triton model version = one item table version):

    <prefix>_recommend/<v>/model.py        this file
    <prefix>_recommend/<v>/runtime.json    the run's runtime.json (max_history, tasks, "two_part", top_k, ...)
    <prefix>_recommend/<v>/items/          the item table version v (export/item_table.py's files, no CURRENT):
                                           ids.json, meta.json, vectors / bias / active / popularity (+ rating /
                                           like) .npy, memory-mapped: the instances of the model share the pages

What one request does (TritonPythonModel.execute, every request of the dynamic batch at once):
  raw ids -> rows of the table -> gather the history's item vectors (left-padded to max_history so that
  requests from every instance share one shape and the encoder's dynamic batcher can merge them) -> BLS call
  to `<prefix>_encoder` -> user_vector @ vectors.T + bias -> exact top-k over the active items minus seen
  items and the deny list (or over the allow list only) -> raw ids + scores. With `candidates`, the rating /
  like path: the candidates' tower features + the encoder's tower user features -> BLS call to
  `<prefix>_scorer` -> rating / like_logit.

The top-k is exact and is the answer of export/retrieval.py's ExactRetriever (top_k_indices is vendored
here verbatim in behaviour: ties by the lower row, NaN last, banned rows removed, never pushed down). There is
no ANN index in Triton: exact scoring costs ~0.9 ms per query at 10^5 items on one core; for much larger
catalogs serve distillrec's HTTP service (faiss IVF) or put an ANN service behind the encoder.

Request tensors (batch axis first; "" is padding anywhere in a string tensor and is dropped):
    history_items   BYTES [B, L]  raw item ids, oldest first
    history_ratings FP32  [B, L]  optional; 1..5, 0 = unknown (aligned with history_items)
    k               INT32 [B, 1]  optional; default runtime.json top_k
    exclude_seen    BOOL  [B, 1]  optional; default true
    exclude         BYTES [B, X]  optional deny list (ids outside the catalog are ignored)
    allow           BYTES [B, Y]  optional allow list; a row with no non-empty entry has NO allow list
    candidates      BYTES [B, C]  optional; rating / like for these ids (unknown ids are an error)
Responses:
    item_ids        BYTES [B, K]  best first; K = the request's largest k; "" pads rows with fewer results
    scores          FP32  [B, K]  user_vector @ vector + bias (popularity for empty histories); 0 pads
    rating, like_logit  FP32 [B, C]  models with those heads, when candidates were sent; 0 at "" columns
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

try:  # present only inside Triton's Python backend
    import triton_python_backend_utils as pb_utils
except ImportError:  # tests and tools use RecommendCore alone
    pb_utils = None

INPUTS = ("history_items", "history_ratings", "k", "exclude_seen", "exclude", "allow", "candidates")
"""Request tensor names, in config order (history_items is required, the rest optional)."""
TOPK_OUTPUTS = ("item_ids", "scores")
SCORE_OUTPUTS = {"rating": ("rating_user", "rating_items"), "like": ("like_user", "like_items")}
"""task -> (encoder output = scorer user input, scorer item input); the scorer returns SCORE_NAMES[task]."""
SCORE_NAMES = {"rating": "rating", "like": "like_logit"}
ENCODER_INPUTS = ("history_vectors", "history_ratings", "history_length")
USER_VECTOR = "user_vector"
ITEMS_DIR = "items"
META_FILE = "runtime.json"
PAD = ""
"""Padding entry of string tensors (item ids are never empty)."""
TABLE_ARRAYS = {"vectors": np.float32, "bias": np.float32, "active": np.bool_, "popularity": np.int64}
FEATURE_ARRAYS = ("rating", "like")
PARAMETERS = ("encoder_model", "scorer_model", "encoder_max_batch_size", "scorer_max_batch_size", "unknown_items",
              "empty_history", "pad_to")
"""config.pbtxt `parameters` keys this model reads (string values)."""


class RequestError(ValueError):
    """The request cannot be answered as sent (unknown ids, bad ratings, k, shapes): the caller's fault.
    Triton answers it as an error response of that request only; the other requests of the batch go on."""


class ModelFolderError(RuntimeError):
    """The version folder (runtime.json, items/) is missing or inconsistent: re-run `distillrec triton <run>`."""


# ------------------------------------------------------------------------------------------------ top-k
def top_k_indices(scores: np.ndarray, k: int, banned=None) -> np.ndarray:
    """Indices of the k highest scores outside `banned`, highest first, ties by the lower index, NaN last.

    Same answer as export.retrieval.top_k_indices (tests check it): argpartition for the k-th value, then
    only the k selected are sorted."""
    s = np.asarray(scores, dtype=np.float64)
    if banned is not None and len(banned):
        keep = np.ones(s.shape[0], dtype=bool)
        keep[np.asarray(list(banned) if isinstance(banned, (set, frozenset)) else banned, dtype=np.int64)] = False
        idx = np.flatnonzero(keep)
        vals = s[idx]
    else:
        idx, vals = np.arange(s.shape[0]), s
    if np.isnan(vals).any():
        vals = np.where(np.isnan(vals), -np.inf, vals)
    n, k = vals.shape[0], int(k)
    if k <= 0 or n == 0:
        return np.empty(0, dtype=np.int64)
    if k < n:
        t = vals[np.argpartition(-vals, k - 1)[k - 1]]
        above = np.flatnonzero(vals > t)
        sel = np.concatenate([above, np.flatnonzero(vals == t)[:k - above.size]])
    else:
        sel = np.arange(n)
    return idx[sel[np.lexsort((sel, -vals[sel]))]]


# ------------------------------------------------------------------------------------------------ table
@dataclass(frozen=True)
class Table:
    """One item table version: ids + read-only arrays (memory-mapped)."""

    ids: list
    index: dict
    arrays: dict
    version: int

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


def load_items(folder, mmap: bool = True) -> Table:
    """Read items/ (ids.json, meta.json, *.npy) and check the arrays agree; ModelFolderError otherwise."""
    folder = Path(folder)
    fix = "re-run `distillrec triton <run>` to rewrite the repository"
    try:
        ids = json.loads((folder / "ids.json").read_text())
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{folder}: ids.json / meta.json unreadable ({e}); {fix}") from e
    if not isinstance(ids, list) or not all(isinstance(x, str) and x != PAD for x in ids):
        raise ModelFolderError(f"{folder / 'ids.json'} must be a list of non-empty strings; {fix}")
    arrays = {}
    for name in list(TABLE_ARRAYS) + list(FEATURE_ARRAYS):
        path = folder / f"{name}.npy"
        if not path.is_file():
            if name in TABLE_ARRAYS:
                raise ModelFolderError(f"{path} is missing; {fix}")
            continue
        arrays[name] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    n = len(ids)
    for name, a in arrays.items():
        want = TABLE_ARRAYS.get(name, np.float32)
        if a.shape[:1] != (n,) or a.dtype != want:
            raise ModelFolderError(f"{folder}: {name}.npy is {a.dtype} {a.shape}, expected {np.dtype(want).name} "
                                   f"with {n} rows (one per id); {fix}")
    return Table(ids=ids, index={x: i for i, x in enumerate(ids)}, arrays=arrays, version=int(meta.get("version", 0)))


# ------------------------------------------------------------------------------------------------ core
@dataclass
class Row:
    """One validated history: truncated rows + ratings, what may not be returned, what may, candidates."""

    items: list
    rates: np.ndarray
    banned: np.ndarray
    allow: Optional[np.ndarray] = None
    candidates: Optional[np.ndarray] = None
    k: int = 10


def _text(x) -> str:
    """A raw id from a request value (bytes from Triton, str, or int) as the table's string key."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, str):
        return x
    if isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_)):
        return str(int(x))
    raise RequestError(f"item ids must be strings (or ints), got {type(x).__name__} {x!r}")


class RecommendCore:
    """The numpy half of the Python model: the item table of one version + the two-part arithmetic.

    folder: the version folder (runtime.json + items/). encode: feed -> outputs of encoder.onnx (feed:
    history_vectors float32 [R, L, d], history_ratings float32 [R, L], history_length int64 [R]; outputs
    user_vector [R, d] + rating_user / like_user [R, h]); inside Triton a BLS call, in tests onnxruntime.
    score: the same for scorer.onnx (None: no rating / like path). unknown_items: "error" | "drop" (history
    ids only, as Recommender). empty_history: "error" | "popularity". pad_to: "max_history" (every encoder
    call has L = max_history: Triton's dynamic batcher merges equal shapes only) or "longest" (the batch's
    longest history, as Recommender does; the scores differ in the last float bits only).
    """

    def __init__(self, folder, encode: Callable[[dict], dict], score: Optional[Callable[[dict], dict]] = None, *,
                 unknown_items: str = "error", empty_history: str = "error", pad_to: str = "max_history",
                 max_score_bytes: int = 256 << 20):
        for name, val, ok in (("unknown_items", unknown_items, ("error", "drop")),
                              ("empty_history", empty_history, ("error", "popularity")),
                              ("pad_to", pad_to, ("max_history", "longest"))):
            if val not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {val!r}")
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / META_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ModelFolderError(f"{self.folder / META_FILE} unreadable ({e}); re-run `distillrec triton <run>`") \
                from e
        tp = self.meta.get("two_part")
        if not isinstance(tp, dict):
            raise ModelFolderError(f"{self.folder / META_FILE} has no two_part block: the run was exported without "
                                   f"two-part serving; re-export it (`distillrec export <run>`)")
        self.two_part = tp
        self.table = load_items(self.folder / ITEMS_DIR)
        if self.table.vectors.shape[1] != int(tp["dim"]):
            raise ModelFolderError(f"items/ holds {self.table.vectors.shape[1]}-d vectors, the encoder reads "
                                   f"{tp['dim']}-d ones; re-run `distillrec triton <run>`")
        self.encode, self.score = encode, score
        self.score_tasks = [t for t, name in SCORE_NAMES.items() if name in (tp.get("scorer_outputs") or [])]
        missing = [t for t in self.score_tasks if t not in self.table.arrays]
        if missing:
            raise ModelFolderError(f"items/ lacks the {missing} tower features the scorer needs; re-run "
                                   f"`distillrec triton <run>`")
        self.max_history = int(self.meta["max_history"])
        self.top_k = int(self.meta.get("top_k", 10))
        self.rating_range = tuple(self.meta.get("rating_range", [1, 5]))
        self.uses_ratings = bool(self.meta.get("uses_ratings", any(t in ("rating", "like")
                                                                    for t in self.meta.get("tasks", []))))
        self.unknown_items, self.empty_history, self.pad_to = unknown_items, empty_history, pad_to
        self.active_ids = np.flatnonzero(self.table.active)
        self.all_active = self.active_ids.size == len(self.table.ids)
        self.max_score_bytes = int(max_score_bytes)

    # -------------------------------------------------------------------------------------- requests
    def _ratings(self, ratings, n: int, what: str) -> np.ndarray:
        if ratings is None:
            return np.zeros(n, dtype=np.float32)
        r = np.asarray(ratings, dtype=np.float64).reshape(-1)
        if r.shape[0] != n:
            raise RequestError(f"{what}: {r.shape[0]} ratings for {n} history items; send one rating per item")
        if not np.all(np.isfinite(r)):
            raise RequestError(f"{what} ratings contain NaN/inf")
        lo, hi = self.rating_range
        bad = (r != 0) & ((r < lo) | (r > hi))
        if bad.any():
            raise RequestError(f"{what} ratings must lie in [{lo}, {hi}] (0 = unknown); got {r[bad].tolist()[:10]}")
        if not self.uses_ratings and np.any(r != 0):
            raise RequestError(f"{what}: this model does not use ratings (trained without them); send 0 or none")
        return r.astype(np.float32)

    def _rows_of(self, ids, what: str, drop: bool) -> tuple[list, list]:
        """Raw ids -> (table rows, kept positions); unknown ids raise unless `drop`."""
        rows, kept, unknown = [], [], []
        for pos, key in enumerate(ids):
            i = self.table.index.get(key)
            if i is None:
                unknown.append(key)
            else:
                rows.append(i)
                kept.append(pos)
        if unknown and not drop:
            shown = ", ".join(repr(u) for u in unknown[:20])
            raise RequestError(f"{len(unknown)} unknown item id(s) in {what}: {shown}; the catalog has "
                               f"{len(self.table.ids)} items")
        return rows, kept

    def _id_set(self, ids) -> Optional[np.ndarray]:
        """Optional id list -> sorted unique rows (ids outside the catalog ignored, as Recommender)."""
        if ids is None:
            return None
        rows = [self.table.index[k] for k in (_text(x) for x in ids) if k != PAD and k in self.table.index]
        return np.unique(np.asarray(rows, dtype=np.int64))

    def row(self, history, ratings=None, k=None, exclude_seen: bool = True, exclude=None, allow=None,
            candidates=None, what: str = "history") -> Row:
        """Validate one request row (raw ids; "" entries are padding and dropped with their ratings)."""
        keys = [_text(x) for x in history]
        r = None if ratings is None else np.asarray(ratings, dtype=np.float64).reshape(-1)
        if r is not None and r.shape[0] != len(keys):
            raise RequestError(f"{what}: history_ratings has {r.shape[0]} entries for {len(keys)} history entries")
        keep = [p for p, key in enumerate(keys) if key != PAD]
        keys = [keys[p] for p in keep]
        rates = self._ratings(None if r is None else r[keep], len(keys), what)
        rows, kept = self._rows_of(keys, what, drop=self.unknown_items == "drop")
        rates = rates[kept]
        k = self.top_k if k is None else k
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (numbers.Integral, np.integer)) or int(k) <= 0:
            raise RequestError(f"{what}: k must be a positive int, got {k!r}")
        k = min(int(k), len(self.table.ids))  # never more than the catalog: a huge k must not size the output
        banned = set(rows) if exclude_seen else set()
        deny = self._id_set(exclude)
        if deny is not None:
            banned |= set(deny.tolist())
        cand = None
        if candidates is not None:
            ckeys = [_text(x) for x in candidates]
            cand_rows, _ = self._rows_of([c for c in ckeys if c != PAD], f"{what} candidates", drop=False)
            cand = np.full(len(ckeys), -1, dtype=np.int64)
            cand[[p for p, c in enumerate(ckeys) if c != PAD]] = cand_rows
        return Row(items=rows[-self.max_history:], rates=rates[-self.max_history:],
                   banned=np.array(sorted(banned), dtype=np.int64), allow=self._id_set(allow), candidates=cand,
                   k=int(k))

    # -------------------------------------------------------------------------------------- model calls
    def _pad(self, rows: list) -> dict:
        """Encoder feed for rows with a history: LEFT-padded item vectors (row 0 / rating 0), real lengths."""
        L = self.max_history if self.pad_to == "max_history" else max(1, max(len(r.items) for r in rows))
        items = np.zeros((len(rows), L), dtype=np.int64)
        rates = np.zeros((len(rows), L), dtype=np.float32)
        length = np.zeros(len(rows), dtype=np.int64)
        for j, r in enumerate(rows):
            n = len(r.items)
            length[j] = n
            items[j, L - n:] = r.items
            rates[j, L - n:] = r.rates
        return {"history_vectors": np.ascontiguousarray(self.table.vectors[items], dtype=np.float32),
                "history_ratings": rates, "history_length": length}

    def encode_rows(self, rows: list) -> dict:
        """encoder outputs for the rows (all with a non-empty history), one call."""
        out = self.encode(self._pad(rows))
        if USER_VECTOR not in out:
            raise ModelFolderError(f"the encoder returned {sorted(out)}, without {USER_VECTOR}")
        return {name: np.asarray(a) for name, a in out.items()}

    def _eligible(self, banned: np.ndarray) -> Optional[np.ndarray]:
        if not banned.size:
            return None if self.all_active else self.active_ids
        keep = np.array(self.table.active, copy=True)
        keep[banned] = False
        return np.flatnonzero(keep)

    def _top_k_users(self, user: np.ndarray, rows: list) -> list:
        """Exact top-k per row (ExactRetriever.search's arithmetic: batch matmul + bias, then per-row top-k)."""
        t = self.table
        out: list = [None] * len(rows)
        plain = []
        for j, r in enumerate(rows):
            if r.allow is None:
                plain.append(j)
                continue
            ids = r.allow[np.asarray(t.active)[r.allow]]
            if r.banned.size:
                ids = ids[~np.isin(ids, r.banned, assume_unique=True)]
            s = t.vectors[ids] @ user[j] + t.bias[ids]
            sel = top_k_indices(s, r.k)
            out[j] = (ids[sel], s[sel].astype(np.float32))
        step = max(1, self.max_score_bytes // (4 * len(t.ids)))
        for start in range(0, len(plain), step):
            chunk = plain[start:start + step]
            scores = np.ascontiguousarray(user[chunk], dtype=np.float32) @ t.vectors.T
            scores += t.bias
            for c, j in enumerate(chunk):
                ids = self._eligible(rows[j].banned)
                sel = top_k_indices(scores[c], rows[j].k) if ids is None else ids[top_k_indices(scores[c][ids],
                                                                                                rows[j].k)]
                out[j] = (sel.astype(np.int64), scores[c][sel].astype(np.float32))
        return out

    def _popular(self, r: Row) -> tuple:
        """Empty history with empty_history='popularity': the most popular eligible items (Recommender's rule)."""
        t = self.table
        pop = np.asarray(t.popularity, dtype=np.float64)
        banned = set(r.banned.tolist())
        if not self.all_active:
            banned |= set(np.flatnonzero(~np.asarray(t.active)).tolist())
        if r.allow is not None:
            cand = np.array(sorted(set(r.allow.tolist()) - banned), dtype=np.int64)
            sel = cand[top_k_indices(pop[cand], r.k)] if cand.size else cand
        else:
            sel = top_k_indices(pop, r.k, banned)
        return sel, pop[sel].astype(np.float32)

    def recommend_rows(self, rows: list, enc: Optional[dict] = None) -> list:
        """(rows int64 [<=k], scores float32 [<=k]) per row; `enc`: encoder outputs of the non-empty rows."""
        live = [j for j, r in enumerate(rows) if r.items]
        empty = [j for j, r in enumerate(rows) if not r.items]
        if empty and self.empty_history != "popularity":
            raise RequestError(f"empty history at row(s) {empty[:20]} (after dropping padding / unknown ids); send "
                               f"at least one known item, or set the model parameter empty_history=popularity")
        out: list = [None] * len(rows)
        if live:
            enc = self.encode_rows([rows[j] for j in live]) if enc is None else enc
            for j, res in zip(live, self._top_k_users(enc[USER_VECTOR], [rows[j] for j in live])):
                out[j] = res
        for j in empty:
            out[j] = self._popular(rows[j])
        return out

    def score_rows(self, rows: list, enc: Optional[dict] = None) -> dict:
        """{rating / like_logit: float32 [R, C]} for rows with candidates (-1 = padding, scored as row 0 and
        zeroed). Every row needs a history (the scorer reads the user's tower features)."""
        if self.score is None or not self.score_tasks:
            raise RequestError("this model has no rating/like head (or no scorer): send no candidates")
        if any(r.candidates is None for r in rows):
            raise RequestError("every row needs candidates for the rating / like path")
        empty = [j for j, r in enumerate(rows) if not r.items]
        if empty:
            raise RequestError(f"empty history at row(s) {empty[:20]}: rating / like need a history")
        enc = self.encode_rows(rows) if enc is None else enc
        width = max(1, max(r.candidates.size for r in rows))
        cand = np.zeros((len(rows), width), dtype=np.int64)
        pad = np.ones((len(rows), width), dtype=bool)
        for j, r in enumerate(rows):
            cand[j, :r.candidates.size] = np.maximum(r.candidates, 0)
            pad[j, :r.candidates.size] = r.candidates < 0
        feed = {}
        for task in self.score_tasks:
            user, items = SCORE_OUTPUTS[task]
            feed[user] = np.asarray(enc[user], dtype=np.float32)
            feed[items] = np.ascontiguousarray(self.table.arrays[task][cand], dtype=np.float32)
        got = self.score(feed)
        out = {}
        for task in self.score_tasks:
            a = np.array(got[SCORE_NAMES[task]], dtype=np.float32)
            a[pad] = 0.0
            out[SCORE_NAMES[task]] = a
        return out

    # -------------------------------------------------------------------------------------- Recommender-like API
    def recommend_batch(self, histories, ratings=None, k=None, exclude_seen: bool = True, exclude=None,
                        allow=None) -> list:
        """[(raw id, score), ...] per history: Recommender.recommend_batch's contract (exact retrieval)."""
        n = len(histories)
        rows = [self.row(h, None if ratings is None else ratings[j], k, exclude_seen,
                         None if exclude is None else exclude[j], None if allow is None else allow[j],
                         what=f"history[{j}]") for j, h in enumerate(histories)]
        res = self.recommend_rows(rows)
        return [[(self.table.ids[i], float(s)) for i, s in zip(ids.tolist(), sc.tolist())] for ids, sc in res][:n]

    def score_batch(self, histories, candidates, ratings=None) -> list:
        """{rating, like_logit: float32 [C]} per history (Recommender.score_batch's numbers)."""
        rows = [self.row(h, None if ratings is None else ratings[j], candidates=candidates[j], what=f"history[{j}]")
                for j, h in enumerate(histories)]
        out = self.score_rows(rows)
        return [{name: a[j, :len(candidates[j])] for name, a in out.items()} for j in range(len(rows))]

    # -------------------------------------------------------------------------------------- Triton-shaped arrays
    def request_rows(self, tensors: dict) -> list:
        """Rows of one Triton request from its input arrays ({name: numpy array [B, ...]}, absent = missing)."""
        hist = tensors.get("history_items")
        if hist is None:
            raise RequestError("history_items is required")
        hist = np.asarray(hist)
        if hist.ndim != 2:
            raise RequestError(f"history_items must be [batch, length], got shape {hist.shape}")
        b = hist.shape[0]

        def per_row(name, shape_like=None):
            a = tensors.get(name)
            if a is None:
                return [None] * b
            a = np.asarray(a)
            if a.ndim != 2 or a.shape[0] != b or (shape_like is not None and a.shape != shape_like):
                want = f"{list(shape_like)}" if shape_like is not None else f"[{b}, n]"
                raise RequestError(f"{name} must have shape {want}, got {list(a.shape)}")
            return list(a)

        ratings, excl, allow, cands = (per_row("history_ratings", hist.shape), per_row("exclude"), per_row("allow"),
                                       per_row("candidates"))
        ks, seen = per_row("k"), per_row("exclude_seen")
        rows = []
        for j in range(b):
            a = allow[j]
            if a is not None and all(_text(x) == PAD for x in a):
                a = None  # no non-empty entry: this row has no allow list
            k = None if ks[j] is None else int(np.asarray(ks[j]).reshape(-1)[0])
            ex_seen = True if seen[j] is None else bool(np.asarray(seen[j]).reshape(-1)[0])
            rows.append(self.row(hist[j], ratings[j], k, ex_seen, excl[j], a, cands[j], what=f"row {j}"))
        return rows

    def answer(self, requests: list, wanted: list) -> list:
        """Outputs of several requests (lists of rows) with ONE encoder call over all their rows.

        wanted[i]: the output names request i asked for. Returns per request {output name: array}, or the
        RequestError that request alone raised (an empty history, candidates without a scorer, ...)."""
        live = [r for req in requests for r in req if r.items]
        enc = self.encode_rows(live) if live else {}
        pos = {id(r): j for j, r in enumerate(live)}
        out: list = []
        for req, want in zip(requests, wanted):
            take = [pos[id(r)] for r in req if r.items]
            sub = {name: a[take] for name, a in enc.items()}
            try:
                res = {}
                if any(n in want for n in TOPK_OUTPUTS):
                    res.update(self._topk_arrays(req, sub))
                if any(n in want for n in SCORE_NAMES.values()):
                    res.update(self.score_rows(req, sub))
                out.append({n: a for n, a in res.items() if n in want})
            except RequestError as e:
                out.append(e)
        return out

    def _topk_arrays(self, rows: list, enc: dict) -> dict:
        found = self.recommend_rows(rows, enc if enc else None)
        width = max(r.k for r in rows)
        ids = np.full((len(rows), width), PAD.encode(), dtype=object)
        scores = np.zeros((len(rows), width), dtype=np.float32)
        for j, (rr, sc) in enumerate(found):
            ids[j, :rr.size] = [self.table.ids[i].encode("utf-8") for i in rr.tolist()]
            scores[j, :rr.size] = sc
        return {"item_ids": ids, "scores": scores}


# ------------------------------------------------------------------------------------------------ Triton
class TritonPythonModel:
    """Triton's entry point: loads the version folder this file sits in, answers requests with BLS calls."""

    def initialize(self, args):
        if pb_utils is None:
            raise RuntimeError("triton_python_backend_utils is missing: this class runs inside Triton's Python "
                               "backend only; use RecommendCore elsewhere")
        cfg = json.loads(args["model_config"])
        p = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        folder = Path(__file__).resolve().parent
        if not (folder / META_FILE).is_file():  # fall back to Triton's own paths
            folder = Path(args["model_repository"]) / args["model_version"]
        self.encoder, self.scorer = p.get("encoder_model"), p.get("scorer_model") or None
        self.encoder_batch = int(p.get("encoder_max_batch_size") or 0)
        self.scorer_batch = int(p.get("scorer_max_batch_size") or 0)
        if not self.encoder:
            raise ModelFolderError("config.pbtxt lacks the parameter encoder_model; re-run `distillrec triton <run>`")
        self.core = RecommendCore(folder, self._run_encoder, self._run_scorer if self.scorer else None,
                                  unknown_items=p.get("unknown_items") or "error",
                                  empty_history=p.get("empty_history") or "error",
                                  pad_to=p.get("pad_to") or "max_history")
        self.outputs = [o["name"] for o in cfg.get("output", [])]

    def _bls(self, model: str, feed: dict, outputs: list, max_batch: int) -> dict:
        """Run `model` on feed through BLS, in chunks of max_batch rows; outputs as CPU numpy arrays."""
        n = next(iter(feed.values())).shape[0]
        step = max_batch if max_batch > 0 else n
        parts: dict = {name: [] for name in outputs}
        kw = {}
        if hasattr(pb_utils, "PreferredMemory"):  # outputs in CPU memory even when the model runs on a GPU
            kw["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        for s in range(0, n, step):
            inputs = [pb_utils.Tensor(name, np.ascontiguousarray(a[s:s + step])) for name, a in feed.items()]
            resp = pb_utils.InferenceRequest(model_name=model, requested_output_names=list(outputs), inputs=inputs,
                                             **kw).exec()
            if resp.has_error():
                raise pb_utils.TritonModelException(f"BLS call to {model} failed: {resp.error().message()}")
            for name in outputs:
                t = pb_utils.get_output_tensor_by_name(resp, name)
                if not t.is_cpu():
                    raise pb_utils.TritonModelException(
                        f"{model} returned {name} in GPU memory; use a Triton release whose Python backend has "
                        f"PreferredMemory (BLS outputs in CPU memory)")
                parts[name].append(t.as_numpy())
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    def _run_encoder(self, feed: dict) -> dict:
        feed = dict(feed, history_length=feed["history_length"].reshape(-1, 1))  # config: dims [1], reshape []
        names = list(self.core.two_part.get("encoder_outputs") or [USER_VECTOR])
        return self._bls(self.encoder, feed, names, self.encoder_batch)

    def _run_scorer(self, feed: dict) -> dict:
        return self._bls(self.scorer, feed, list(self.core.two_part.get("scorer_outputs") or []), self.scorer_batch)

    def execute(self, requests):
        responses: list = [None] * len(requests)
        good, rows, wanted = [], [], []
        for i, request in enumerate(requests):
            try:
                tensors = {}
                for name in INPUTS:
                    t = pb_utils.get_input_tensor_by_name(request, name)
                    if t is not None:
                        tensors[name] = t.as_numpy()
                asked = list(request.requested_output_names())
                want = asked or list(self.outputs)  # no output named: every output the request can have
                if "candidates" not in tensors:
                    if asked and any(n in SCORE_NAMES.values() for n in asked):
                        raise RequestError(f"outputs {[n for n in asked if n in SCORE_NAMES.values()]} need the "
                                           f"candidates input (the items to rate)")
                    want = [n for n in want if n in TOPK_OUTPUTS]
                rows.append(self.core.request_rows(tensors))
                wanted.append(want)
                good.append(i)
            except RequestError as e:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
        if good:
            for i, ans in zip(good, self.core.answer(rows, wanted)):
                if isinstance(ans, Exception):
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(ans)))
                else:
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(n, a) for n, a in ans.items()])
        return responses
