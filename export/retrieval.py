"""Top-k retrieval over an item table: exact (numpy) and approximate (faiss). numpy only at import; faiss is
imported lazily, so this module imports (and ExactRetriever works) without faiss installed. No torch, no distill.

    ret = build_retriever(vectors, bias, active)          # exact below ann_min_items, faiss ANN above
    ret.search(u[None], k=10, banned=[seen_ids])           # -> [(ids int64 [<=k], scores float32 [<=k])]

The item table: `vectors` float32 [N, d], `bias` float32 [N], `active` bool [N]. The score of item i for a user
vector u is `u @ vectors[i] + bias[i]`. Inactive items were removed from serving and are never returned, by
either retriever. Ids are internal row ids (0..N-1) of the table.

Per-row filters (lists with one entry per query row; an entry is None, an int array, or a set of internal ids):
- `banned`: ids to exclude (seen items, deny lists). Exclusion is always exact: a banned id is never returned.
- `allow`: when an entry is given, ONLY those ids may be returned (business allow-list), still minus banned and
  inactive. Allow-listed rows are always scored EXACTLY, by both retrievers: gather the allowed rows of the
  table and one small matmul (cost O(|allow| d)); an ANN index cannot restrict its search to an arbitrary
  subset without losing recall, and allow-lists are small enough that exact scoring is cheaper anyway.

ExactRetriever: one matmul for the batch (`queries @ vectors.T + bias`, in row chunks bounded by
`max_score_bytes`), inactive/banned rows removed, then `top_k_indices` per row: the same answer as a full stable
sort (ties by the lower id, NaN last).

AnnRetriever (faiss): the bias is folded into an inner product (item [v, b], query [u, 1]) and the index is
built over the active rows only (labels map back to internal ids). Exclusion stays exact: the index is asked
for k' = k + |banned ∩ active| + margin candidates, banned ones are dropped, the survivors are re-scored
exactly (u @ v + b, so returned scores and order are exact; extra candidates beyond k improve recall for
free), and when fewer than k survive, k' is doubled (and IVF's nprobe with it) up to `max_widen` times before
falling back to exact scoring of all eligible rows.

Index choice (measured on this machine, 2 shared CPU cores, faiss-cpu 1.15.1, single-thread search, batch 1,
synthetic clustered catalog: 50 centres ~N(0,1), items = centre + 0.5 N(0,1), bias ~N(0,0.5), d=64, queries
drawn like items, 50 banned ids per query drawn from its exact top-100, recall@10 against exact with the same
exclusion, candidates re-scored exactly):

    items   index                              build s  p50 ms ANN  p50 ms exact  recall@10
    10^5    IVF-Flat IP nlist=1024 nprobe=16        5.6     0.11        0.94         0.92
    10^5    IVF-Flat IP nlist=1024 nprobe=32        5.6     0.12        0.94         1.00
    10^5    HNSW IP M=32 efC=100 ef=64(->70=k')    11.0     0.11        0.94         0.986
    10^5    HNSW IP M=32 efC=100 ef=128            11.0     0.15        0.94         0.988
    10^5    HNSW L2-augmented M=32 efC=100 ef=128  20.5     0.20        0.94         0.975
    10^6    IVF-Flat IP nlist=4096 nprobe=32        627     0.35        20.6 (*)     0.60
    10^6    IVF-Flat IP nlist=4096 nprobe=64        627     0.64 (**)   20.6 (*)     0.92
    10^6    HNSW IP M=32 efC=100 ef=96              546     0.38        20.6 (*)     0.956
    10^6    HNSW IP M=32 efC=100 ef=128             546     0.52        20.6 (*)     0.968
    10^6    HNSW IP M=32 efC=100 ef=256             546     0.69        20.6 (*)     0.976
    (build s: 2 threads on 2 cores shared with other jobs, so 10^6 builds ran at ~half speed or worse)

    (*) exact numbers on this machine are inflated by other jobs sharing the 2 cores (OpenBLAS threads
    descheduled); (**) p90 4.6 ms. Uncontended single-thread exact is ~0.9 ms at 10^5 and scales linearly
    (~9 ms at 10^6, an extrapolation).

Second measurement (the lead, issue 13's scale benchmark: 10^6 items = the 1,682 real rows of the default run's
item table plus noisy copies of them, serve_bench/scale.py; queries = the real encoder's user vectors of 200
test users, their seen items banned; quiet machine, single-thread search):

    10^6    HNSW IP M=32 efC=100 ef=128..1024       135-212   0.7-2.3      45          0.75 .. 0.90
    10^6    IVF-Flat IP nlist=4096 nprobe=32..128        52   0.36-1.23    19          0.39 .. 0.83
    10^6    IVF-Flat L2 on [v, b, sqrt(R^2-|.|^2)],      46   0.13 (8)     19          0.82 (8)
            nlist=4096, k-means on 64 rows/list                0.32 (32)                0.962 (32)
                                                               0.68 (64)                0.992 (64)

A catalog made of many items that resemble each other (every real row has ~600 noisy siblings: variants,
sequels, near-duplicates, as real catalogs have) breaks the inner-product graph: the top scores sit among
near-equal siblings and the graph walk stops early. Inner-product IVF fails for the known MIPS reason (k-means
groups by direction and position, the top inner products sit at high-norm items in many lists). The MIPS->L2
reduction fixes IVF: with the extra coordinate, the nearest item in L2 IS the best-scored one, so k-means lists
group items that score alike and a few lists hold the whole top-k.

Choice: IVF-Flat over the L2-transformed rows (index_type="ivf") is the default: 0.96-0.99 recall@10 at 10^6
for 0.3-0.7 ms, a 46 s build (k-means on a 64-per-list sample) and half HNSW's memory (the rows plus list ids,
no graph). nprobe=48 (between the measured 32 and 64; 1.2 % of the lists at 10^6, 4.7 % at 10^5),
nlist ~ 4 sqrt(n). HNSW (IndexHNSWFlat, inner product on [v, b] / [u, 1]) stays available
(index_type="hnsw": the better choice on catalogs without near-duplicate clusters, per the first table).
M=32, ef_construction=100, ef_search=128 are its defaults.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import numbers
import os
import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["top_k_indices", "ExactRetriever", "AnnRetriever", "build_retriever", "recall_at_k",
           "table_fingerprint", "faiss_available", "AnnUnavailableWarning", "ANN_MIN_ITEMS"]

ANN_MIN_ITEMS = 50_000
"""Default catalog size from which mode="auto" builds an ANN index. Measured at batch 1, single thread: exact
costs ~0.1 ms at 10^4, ~0.3 ms at 3x10^4 and ~0.9 ms at 10^5 (linear in N); HNSW costs ~0.1-0.15 ms from 10^4
to 10^5. The pure latency crossover is ~1-2x10^4, but below 5x10^4 exact stays under ~0.5 ms, well inside the
~1 ms left after the encoder, with perfect recall, no build time and no index memory; at 10^5 exact (~0.9 ms)
would eat the whole budget. Hence 5x10^4."""
TRAIN_PER_LIST = 64
"""k-means training rows per IVF list (AnnRetriever._training_sample)."""
INDEX_FILE = "index.faiss"
META_FILE = "retrieval.json"
FORMAT = "distillrec-retrieval"
FORMAT_VERSION = 2
"""2: IVF indexes hold the L2-transformed rows (a v1 IVF index searched inner products)."""
INSTALL_HINT = "pip install faiss-cpu (the `ann` extra: pip install distillrec[ann])"


class AnnUnavailableWarning(UserWarning):
    """mode="auto" wanted an ANN index but faiss is not installed; exact retrieval is used instead."""


def top_k_indices(scores: np.ndarray, k: int, banned=None) -> np.ndarray:
    """Indices of the k highest scores outside `banned`, highest first, ties by the lower index.

    The same answer as `np.argsort(-scores, kind="stable")` over the unbanned items, cut to k, without sorting
    the catalog: np.argpartition finds the k-th highest value t, everything above t plus the first (by index)
    items equal to t make the k, and only those k are sorted. Banned items are removed, never just pushed to
    the end; NaN scores rank last. Fewer than k come back when fewer than k items are not banned.
    """
    s = np.asarray(scores, dtype=np.float64)
    if banned:
        keep = np.ones(s.shape[0], dtype=bool)
        keep[np.fromiter(banned, dtype=np.int64, count=len(banned))] = False
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
        t = vals[np.argpartition(-vals, k - 1)[k - 1]]  # the k-th highest value
        above = np.flatnonzero(vals > t)
        sel = np.concatenate([above, np.flatnonzero(vals == t)[:k - above.size]])
    else:
        sel = np.arange(n)
    return idx[sel[np.lexsort((sel, -vals[sel]))]]


# ----------------------------------------------------------------------------------------------- validation

def _top_k_eligible(vals: np.ndarray, k: int) -> np.ndarray:
    """top_k_indices for a float32 score row with no NaN where -inf marks an ineligible item: the same order
    (highest first, ties by the lower index), -inf entries never returned. The serving hot path: no float64 copy,
    no gather of the eligible ids (banned and inactive items are masked to -inf in the row instead)."""
    n = vals.shape[0]
    if k < n:
        t = vals[np.argpartition(vals, n - k)[n - k]]  # the k-th highest value
        above = np.flatnonzero(vals > t)
        sel = np.concatenate([above, np.flatnonzero(vals == t)[:k - above.size]]) if above.size < k else above
    else:
        sel = np.arange(n)
    sel = sel[np.lexsort((sel, -vals[sel]))]
    return sel[vals[sel] > -np.inf]


def faiss_available() -> bool:
    """True when `import faiss` would succeed (checked without importing it)."""
    return importlib.util.find_spec("faiss") is not None


def _faiss():
    """The faiss module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(f"approximate retrieval needs faiss, which is not installed: {INSTALL_HINT}; "
                          "or use mode='exact'") from e
    return faiss


def _check_table(vectors, bias, active) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The table as (float32 C-contiguous [N, d], float32 [N], bool [N]); ValueError naming any mismatch.

    active=None means every item is active. Non-finite vectors or biases are refused: a NaN row would score NaN
    for every query (silently ranked last by exact search, undefined inside a faiss index)."""
    v = np.asarray(vectors)
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise ValueError(f"vectors must be a non-empty 2-D array [N, d], got shape {v.shape}")
    if v.dtype.kind not in "fiu":
        raise ValueError(f"vectors must be a real numeric array (float32 preferred), got dtype {v.dtype}")
    v = np.ascontiguousarray(v, dtype=np.float32)
    n = v.shape[0]
    b = np.asarray(bias)
    if b.shape != (n,):
        raise ValueError(f"bias must have shape ({n},) to match vectors {v.shape}, got {b.shape}")
    if b.dtype.kind not in "fiu":
        raise ValueError(f"bias must be a real numeric array (float32 preferred), got dtype {b.dtype}")
    b = np.ascontiguousarray(b, dtype=np.float32)
    if active is None:
        a = np.ones(n, dtype=bool)
    else:
        a = np.asarray(active)
        if a.shape != (n,):
            raise ValueError(f"active must have shape ({n},) to match vectors {v.shape}, got {a.shape}")
        if a.dtype != np.bool_:
            raise ValueError(f"active must be a bool mask [N], got dtype {a.dtype} (for a list of active ids "
                             "build the mask: m = np.zeros(N, bool); m[ids] = True)")
        a = np.ascontiguousarray(a)
    if not np.isfinite(v).all():
        raise ValueError("vectors contain NaN or inf; fix the exported item table (or mark those items inactive "
                         "and zero their rows)")
    if not np.isfinite(b).all():
        raise ValueError("bias contains NaN or inf; fix the exported item table (or mark those items inactive "
                         "and zero their bias)")
    return v, b, a


def _check_queries(queries, dim: int) -> np.ndarray:
    """Queries as float32 C-contiguous [B, dim]; ValueError naming a wrong rank, dim, dtype or a NaN/inf."""
    q = np.asarray(queries)
    if q.dtype not in (np.float32, np.float64):
        raise ValueError(f"queries must be float32 (float64 is accepted and cast), got dtype {q.dtype}")
    if q.ndim != 2:
        hint = " (one query: pass u[None, :])" if q.ndim == 1 else ""
        raise ValueError(f"queries must be a 2-D array [B, {dim}], got shape {q.shape}{hint}")
    if q.shape[1] != dim:
        raise ValueError(f"queries have dim {q.shape[1]} but the item vectors have dim {dim}")
    if not np.isfinite(q).all():
        bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
        raise ValueError(f"queries contain NaN or inf (rows {bad[:10].tolist()}); check the user encoder output")
    return np.ascontiguousarray(q, dtype=np.float32)


def _check_k(k) -> int:
    """k as a positive int; ValueError otherwise."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or int(k) <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _id_array(ids, n: int, name: str) -> np.ndarray:
    """One row's ids as a sorted unique int64 array in [0, n); ValueError for anything else."""
    if isinstance(ids, (set, frozenset)):
        arr = np.fromiter(ids, dtype=np.int64, count=len(ids)) if ids else np.empty(0, np.int64)
    else:
        a = np.asarray(ids)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise ValueError(f"{name} must be None or a 1-D collection of integer item ids, got "
                             f"{type(ids).__name__} with shape {a.shape} and dtype {a.dtype}")
        arr = a.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{name} has ids outside [0, {n}): internal ids are rows of the item table")
    return np.unique(arr)


def _per_row(arg, rows: int, n: int, name: str) -> list:
    """`banned`/`allow` as a list of `rows` entries (None or sorted unique int64 ids)."""
    if arg is None:
        return [None] * rows
    if isinstance(arg, (np.ndarray, set, frozenset, str, bytes)) or not hasattr(arg, "__len__"):
        raise ValueError(f"{name} must be None or a list with one entry per query row (None, an int array or a "
                         f"set of ids), got {type(arg).__name__}")
    if len(arg) != rows:
        raise ValueError(f"{name} has {len(arg)} entries but there are {rows} query rows (one entry per row; "
                         f"for one query pass {name}=[ids])")
    out = []
    for i, ids in enumerate(arg):
        if ids is not None and isinstance(ids, numbers.Integral):
            raise ValueError(f"{name}[{i}] is a single int; each entry is a collection of ids "
                             f"(for one query pass {name}=[ids])")
        out.append(None if ids is None else _id_array(ids, n, f"{name}[{i}]"))
    return out


# ---------------------------------------------------------------------------------------------- exact path

def _result(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return ids.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)


def _allowed_top_k(vectors, bias, active, u, k, allow, banned):
    """Exact top-k over an allow-list: gather the allowed, active, unbanned rows and score only them.

    `allow` is sorted, so top_k_indices' ties by lower position are ties by the lower id."""
    ids = allow[active[allow]]
    if banned is not None and banned.size:
        ids = ids[~np.isin(ids, banned, assume_unique=True)]
    s = vectors[ids] @ u + bias[ids]
    sel = top_k_indices(s, k)
    return _result(ids[sel], s[sel])


class ExactRetriever:
    """Exact top-k by score `u @ vectors[i] + bias[i]` over the active, unbanned (and allowed) items.

    max_score_bytes: the batch is scored in row chunks so the [rows, N] float32 score block stays under this
    (256 MiB: a batch of 256 over a 10^6-item table would otherwise need 1 GiB); chunks of >= 1 row always.
    The table arrays are kept by reference (float32/bool inputs are not copied).
    """

    kind = "exact"

    def __init__(self, vectors, bias, active=None, *, max_score_bytes: int = 256 << 20):
        self.vectors, self.bias, self.active = _check_table(vectors, bias, active)
        self.n_items, self.dim = self.vectors.shape
        self.all_active = bool(self.active.all())
        self.active_ids = np.flatnonzero(self.active)
        # inactive items score -inf through their bias: removed by the top-k, never gathered out per query
        self._bias_eff = self.bias if self.all_active else np.where(self.active, self.bias, -np.inf).astype(np.float32)
        self.max_score_bytes = int(max_score_bytes)
        self.build_seconds = 0.0

    def memory_bytes(self) -> int:
        """Memory held beyond the item table itself (the id list of active items)."""
        return int(self.active_ids.nbytes)

    def search(self, queries, k: int, banned=None, allow=None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query row: (ids int64 [<=k], scores float32 [<=k]), best first, ties by the lower id.

        banned / allow: None or one entry per row (None, int array or set of internal ids); see the module
        docstring. Fewer than k come back when fewer items are eligible."""
        q = _check_queries(queries, self.dim)
        k = _check_k(k)
        rows = q.shape[0]
        banned = _per_row(banned, rows, self.n_items, "banned")
        allow = _per_row(allow, rows, self.n_items, "allow")
        out: list = [None] * rows
        for i in range(rows):
            if allow[i] is not None:
                out[i] = _allowed_top_k(self.vectors, self.bias, self.active, q[i], k, allow[i], banned[i])
        plain = [i for i in range(rows) if allow[i] is None]
        step = max(1, self.max_score_bytes // (4 * self.n_items))
        for start in range(0, len(plain), step):
            chunk = plain[start:start + step]
            scores = q[chunk] @ self.vectors.T
            scores += self._bias_eff
            for j, i in enumerate(chunk):
                out[i] = self._row_top_k(scores[j], k, banned[i])
        return out

    def _row_top_k(self, row: np.ndarray, k: int, banned) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of one row of scores (this search's own array) over the eligible ids: banned ids are set to
        -inf like the inactive ones, and -inf is never returned (removed, never just pushed down)."""
        if banned is not None and banned.size:
            row[banned] = -np.inf
        sel = _top_k_eligible(row, k)
        return _result(sel, row[sel])


# ------------------------------------------------------------------------------------------------ ANN path

def table_fingerprint(vectors: np.ndarray, bias: np.ndarray, active: np.ndarray, sample_rows: int = 4096) -> str:
    """A cheap fingerprint of an item table: blake2b over the shape, `sample_rows` evenly spaced vector rows,
    the whole bias and the packed active mask.

    Cheap on purpose (a 10^7-item table hashes in well under a second): it catches a different export, a
    re-ordered or resized table, changed biases and changed active flags, which is what a stale index file
    means in practice; it does not prove two tables identical row by row."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(vectors.shape, dtype=np.int64).tobytes())
    rows = np.unique(np.linspace(0, vectors.shape[0] - 1, num=min(sample_rows, vectors.shape[0])).astype(np.int64))
    h.update(np.ascontiguousarray(vectors[rows], dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(bias, dtype=np.float32).tobytes())
    h.update(np.packbits(active).tobytes())
    return h.hexdigest()


class AnnRetriever:
    """Approximate top-k with faiss, bias folded in, exact exclusion and exact re-scoring of the candidates.

    index_type: "ivf" (IndexIVFFlat, inner product) or "hnsw" (IndexHNSWFlat, inner product). Defaults and the
      reason for them: see the module docstring's measurement table.
    nlist: IVF lists; None -> 4 * sqrt(n) rounded to a power of two, capped so every list gets >= 39 training
      points (faiss's k-means minimum). nprobe: lists scanned per query.
    M, ef_construction, ef_search: HNSW graph degree, build beam and search beam (the search beam is raised
      to k' when k' is larger, as faiss requires).
    margin: extra candidates over k + |banned| so that a few misranked ANN candidates do not cost recall after
      exact re-scoring. max_widen: times k' (and nprobe) is doubled before the exact fallback.
    threads: faiss OpenMP threads while searching (process-global setting; 1 for a concurrent server).
    build_threads: threads while building (None: all cores of this process).
    `stats` counts searches per path: "ann", "widened", "exact_fallback", "allow_exact" (not thread-safe).
    """

    kind = "ann"

    def __init__(self, vectors, bias, active=None, *, index_type: str = "ivf", nlist: int | None = None,
                 nprobe: int = 48, M: int = 32, ef_construction: int = 100, ef_search: int = 128,
                 margin: int = 10, max_widen: int = 3, threads: int = 1, build_threads: int | None = None,
                 _index=None, _build_seconds: float | None = None):
        faiss = _faiss()
        self._exact = ExactRetriever(vectors, bias, active)
        self.vectors, self.bias, self.active = self._exact.vectors, self._exact.bias, self._exact.active
        self.n_items, self.dim = self.vectors.shape
        self.active_ids = self._exact.active_ids
        if index_type not in ("ivf", "hnsw"):
            raise ValueError(f"index_type must be 'ivf' or 'hnsw', got {index_type!r}")
        for name, val in (("nprobe", nprobe), ("M", M), ("ef_construction", ef_construction),
                          ("ef_search", ef_search), ("threads", threads)):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val <= 0:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if margin < 0 or max_widen < 0:
            raise ValueError(f"margin and max_widen must be >= 0, got {margin}, {max_widen}")
        if nlist is not None and (not isinstance(nlist, numbers.Integral) or nlist <= 0):
            raise ValueError(f"nlist must be a positive integer or None, got {nlist!r}")
        self.index_type = index_type
        self.nlist = int(nlist) if nlist is not None else default_nlist(self.active_ids.size)
        self.nprobe, self.M, self.ef_construction, self.ef_search = int(nprobe), int(M), int(ef_construction), \
            int(ef_search)
        self.margin, self.max_widen, self.threads = int(margin), int(max_widen), int(threads)
        self.build_threads = build_threads
        self.stats = {"ann": 0, "widened": 0, "exact_fallback": 0, "allow_exact": 0}
        if _index is not None:
            self.index, self.build_seconds = _index, float(_build_seconds or 0.0)
        else:
            t0 = time.perf_counter()
            self.index = self._build(faiss)
            self.build_seconds = time.perf_counter() - t0
        if self.index_type == "ivf":
            self.index.nprobe = min(self.nprobe, self.nlist)

    # -- build
    def params(self) -> dict:
        """The constructor parameters that define the index (stored by save, reused by load)."""
        return {"index_type": self.index_type, "nlist": self.nlist, "nprobe": self.nprobe, "M": self.M,
                "ef_construction": self.ef_construction, "ef_search": self.ef_search, "margin": self.margin,
                "max_widen": self.max_widen}

    def _augmented(self) -> np.ndarray:
        """Active rows as [v, b] float32, so that [u, 1] @ [v, b] = u @ v + b. For IVF one more coordinate,
        sqrt(R^2 - |[v, b]|^2) with R the largest norm, turns the inner product into a Euclidean distance
        (|[u, 1, 0] - [v, b, c]|^2 = |u|^2 + 1 + R^2 - 2 (u @ v + b)): the nearest item in L2 is the best-scored
        one, and k-means lists then group items that score alike (see the module docstring)."""
        ids = self.active_ids
        x = np.hstack([self.vectors[ids], self.bias[ids, None]]).astype(np.float32)
        if self.index_type == "hnsw" or x.shape[0] == 0:
            return np.ascontiguousarray(x)
        sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
        extra = np.sqrt(np.maximum(sq.max() - sq, 0.0)).astype(np.float32)
        return np.ascontiguousarray(np.hstack([x, extra[:, None]]))

    def _query(self, q: np.ndarray) -> np.ndarray:
        """Queries in the index's space: [u, 1] (HNSW, inner product) or [u, 1, 0] (IVF, L2)."""
        extra = 1 if self.index_type == "hnsw" else 2
        qa = np.zeros((q.shape[0], q.shape[1] + extra), dtype=np.float32)
        qa[:, :q.shape[1]] = q
        qa[:, q.shape[1]] = 1.0
        return qa

    def _build(self, faiss):
        x = self._augmented()
        if x.shape[0] == 0:
            raise ValueError("no active items: an ANN index needs at least one active item")
        faiss.omp_set_num_threads(int(self.build_threads or _cpu_count()))
        try:
            if self.index_type == "hnsw":
                index = faiss.IndexHNSWFlat(x.shape[1], self.M, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = self.ef_construction
            else:
                self.nlist = min(self.nlist, max(1, x.shape[0] // 39))
                index = faiss.IndexIVFFlat(faiss.IndexFlatL2(x.shape[1]), x.shape[1], self.nlist, faiss.METRIC_L2)
                index.cp.seed = 1234  # k-means is seeded: the same table builds the same index
                index.train(self._training_sample(x))
            index.add(x)
        finally:
            faiss.omp_set_num_threads(self.threads)
        return index

    def _training_sample(self, x: np.ndarray) -> np.ndarray:
        """k-means training rows: TRAIN_PER_LIST per list, a seeded sample (faiss wants >= 39 per list; more only
        slows the build: at 10^6 rows all of them took minutes, 64 per list ~45 s on 2 cores)."""
        n = min(x.shape[0], TRAIN_PER_LIST * self.nlist)
        if n == x.shape[0]:
            return x
        rows = np.sort(np.random.default_rng(1234).choice(x.shape[0], n, replace=False))
        return np.ascontiguousarray(x[rows])

    def memory_bytes(self) -> int:
        """Estimated memory of the index plus the id map (the item table itself is not counted)."""
        n, dim = self.index.ntotal, self.index.d
        total = n * dim * 4 + self.active_ids.nbytes
        if self.index_type == "hnsw":
            h = self.index.hnsw
            total += h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8
        else:
            total += n * 8 + self.nlist * dim * 4  # list ids + coarse centroids
        return int(total)

    # -- search
    def search(self, queries, k: int, banned=None, allow=None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query row: (ids int64 [<=k], scores float32 [<=k]), best first by exact score.

        Same contract as ExactRetriever.search; the ids are approximate (recall < 1 possible), the exclusion of
        banned / inactive / not-allowed ids and the returned scores are exact."""
        faiss = _faiss()
        q = _check_queries(queries, self.dim)
        k = _check_k(k)
        rows = q.shape[0]
        banned = _per_row(banned, rows, self.n_items, "banned")
        allow = _per_row(allow, rows, self.n_items, "allow")
        faiss.omp_set_num_threads(self.threads)
        out: list = [None] * rows
        ann_rows = []
        for i in range(rows):
            if allow[i] is not None:
                self.stats["allow_exact"] += 1
                out[i] = _allowed_top_k(self.vectors, self.bias, self.active, q[i], k, allow[i], banned[i])
            else:
                ann_rows.append(i)
        if not ann_rows:
            return out
        # each row asks the index for its own k' = k + |its banned| + margin (rows with the same k' share one
        # faiss call): a row's answer never depends on which other rows share its batch
        groups: dict[int, list[int]] = {}
        for i in ann_rows:
            groups.setdefault(k + self._n_banned_active(banned[i]) + self.margin, []).append(i)
        for k_first, rows_ in groups.items():
            labels = self._ann_labels(faiss, q[rows_], k_first, self.nprobe)
            for j, i in enumerate(rows_):
                out[i] = self._finish_row(faiss, q[i], k, banned[i], labels[j], k_first)
        return out

    def _n_banned_active(self, banned) -> int:
        """How many banned ids are in the index (inactive ones never are, so they need no extra candidates)."""
        return 0 if banned is None else int(self.active[banned].sum())

    def _ann_labels(self, faiss, q: np.ndarray, kp: int, nprobe: int) -> np.ndarray:
        """faiss labels [B, kp'] (positions in the index, -1 = none) for the augmented queries [u, 1]."""
        kp = min(kp, self.index.ntotal)
        qa = self._query(q)
        if self.index_type == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, kp))
        else:
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.nlist))
        _, labels = self.index.search(qa, kp, params=params)
        return labels

    def _finish_row(self, faiss, u, k, banned, labels, kp):
        """Drop banned candidates, widen k' (and nprobe) while fewer than k survive, re-score the survivors
        exactly; exact search over the eligible rows when widening `max_widen` times was not enough."""
        nprobe = self.nprobe
        for attempt in range(self.max_widen + 1):
            cand = self.active_ids[np.unique(labels[labels >= 0])]  # sorted internal ids
            if banned is not None and banned.size:
                cand = cand[~np.isin(cand, banned, assume_unique=True)]
            if cand.size >= k:
                self.stats["ann"] += 1
                s = self.vectors[cand] @ u + self.bias[cand]
                sel = top_k_indices(s, k)  # cand is sorted: ties by the lower id
                return _result(cand[sel], s[sel])
            exhausted = kp >= self.index.ntotal and (self.index_type == "hnsw" or nprobe >= self.nlist)
            if exhausted or attempt == self.max_widen:
                break
            self.stats["widened"] += 1
            kp, nprobe = kp * 2, nprobe * 2
            labels = self._ann_labels(faiss, u[None], kp, nprobe)[0]
        self.stats["exact_fallback"] += 1
        return self._exact.search(u[None], k, banned=[banned])[0]

    # -- persistence
    def save(self, path) -> Path:
        """Write the index and its table check to folder `path` (index.faiss + retrieval.json)."""
        faiss = _faiss()
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(p / INDEX_FILE))
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "n_items": int(self.n_items), "dim": int(self.dim),
                "n_index": int(self.index.ntotal), "fingerprint": table_fingerprint(self.vectors, self.bias,
                                                                                     self.active),
                "params": self.params(), "build_seconds": self.build_seconds, "faiss_version": faiss.__version__}
        (p / META_FILE).write_text(json.dumps(meta, indent=2))
        return p

    @classmethod
    def load(cls, path, vectors, bias, active=None, *, threads: int = 1, **overrides) -> "AnnRetriever":
        """Reuse an index written by `save` for the SAME table; ValueError when the table does not match.

        overrides: search-time parameters to change (nprobe, ef_search, margin, max_widen)."""
        faiss = _faiss()
        p = Path(path)
        if not (p / INDEX_FILE).is_file() or not (p / META_FILE).is_file():
            raise FileNotFoundError(f"{p} is not a saved retrieval index (needs {INDEX_FILE} and {META_FILE}); "
                                    "build one with AnnRetriever(...).save(path)")
        meta = json.loads((p / META_FILE).read_text())
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{p / META_FILE} is not a {FORMAT} v{FORMAT_VERSION} file")
        v, b, a = _check_table(vectors, bias, active)
        _check_meta_matches(meta, v, b, a, p)
        bad = set(overrides) - {"nprobe", "ef_search", "margin", "max_widen"}
        if bad:
            raise ValueError(f"load can only override search-time parameters, not {sorted(bad)}")
        index = faiss.read_index(str(p / INDEX_FILE))
        if index.ntotal != meta["n_index"] or index.ntotal != int(a.sum()):
            raise ValueError(f"{p / INDEX_FILE} holds {index.ntotal} vectors but the table has {int(a.sum())} "
                             "active items; rebuild the index for this table")
        params = {**meta["params"], **overrides}
        return cls(v, b, a, threads=threads, _index=index, _build_seconds=meta.get("build_seconds"), **params)


def _check_meta_matches(meta: dict, v, b, a, p: Path) -> None:
    """ValueError unless the saved index was built for this exact table (N, d, fingerprint)."""
    if (meta["n_items"], meta["dim"]) != v.shape:
        raise ValueError(f"index at {p} was built for a table of N={meta['n_items']}, d={meta['dim']} but this "
                         f"table has N={v.shape[0]}, d={v.shape[1]}; rebuild it (AnnRetriever(...).save(path))")
    if meta["fingerprint"] != table_fingerprint(v, b, a):
        raise ValueError(f"index at {p} was built for a different item table (fingerprint mismatch: vectors, "
                         "bias or active flags changed); rebuild it (AnnRetriever(...).save(path))")


def default_nlist(n: int) -> int:
    """IVF list count: ~4 sqrt(n) rounded to a power of two (1024 at 10^5, 4096 at 10^6, faiss's usual rule),
    at least 1."""
    if n <= 0:
        return 1
    return int(2 ** round(np.log2(max(1.0, 4 * np.sqrt(n)))))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------- front door

def build_retriever(vectors, bias, active=None, mode: str = "auto", ann_min_items: int = ANN_MIN_ITEMS,
                    **ann_params):
    """ExactRetriever or AnnRetriever for an item table.

    mode: "exact", "ann" (needs faiss: ImportError naming the install otherwise) or "auto": exact below
    `ann_min_items` table rows, ANN from there (exact with an AnnUnavailableWarning when faiss is missing).
    ann_min_items: see the module docstring's measured crossover of exact vs ANN p50 at batch 1.
    ann_params: passed to AnnRetriever (ignored when auto picks exact; refused with mode="exact")."""
    if mode not in ("auto", "exact", "ann"):
        raise ValueError(f"mode must be 'auto', 'exact' or 'ann', got {mode!r}")
    if mode == "exact":
        if ann_params:
            raise ValueError(f"ANN parameters {sorted(ann_params)} given with mode='exact'")
        return ExactRetriever(vectors, bias, active)
    if mode == "ann":
        _faiss()
        return AnnRetriever(vectors, bias, active, **ann_params)
    n = np.shape(vectors)[0] if np.ndim(vectors) == 2 else 0
    if n < ann_min_items:
        return ExactRetriever(vectors, bias, active)
    if not faiss_available():
        warnings.warn(f"{n} items >= ann_min_items={ann_min_items} but faiss is not installed; using exact "
                      f"retrieval (slower at this size). Install it: {INSTALL_HINT}", AnnUnavailableWarning,
                      stacklevel=2)
        return ExactRetriever(vectors, bias, active)
    return AnnRetriever(vectors, bias, active, **ann_params)


def recall_at_k(exact_results, approx_results, k: int) -> float:
    """Mean over rows of |exact top-k ∩ approx top-k| / |exact top-k| (a row with no exact result counts 1)."""
    k = _check_k(k)
    if len(exact_results) != len(approx_results):
        raise ValueError(f"exact_results has {len(exact_results)} rows but approx_results {len(approx_results)}")
    if not len(exact_results):
        raise ValueError("recall_at_k needs at least one row")
    fracs = []
    for (e_ids, _), (a_ids, _) in zip(exact_results, approx_results):
        truth = np.asarray(e_ids)[:k]
        fracs.append(1.0 if truth.size == 0 else np.isin(truth, np.asarray(a_ids)[:k]).sum() / truth.size)
    return float(np.mean(fracs))
