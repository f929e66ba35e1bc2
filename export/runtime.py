"""Serving runtime for the exported student: stdlib + numpy + onnxruntime only (no torch, no distill.*).

    rec = Recommender("runs/default/onnx")
    rec.recommend(["50", "172", "133"], ratings=[5, 4, 3], k=10)   # -> [(item_id, score), ...]
    rec.score(["50", "172"], candidates=["1", "2"])                # -> {"rating", "like", "like_logit"}
    rec.recommend(["50", "172"], explain=True)                     # -> [(item_id, score, [(hist_id, sim)]), ...]
    rec.recommend(["50", "172"], query="space opera")              # steered by text (needs onnx/query/)

explain=True (two-part): each recommended item comes with the request's history items most similar to it
(cosine in the item table's vectors, or its teacher text vectors with explain_space="text"): the "because you
watched" of the answer, from the vectors already loaded, no extra model call. query="..." (two-part, with the
query encoder the export wrote to onnx/query/, export/query_encoder.py): the text becomes a unit vector q_hat in
the item-vector space and the user vector u is shifted to u + w q_hat before retrieval, so the ranking is by
(u + w q_hat) @ v_i + b_i.

Inputs are raw item ids (as in the training data; ints are accepted and matched as strings). Ratings are
1..5, or 0 for "unknown"; no ratings at all means every rating is unknown. A history longer than
max_history keeps its most recent max_history interactions (the order given is chronological), but every
item of the full history counts as seen for `exclude_seen`.

One InferenceSession is shared; `InferenceSession.run` is thread-safe and this object holds no mutable
state after construction, so a Recommender can serve concurrent requests. Because concurrent calls share the
session's intra-op thread pool, the default is NOT "all cores per call": see `default_intra_op_threads`.

Errors: input a caller sent that the model cannot take raises `RequestError` (a ValueError; the HTTP service
answers it with 400). A broken model folder raises `RuntimeArtifactError`; a wrong constructor argument a
plain ValueError.

TensorRT engine / timing caches are written under a cache folder outside the model folder (which may be a
read-only mount): see `trt_cache_dir`.

Providers and variants: see the Recommender docstring and docs/export.md. File and tensor names come from the
artifact contract, export/contract.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import onnxruntime as ort

from export import contract as C
from export.contract import INPUT_NAMES, SCHEMA_VERSION  # noqa: F401  (re-exported)
from export.item_table import ItemTable, ItemTableError, current_version, load_table, version_name
from export.retrieval import ANN_MIN_ITEMS, build_retriever, top_k_indices  # noqa: F401  (top_k_indices re-exported)
from export.providers import (CPU, TRT, ProviderFallbackWarning, build_providers, canonical_name,  # noqa: F401
                              create_session)

_FIX = C.EXPORT_HINT
_REQUIRED = C.REQUIRED_META_KEYS
_log = logging.getLogger("distillrec.runtime")
MAX_DEFAULT_THREADS = 4
"""Cap of the default intra-op thread count (see default_intra_op_threads)."""


class RequestError(ValueError):
    """The request cannot be answered as sent (unknown ids, bad ratings, k, shapes, ...): the caller's fault.

    The HTTP service maps exactly this type to 400; any other exception is a server fault (500)."""


class RuntimeArtifactError(RuntimeError):
    """The runtime folder (runtime.json / model file) is missing, corrupt or from another schema."""


class UnsupportedProviderError(RuntimeError):
    """The model cannot be served by the provider onnxruntime would use (FP16 on CPU), or a required provider
    does not serve (strict_providers=True)."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x)).astype(np.float32)


def _inverse_norms(vectors: np.ndarray) -> np.ndarray:
    """float32 [N]: 1 / ||row|| (0 for a zero row), in chunks of rows so a large table needs no [N, d] temporary."""
    out = np.empty(vectors.shape[0], dtype=np.float32)
    for start in range(0, vectors.shape[0], _NORM_CHUNK):
        chunk = np.asarray(vectors[start:start + _NORM_CHUNK], dtype=np.float32)
        norm = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
        out[start:start + chunk.shape[0]] = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    return out


def _provider_name(p) -> str:
    return p[0] if isinstance(p, (tuple, list)) else str(p)


def _wants_tensorrt(providers) -> bool:
    """Whether a provider list names TensorRT (unknown names are left for build_providers to reject)."""
    for p in providers:
        try:
            if canonical_name(_provider_name(p)) == TRT:
                return True
        except ValueError:
            pass
    return False


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_intra_op_threads(processes: int = 1) -> int:
    """Intra-op threads per session when none are given: min(4, usable cores // (2 x processes)), at least 1.

    One session is shared by every request thread (FastAPI's threadpool) and concurrent `run` calls share its
    intra-op pool. With onnxruntime's own default (one thread per physical core) every batch-1 call would try
    to spread a sub-millisecond graph over all cores while other calls wait for the same pool. Half the cores
    (split between `processes` worker processes) leaves the rest to the request threads; beyond 4 threads the
    student's small MatMuls gain nothing. Pass intra_op_threads=0 for onnxruntime's all-cores default (best
    for one large batch at a time), or a number.
    """
    return max(1, min(MAX_DEFAULT_THREADS, usable_cpus() // (2 * max(1, int(processes)))))


def _cache_root() -> Path:
    env = os.environ.get(C.TRT_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distillrec" / "trt"


def model_hash(path: Union[str, Path], chars: int = 16) -> str:
    """sha256 of a model file's bytes, shortened: the TensorRT cache sub-folder of that exact model."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:chars]


def trt_cache_dir(model_path: Union[str, Path], root: Union[str, Path, None] = None) -> Path:
    """Where TensorRT keeps the engine + timing caches of one model: <root>/<model hash>.

    root: the argument, else $DISTILLREC_TRT_CACHE, else $XDG_CACHE_HOME/distillrec/trt (~/.cache/...).
    Never inside the model folder, so a read-only model mount works; one sub-folder per model file content,
    so a re-exported model never picks up the engines of the previous one."""
    base = Path(root).expanduser() if root is not None else _cache_root()
    return base / model_hash(model_path)


@dataclass(frozen=True)
class Catalog:
    """What one request is answered against: the item ids, popularity and (two-part) the item table and its
    retriever. Replaced as a whole by Recommender.reload(), so a request that took a reference sees one
    consistent version. Rows only ever grow (removed items stay, inactive), so an internal id stays valid."""

    ids: list
    index: dict
    popularity: np.ndarray
    version: int = 0
    table: Optional[ItemTable] = None
    retriever: object = None
    active: Optional[np.ndarray] = None
    explain_vectors: Optional[np.ndarray] = None
    """The vectors explain=True compares (the table's item vectors or its text vectors), by reference."""
    explain_inv_norm: Optional[np.ndarray] = None
    """1 / ||explain_vectors[i]|| (0 for a zero row), computed once per loaded version: a cosine is then one
    small matmul scaled by two gathers, without a normalised [N, d] copy per worker process."""

    @property
    def n_items(self) -> int:
        return len(self.ids)

    @property
    def n_active(self) -> int:
        return self.n_items if self.active is None else int(np.count_nonzero(self.active))


MODES = ("auto", "two_part", "single")
EXPLAIN_SPACES = ("item", "text")
DEFAULT_EXPLAIN_K = 3
_NORM_CHUNK = 1 << 16
"""Rows per step when computing the explain norms (bounds the temporary memory at large catalogs)."""
RETRIEVAL_MODES = ("auto", "exact", "ann")
ANN_DIR = "ann"
"""Sub-folder of an item table version where a built ANN index is kept (export/retrieval.py save / load)."""


class Recommender:
    """Raw-id recommender over a runtime folder (runs/<name>/onnx).

    mode: "two_part" serves the user encoder (encoder.onnx) + the item table (items/): next_item scores are
      user_vector @ item vectors + bias, ranked exactly or by an ANN index (`retrieval`), items can be added or
      removed without a new export and picked up with `reload()`. "single" serves one graph whose output
      scores the whole catalog (student.onnx and its variants; runtime.json item_ids). "auto" (default):
      two-part when the folder has it (runtime.json "two_part") and `model_file` does not name a single-graph
      file, else single.
    retrieval: two-part only: "exact" (one matmul + argpartition), "ann" (faiss; pip install faiss-cpu) or
      "auto": ANN from `ann_min_items` active items. `ann_params` go to export.retrieval.build_retriever.

    providers: names in any order, e.g. ["tensorrt", "cuda", "cpu"] (default: runtime.json "providers");
      they are put in TensorRT -> CUDA -> CPU order, filtered to this onnxruntime build, and CPU is always the
      last resort. TensorRT gets FP16, engine + timing caches in `trt_cache_dir(model, trt_cache_root)` (outside
      the model folder; `.trt_cache` is the folder used, None when TensorRT is not in play) and min/opt/max
      profile shapes for every input (`trt_profile` overrides them, see export.providers.DEFAULT_PROFILE).
      `.requested_providers` is what was asked for, `.providers` what the session really runs (read back from
      onnxruntime); when they differ a ProviderFallbackWarning is emitted (and logged), or, with
      strict_providers=True, UnsupportedProviderError is raised.
    variant / model_file: which model of the folder to serve: a variant name of runtime.json "variants"
      ("fp32", "opt", "int8", "fp16") or a file name. The FP16 variant is GPU-only: loading it where
      onnxruntime would run it on the CPU provider raises UnsupportedProviderError.
    intra_op_threads: None = default_intra_op_threads() (a share of the cores, since request threads share
      the session), 0 = onnxruntime's default (one thread per physical core), n = n. Always set explicitly in
      the session options; `.intra_op_threads` is the value used.
    trt_cache_root: root folder of TensorRT caches (default $DISTILLREC_TRT_CACHE or ~/.cache/distillrec/trt).
    empty_history: "error" (RequestError) or "popularity": empty histories are answered from
      runtime.json item_popularity without running the model (recommend: most popular unexcluded items;
      score: the candidates' popularity, no rating/like estimate). With a query, an empty history is ranked by
      the query alone (user vector 0: w q_hat @ v_i + b_i), not by popularity.
    explain_k / explain_space: recommend(explain=True) lists up to explain_k history items per recommended
      item, ranked by cosine similarity in the item table's vectors ("item") or its teacher text vectors
      ("text": the table's text.npy; a table without it is a RuntimeArtifactError).
    use_query_encoder: load onnx/query/ when the export has it (needs the `tokenizers` package: the `query`
      extra); False serves without it (a query is then refused).
    """

    def __init__(self, folder, providers: Optional[list] = None, unknown_items: str = "error",
                 empty_history: str = "error", intra_op_threads: Optional[int] = None,
                 model_file: Optional[str] = None, variant: Optional[str] = None, strict_providers: bool = False,
                 trt_profile: Optional[dict] = None, trt_cache_root: Union[str, Path, None] = None,
                 mode: str = "auto", retrieval: str = "auto", ann_min_items: int = ANN_MIN_ITEMS,
                 ann_params: Optional[dict] = None, explain_k: int = DEFAULT_EXPLAIN_K,
                 explain_space: str = "item", use_query_encoder: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval must be one of {RETRIEVAL_MODES}, got {retrieval!r}")
        if unknown_items not in ("error", "drop"):
            raise ValueError(f"unknown_items must be 'error' or 'drop', got {unknown_items!r}")
        if empty_history not in ("error", "popularity"):
            raise ValueError(f"empty_history must be 'error' or 'popularity', got {empty_history!r}")
        if intra_op_threads is not None and (isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int)
                                             or intra_op_threads < 0):
            raise ValueError(f"intra_op_threads must be a non-negative int or None, got {intra_op_threads!r}")
        if model_file is not None and variant is not None:
            raise ValueError("pass either model_file or variant, not both")
        if isinstance(explain_k, bool) or not isinstance(explain_k, numbers.Integral) or explain_k < 1:
            raise ValueError(f"explain_k must be a positive int, got {explain_k!r}")
        if explain_space not in EXPLAIN_SPACES:
            raise ValueError(f"explain_space must be one of {EXPLAIN_SPACES}, got {explain_space!r}")
        if not isinstance(use_query_encoder, bool):
            raise ValueError(f"use_query_encoder must be True or False, got {use_query_encoder!r}")
        self.explain_k, self.explain_space = int(explain_k), explain_space
        self.folder = Path(folder)
        self.unknown_items, self.empty_history = unknown_items, empty_history
        self.meta = self._load_meta(self.folder / C.RUNTIME_META_FILE)
        m = self.meta
        self.max_history = int(m["max_history"])
        self.top_k = int(m.get("top_k", 10))
        self.tasks: list[str] = list(m["tasks"])
        self.like_threshold = float(m.get("like_threshold", 4.0))
        self.rating_range = tuple(m.get("rating_range", list(C.RATING_RANGE)))
        # click-only data trains no rating/like head and feeds rating 0 everywhere: ratings are not an input
        self.uses_ratings = bool(m.get("uses_ratings", C.uses_ratings(self.tasks)))
        self.mode = self._pick_mode(mode, model_file)
        self.two_part: dict = m.get("two_part") or {}
        self.retrieval, self.ann_min_items, self.ann_params = retrieval, int(ann_min_items), dict(ann_params or {})
        self.variant, self.precision, file_name = self._pick_model(model_file, variant)
        self.model_path = self.folder / file_name
        if self.mode == "two_part":
            self.output_names = list(self.two_part["encoder_outputs"])
            self.input_names = list(self.two_part.get("encoder_inputs") or C.ENCODER_INPUT_NAMES)
        else:
            self.output_names, self.input_names = list(m["outputs"]), list(INPUT_NAMES)
        self.intra_op_threads = default_intra_op_threads() if intra_op_threads is None else intra_op_threads
        self.trt_cache: Optional[Path] = None
        self.session, self.provider_record = self._make_session(
            self.model_path, self.input_names, self.output_names, providers, self.intra_op_threads,
            strict_providers, trt_profile, trt_cache_root)
        self.providers: list[str] = list(self.session.get_providers())
        self.requested_providers: list[str] = list(self.provider_record["requested"])
        self.scorer = None
        if self.mode == "two_part" and self.two_part.get("scorer_file"):
            self.scorer, _ = self._make_session(
                self.folder / self.two_part["scorer_file"], list(self.two_part["scorer_inputs"]),
                list(self.two_part["scorer_outputs"]), providers, self.intra_op_threads, strict_providers,
                trt_profile, trt_cache_root, main=False)
        self._reload_lock = threading.Lock()
        self._catalog = self._load_catalog()
        self.query_encoder = self._load_query_encoder() if use_query_encoder else None

    # ------------------------------------------------------------------------------------------ catalog
    @property
    def catalog(self) -> Catalog:
        """The catalog requests are answered against now (take it once per request)."""
        return self._catalog

    @property
    def item_ids(self) -> list:
        return self._catalog.ids

    @property
    def index(self) -> dict:
        return self._catalog.index

    @property
    def n_items(self) -> int:
        return self._catalog.n_items

    @property
    def item_popularity(self) -> np.ndarray:
        return self._catalog.popularity

    @property
    def table_version(self) -> int:
        """The item table version being served (0 in single-graph mode: the catalog is part of the graph)."""
        return self._catalog.version

    @property
    def items_dir(self) -> Path:
        return C.item_table_dir(self.folder)

    def disk_table_version(self) -> int:
        """The item table version on disk (CURRENT; cheap to poll). 0 in single-graph mode."""
        return current_version(self.items_dir) if self.mode == "two_part" else 0

    def reload(self) -> bool:
        """Serve the item table version on disk if it changed (new items, removed items): the table and its
        retriever are loaded and built first, then swapped in one assignment, so requests in flight finish on
        the old version and never see a half-built one. Returns whether the version changed."""
        if self.mode != "two_part":
            return False
        with self._reload_lock:
            version = self.disk_table_version()
            if version == self._catalog.version:
                return False
            self._catalog = self._load_catalog(version)
            return True

    def _retriever(self, table: ItemTable):
        """Exact or ANN retrieval over the table (retrieval / ann_min_items, export/retrieval.py). A built ANN
        index is saved in the version's folder (ann/) when it is writable and reused by the next process or
        worker that loads the same version (its fingerprint is checked against the table); a read-only
        model folder just builds in memory."""
        mode = self.retrieval
        if mode == "auto":
            mode = "ann" if table.n_items >= self.ann_min_items else "exact"
            if mode == "ann":
                from export.retrieval import faiss_available
                if not faiss_available():
                    mode = "auto"  # build_retriever warns and ranks exactly
        if mode != "ann":
            return build_retriever(table.vectors, table.bias, table.active, mode=mode,
                                   ann_min_items=self.ann_min_items, **self.ann_params)
        from export.retrieval import AnnRetriever
        vdir = self.items_dir / version_name(table.version)
        cache = vdir / ANN_DIR
        build_params = {k: v for k, v in self.ann_params.items()
                        if k not in ("ef_search", "nprobe", "margin", "max_widen", "threads")}
        search = {k: v for k, v in self.ann_params.items() if k != "threads" and k not in build_params}
        if cache.is_dir() and not build_params:
            try:
                return AnnRetriever.load(cache, table.vectors, table.bias, table.active,
                                         threads=self.ann_params.get("threads", 1), **search)
            except (ValueError, OSError, RuntimeError) as e:  # stale or unreadable: rebuild and replace it
                _log.warning("ANN index %s not reused (%s: %s); rebuilding it", cache, type(e).__name__, e)
                import shutil
                shutil.rmtree(cache, ignore_errors=True)
        retriever = build_retriever(table.vectors, table.bias, table.active, mode="ann", **self.ann_params)
        if not build_params:
            self._save_index(retriever, vdir, cache)
        return retriever

    @staticmethod
    def _save_index(retriever, vdir: Path, cache: Path) -> None:
        """Keep a built index for the next process: written under a private temporary name and renamed into
        place, so a reader never sees half an index and, when several workers build the same version at once,
        the first rename wins and the others drop their copy. A read-only folder, a full disk or a version
        pruned meanwhile only cost the next process a rebuild (logged)."""
        import shutil
        import uuid
        if not vdir.is_dir():
            return
        tmp = vdir / f".{ANN_DIR}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            retriever.save(tmp)
            os.rename(tmp, cache)
        except (OSError, RuntimeError) as e:  # faiss reports write errors as RuntimeError
            if not cache.is_dir():
                _log.warning("ANN index not saved to %s (%s: %s): the next process rebuilds it", cache,
                             type(e).__name__, e)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _pick_mode(self, mode: str, model_file: Optional[str]) -> str:
        has = isinstance(self.meta.get("two_part"), dict)
        if mode == "two_part" and not has:
            raise RuntimeArtifactError(f"{self.folder / C.RUNTIME_META_FILE} has no two-part model (encoder.onnx + "
                                       f"item table): it was exported by an older distillrec; {_FIX}")
        if mode != "auto":
            return mode
        if not has:
            return "single"
        tp_files = {v.get("file") for v in (self.meta["two_part"].get("variants") or {}).values()}
        return "single" if model_file is not None and model_file not in tp_files else "two_part"

    def _load_catalog(self, version: Optional[int] = None) -> Catalog:
        m = self.meta
        if self.mode == "single":
            ids = [str(x) for x in m["item_ids"]]
            pop = np.asarray(m.get("item_popularity") or [0] * len(ids), dtype=np.float64)
            if pop.shape != (len(ids),):
                raise RuntimeArtifactError(f"{self.folder / C.RUNTIME_META_FILE}: item_popularity has {pop.shape[0]} "
                                           f"entries for {len(ids)} items; {_FIX}")
            return Catalog(ids=ids, index={x: i for i, x in enumerate(ids)}, popularity=pop)
        try:
            table = load_table(self.items_dir, version)
        except ItemTableError as e:
            raise RuntimeArtifactError(str(e)) from e
        want = self.two_part.get("model_id")
        if want and table.meta.get("model_id") != want:
            raise RuntimeArtifactError(
                f"{self.items_dir} version {table.version} belongs to another export (model {table.meta.get('model_id')}, "
                f"this runtime serves {want}): the student was re-exported since this Recommender was built; "
                f"restart the server (or build a new Recommender) to serve the new export")
        if table.dim != int(self.two_part["dim"]):
            raise RuntimeArtifactError(f"{self.items_dir} holds {table.dim}-d vectors, the encoder reads "
                                       f"{self.two_part['dim']}-d ones; {_FIX}")
        for task in C.SCORER_OUTPUTS:
            if C.SCORER_OUTPUTS[task] in self.two_part.get("scorer_outputs", []) and table.features(task) is None:
                raise RuntimeArtifactError(f"{self.items_dir} version {table.version} lacks the {task} tower "
                                           f"features the scorer needs; {_FIX}")
        space = self._explain_space_vectors(table)
        retriever = self._retriever(table)
        return Catalog(ids=table.ids, index=table.index, popularity=np.asarray(table.popularity, dtype=np.float64),
                       version=table.version, table=table, retriever=retriever, active=np.asarray(table.active),
                       explain_vectors=space, explain_inv_norm=_inverse_norms(space))

    def _explain_space_vectors(self, table: ItemTable) -> np.ndarray:
        """The vectors explain=True compares: the item vectors, or the table's teacher text vectors."""
        if self.explain_space == "item":
            return table.vectors
        text = table.features("text")
        if text is None:
            raise RuntimeArtifactError(
                f"explain_space='text' compares the teacher text vectors (text.npy), but {self.items_dir} version "
                f"{table.version} has none (the student was trained without item text vectors); use "
                f"explain_space='item'")
        return text

    # ------------------------------------------------------------------------------------------ query encoder
    def _load_query_encoder(self):
        """The export's query encoder (onnx/query/), or None when the export has none or serves one graph
        (queries steer the two-part user vector). A broken folder raises RuntimeArtifactError, a missing
        `tokenizers` ImportError: both name the fix."""
        from export.query_encoder import QUERY_DIR, QueryEncoder  # it imports this module: not at the top
        folder = self.folder / QUERY_DIR
        if self.mode != "two_part" or not folder.is_dir():
            return None
        return QueryEncoder.load(folder, expected_dim=int(self.two_part["dim"]))

    @property
    def has_query_encoder(self) -> bool:
        """Whether recommend(query=...) is served (two-part mode and an onnx/query/ folder)."""
        return self.query_encoder is not None

    def _require_query_encoder(self):
        """The loaded QueryEncoder, or a RequestError saying why queries are not served and how to fix it."""
        if self.mode != "two_part":
            raise RequestError("query needs the two-part export (encoder.onnx + item table): this Recommender "
                               "serves the single graph (mode='single'); construct it with mode='auto' or "
                               "mode='two_part'")
        if self.query_encoder is None:
            from export.query_encoder import BUILD_HINT, QUERY_DIR
            folder = self.folder / QUERY_DIR
            if folder.is_dir():
                raise RequestError(f"the query encoder in {folder} is not loaded (this Recommender was built with "
                                   f"use_query_encoder=False); build it with use_query_encoder=True to serve "
                                   f"queries, or send the request without a query")
            raise RequestError(f"this export has no query encoder ({folder} is missing); {BUILD_HINT}; or send "
                               f"the request without a query")
        return self.query_encoder

    def encode_query(self, text) -> np.ndarray:
        """q_hat of a query: float32 [d], unit length; recommend(query=text) adds query_encoder.weight * q_hat
        to the user vector. RequestError for a bad query, or when queries are not served."""
        return self._require_query_encoder().encode(text)

    def _query_shifts(self, queries, b: int) -> list[Optional[np.ndarray]]:
        """One optional query per history -> w * q_hat per row (None: no query for that row)."""
        if queries is None:
            return [None] * b
        if isinstance(queries, (str, bytes)) or not isinstance(queries, (Sequence, np.ndarray)):
            raise RequestError(f"queries must be a list with one query (a string, or null for none) per history "
                               f"({b}), got {type(queries).__name__}; for one history use recommend(query=...)")
        if len(queries) != b:
            raise RequestError(f"queries holds {len(queries)} entries for {b} histories: pass one query (a string, "
                               f"or null for none) per history")
        if all(q is None for q in queries):
            return [None] * b
        enc = self._require_query_encoder()
        out: list[Optional[np.ndarray]] = []
        for row, text in enumerate(queries):
            if text is None:
                out.append(None)
                continue
            try:
                out.append(enc.weight * enc.encode(text))
            except RequestError as e:
                if b > 1:
                    raise RequestError(f"queries[{row}]: {e}") from None
                raise
        return out

    # ------------------------------------------------------------------------------------------ loading
    @property
    def variants(self) -> dict:
        """The served mode's variants {name: {"file", "precision", "gpu_only"}}: runtime.json "two_part"
        "variants" (encoder files) or "variants" (single-graph files; fp32 only for older exports)."""
        if getattr(self, "mode", "single") == "two_part":
            return dict(self.meta["two_part"].get("variants") or
                        {"fp32": {"file": C.ENCODER_FILE, "precision": "fp32", "gpu_only": False}})
        v = self.meta.get("variants")
        if isinstance(v, dict) and v:
            return v
        return {"fp32": {"file": self.meta.get("model_file", C.STUDENT_FILE), "precision": "fp32", "gpu_only": False}}

    def _pick_model(self, model_file, variant) -> tuple[Optional[str], Optional[str], str]:
        """-> (variant name or None, precision or None, file name)."""
        variants = self.variants
        if variant is not None:
            if variant not in variants:
                raise RuntimeArtifactError(f"variant {variant!r} is not in {self.folder / C.RUNTIME_META_FILE} "
                                           f"(available: {sorted(variants)}); a variant that failed its parity "
                                           f"check is not listed, see parity.json; {_FIX}")
            v = variants[variant]
            return variant, v.get("precision"), str(v["file"])
        default = self.variants.get("fp32", {}).get("file") if self.mode == "two_part" else None
        name = model_file or default or self.meta.get("model_file", C.STUDENT_FILE)
        if Path(name).name != name:
            raise ValueError(f"model_file must be a file name inside {self.folder}, got {name!r}")
        for k, v in variants.items():
            if v.get("file") == name:
                return k, v.get("precision"), name
        return None, None, name

    @staticmethod
    def _load_meta(path: Path) -> dict:
        if not path.is_file():
            raise RuntimeArtifactError(f"{path} is missing; {_FIX}")
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RuntimeArtifactError(f"{path} is corrupt ({e}); {_FIX}") from e
        if not isinstance(meta, dict):
            raise RuntimeArtifactError(f"{path} is corrupt (not a JSON object); {_FIX}")
        if meta.get("schema_version") not in C.READ_SCHEMA_VERSIONS:
            raise RuntimeArtifactError(f"{path} has schema_version={meta.get('schema_version')!r}, this runtime "
                                       f"reads {list(C.READ_SCHEMA_VERSIONS)}; {_FIX}")
        missing = [k for k in _REQUIRED if k not in meta]
        if missing:
            raise RuntimeArtifactError(f"{path} lacks {missing}; {_FIX}")
        if not isinstance(meta["item_ids"], list) or len(meta["item_ids"]) != meta["n_items"] \
                or C.SCORES_OUTPUT not in meta["outputs"]:
            raise RuntimeArtifactError(f"{path} is inconsistent (item_ids vs n_items, or no next_item_scores "
                                       f"output); {_FIX}")
        return meta

    def _fp16_refusal(self, where: str, record: dict) -> UnsupportedProviderError:
        return UnsupportedProviderError(
            f"{self.model_path.name} is the FP16 variant, which is GPU-only, but onnxruntime {where} "
            f"CPUExecutionProvider (requested {record.get('requested')}, available in this build "
            f"{record.get('available')}). Fused FP16 graphs have crashed onnxruntime's CPU provider, so the "
            f"runtime refuses it: on CPU serve student.onnx, student.opt.onnx or student.int8.onnx "
            f"(variant='fp32' / 'opt' / 'int8'); for FP16 use providers=['tensorrt', 'cuda'] with "
            f"onnxruntime-gpu on a machine with a working GPU.")

    def _make_session(self, path: Path, input_names: list, output_names: list, providers, intra_op_threads: int,
                      strict: bool, trt_profile, trt_cache_root, main: bool = True):
        """An InferenceSession for `path` with the provider chain; `main` is the served model (its precision and
        provider record are the Recommender's), else a helper graph (the scorer) on the same providers."""
        if not path.is_file():
            raise RuntimeArtifactError(f"{path} is missing; {_FIX}")
        wanted = list(providers or self.meta.get("providers") or [CPU])
        cache = trt_cache_dir(path, trt_cache_root) if _wants_tensorrt(wanted) else None
        chosen, record = build_providers(wanted, cache_dir=cache, max_history=self.max_history, profile=trt_profile)
        if main:
            self.trt_cache = Path(record["trt_cache"]) if record.get("trt_cache") else None
        if main and self.precision == "fp16" and [_provider_name(p) for p in chosen] == [CPU]:
            raise self._fp16_refusal("can only run it on", record)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads)  # explicit, see default_intra_op_threads
        try:
            sess, record = create_session(path, chosen, record, sess_options=opts, what=str(path))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise RuntimeArtifactError(f"{path} cannot be loaded by onnxruntime {ort.__version__} "
                                       f"({type(e).__name__}: {str(e).strip()[:300]}); {_FIX}") from e
        if main and self.precision is None:  # a file runtime.json does not list: the export stamps its precision
            meta = sess.get_modelmeta().custom_metadata_map or {}
            self.precision = meta.get(C.META_PRECISION)
        if main and self.precision == "fp16" and record["actual"][0] == CPU:
            raise self._fp16_refusal("fell back to", record)
        if strict and record["fallback"]:
            raise UnsupportedProviderError(record["fallback_warning"])
        ins = [i.name for i in sess.get_inputs()]
        outs = [o.name for o in sess.get_outputs()]
        if ins != list(input_names) or outs != list(output_names):
            raise RuntimeArtifactError(f"{path} has inputs {ins} / outputs {outs}; runtime.json expects "
                                       f"{list(input_names)} / {list(output_names)}; {_FIX}")
        return sess, record

    # ------------------------------------------------------------------------------------------ encoding
    def _check_history(self, history, what: str = "history") -> list:
        if isinstance(history, np.ndarray):
            if history.ndim != 1:
                raise RequestError(f"{what} must be a 1-D sequence of item ids, got an array of shape {history.shape}")
            history = history.tolist()
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            raise RequestError(f"{what} must be a list/sequence of item ids, got {type(history).__name__}")
        return list(history)

    def _to_key(self, x) -> str:
        if isinstance(x, str):
            return x
        if isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_)):
            return str(int(x))
        raise RequestError(f"item ids must be str (or int), got {type(x).__name__} {x!r}")

    def _lookup(self, ids: list, what: str, allow_drop: bool, cat: Optional[Catalog] = None) -> tuple[list[int], list[int]]:
        """-> (internal ids, positions kept). Unknown ids raise (or are dropped when configured)."""
        cat = cat or self._catalog
        # fast path: every id a str (JSON strings); ints and bad types go through _to_key
        keys = ids if all(type(x) is str for x in ids) else [self._to_key(x) for x in ids]
        out, kept, unknown = [], [], []
        index = cat.index
        for pos, k in enumerate(keys):
            i = index.get(k)
            if i is None:
                unknown.append(k)
            else:
                out.append(i)
                kept.append(pos)
        if unknown and not (allow_drop and self.unknown_items == "drop"):
            shown = ", ".join(repr(u) for u in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            hint = " (or construct the Recommender with unknown_items='drop')" if allow_drop else ""
            raise RequestError(f"{len(unknown)} unknown item id(s) in {what}: {shown}; the catalog has "
                             f"{cat.n_items} items{hint}")
        return out, kept

    def _check_ratings(self, ratings, n: int, what: str) -> np.ndarray:
        if ratings is None:
            return np.zeros(n, dtype=np.float32)
        if isinstance(ratings, np.ndarray):
            if ratings.ndim != 1 or not (np.issubdtype(ratings.dtype, np.integer)
                                         or np.issubdtype(ratings.dtype, np.floating)):
                raise RequestError(f"{what} ratings must be a 1-D numeric array, got dtype {ratings.dtype} "
                                 f"shape {ratings.shape}")
            vals = ratings.astype(np.float64)
        else:
            if isinstance(ratings, (str, bytes)) or not isinstance(ratings, Sequence):
                raise RequestError(f"{what} ratings must be a list of numbers, got {type(ratings).__name__}")
            ratings = list(ratings)
            # fast path: plain ints / floats (what JSON gives); the ABC checks cost ~1 us per rating
            if not all(type(r) is float or type(r) is int for r in ratings):
                for r in ratings:
                    if isinstance(r, (bool, np.bool_)) or not isinstance(r, (numbers.Real, np.number)):
                        raise RequestError(f"{what} ratings must be numbers, got {type(r).__name__} {r!r}")
            vals = np.asarray(ratings, dtype=np.float64)
        if vals.shape[0] != n:
            raise RequestError(f"{what}: {vals.shape[0]} ratings for {n} history items; pass one rating per item")
        if not np.all(np.isfinite(vals)):
            raise RequestError(f"{what} ratings contain NaN/inf: {vals[~np.isfinite(vals)].tolist()[:10]}")
        lo, hi = self.rating_range
        bad = (vals != 0) & ((vals < lo) | (vals > hi))
        if bad.any():
            raise RequestError(f"{what} ratings must lie in [{lo}, {hi}] (0 = unknown); got {vals[bad].tolist()[:10]}")
        return vals.astype(np.float32)

    def _prepare(self, histories, ratings, cat: Optional[Catalog] = None) -> tuple[list[list[int]], list[np.ndarray], list[set]]:
        """Validate a batch: -> (truncated internal histories, their ratings, full seen sets)."""
        if isinstance(histories, (str, bytes)) or not isinstance(histories, (Sequence, np.ndarray)):
            raise RequestError(f"histories must be a list of histories, got {type(histories).__name__}")
        histories = list(histories)
        if not histories:
            raise RequestError("histories is empty: pass at least one history")
        if ratings is not None:
            if isinstance(ratings, (str, bytes)) or not isinstance(ratings, (Sequence, np.ndarray)):
                raise RequestError(f"ratings must be a list (one per history), got {type(ratings).__name__}")
            ratings = list(ratings)
            if len(ratings) != len(histories):
                raise RequestError(f"{len(ratings)} rating lists for {len(histories)} histories")
        items, rates, seen = [], [], []
        for row, h in enumerate(histories):
            what = f"history[{row}]" if len(histories) > 1 else "history"
            h = self._check_history(h, what)
            r = self._check_ratings(None if ratings is None else ratings[row], len(h), what)
            if not self.uses_ratings and np.any(r != 0):
                field = f"ratings[{row}]" if len(histories) > 1 else "ratings"
                raise RequestError(f"{field}: this model does not use ratings (it was trained on data without "
                                   f"ratings, tasks={self.tasks}), so they would only distort the answer; send "
                                   f"the history without ratings (or with 0 = unknown)")
            ids, kept = self._lookup(h, what, allow_drop=True, cat=cat)
            r = r[kept]
            seen.append(set(ids))
            items.append(ids[-self.max_history:])
            rates.append(r[-self.max_history:] if ids else r)
        return items, rates, seen

    def encode_histories(self, histories, ratings=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw-id histories -> left-padded (items int64 [B, L], ratings float32 [B, L], length int64 [B]).

        L is the batch's longest (truncated) history, at least 1; padding is item 0 / rating 0.
        """
        items, rates, _ = self._prepare(histories, ratings)
        return self._pad(items, rates)

    def _pad(self, items: list[list[int]], rates: list[np.ndarray]):
        b = len(items)
        L = max(1, max(len(h) for h in items))
        arr_i = np.zeros((b, L), dtype=np.int64)
        arr_r = np.zeros((b, L), dtype=np.float32)
        length = np.zeros(b, dtype=np.int64)
        for row, (h, r) in enumerate(zip(items, rates)):
            n = len(h)
            length[row] = n
            if n:
                arr_i[row, L - n:] = h
                arr_r[row, L - n:] = r
        return arr_i, arr_r, length

    # ------------------------------------------------------------------------------------------ low level
    @staticmethod
    def _int_array(x, name: str) -> np.ndarray:
        a = np.asarray(x)
        if a.dtype.kind not in "iu":
            raise RequestError(f"{name} must hold integers (int64 ids / lengths), got dtype {a.dtype}")
        return np.ascontiguousarray(a, dtype=np.int64)

    def _check_arrays(self, history_items, history_ratings, history_length, candidates, n_items: int):
        """Validated, contiguous (items, ratings, length, candidates) cut to max_history."""
        items = self._int_array(history_items, "history_items")
        length = self._int_array(history_length, "history_length")
        r = np.asarray(history_ratings)
        if r.dtype.kind not in "iuf":
            raise RequestError(f"history_ratings must be numeric, got dtype {r.dtype}")
        rates = np.ascontiguousarray(r, dtype=np.float32)
        if items.ndim != 2 or rates.shape != items.shape or length.shape != (items.shape[0],):
            raise RequestError(f"expected history_items/history_ratings [B, L] and history_length [B]; got "
                             f"{items.shape}, {rates.shape}, {length.shape}")
        b, L = items.shape
        if b < 1 or L < 1:
            raise RequestError(f"batch and history axes must be >= 1 (pad an empty history to length 1 with "
                             f"history_length 0); got {items.shape}")
        if not np.all(np.isfinite(rates)):
            raise RequestError("history_ratings contain NaN/inf")
        if candidates is None:
            candidates = np.zeros((b, 1), dtype=np.int64)
        cand = self._int_array(candidates, "candidates")
        if cand.ndim != 2 or cand.shape[0] != b or cand.shape[1] < 1:
            raise RequestError(f"candidates must be [B={b}, C>=1], got {cand.shape}")
        if length.min() < 0 or length.max() > L:
            raise RequestError(f"history_length must lie in [0, {L}], got {length.tolist()}")
        for name, a in (("history_items", items), ("candidates", cand)):
            if a.min() < 0 or a.max() >= n_items:
                raise RequestError(f"{name} holds ids outside [0, {n_items})")
        if L > self.max_history:
            items = np.ascontiguousarray(items[:, -self.max_history:])
            rates = np.ascontiguousarray(rates[:, -self.max_history:])
            length = np.minimum(length, self.max_history)
        return items, rates, length, cand

    def predict_arrays(self, history_items, history_ratings, history_length, candidates=None) -> dict:
        """Internal, already LEFT-padded arrays -> the single graph's outputs {output name: array}:
        next_item_scores [B, n_items] (every row of the catalog, removed items included) and rating /
        like_logit [B, C] for the candidates. Two-part: encoder + one matmul over the item table + scorer.

        A history axis longer than max_history keeps its last max_history columns (the most recent items) and
        lengths are capped accordingly, as the model's position table holds max_history slots."""
        cat = self._catalog
        items, rates, length, cand = self._check_arrays(history_items, history_ratings, history_length,
                                                        candidates, cat.n_items)
        if self.mode == "single":
            feed = {"history_items": items, "history_ratings": rates, "history_length": length, "candidates": cand}
            return dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        enc = self._encode(cat, items, rates, length)
        user = enc[C.ENCODER_OUTPUTS["next_item"]]
        out = {C.SCORES_OUTPUT: user @ cat.table.vectors.T + cat.table.bias}
        out.update(self._score_candidates(cat, enc, cand))
        return out

    def _encode(self, cat: Catalog, items: np.ndarray, rates: np.ndarray, length: np.ndarray) -> dict:
        """Two-part: gather the history's item vectors from the table and run the encoder."""
        feed = {"history_vectors": np.ascontiguousarray(cat.table.vectors[items]), "history_ratings": rates,
                "history_length": length}
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))

    def _score_candidates(self, cat: Catalog, enc: dict, cand: np.ndarray) -> dict:
        """Two-part rating / like: the scorer graph on the user's tower features and the candidates' rows."""
        if self.scorer is None:
            return {}
        feed = {}
        for task, (user, items) in C.SCORER_INPUTS.items():
            if user in self.two_part["scorer_inputs"]:
                feed[user] = enc[C.ENCODER_OUTPUTS[task]]
                feed[items] = np.ascontiguousarray(cat.table.features(task)[cand])
        names = list(self.two_part["scorer_outputs"])
        return dict(zip(names, self.scorer.run(names, feed)))

    # ------------------------------------------------------------------------------------------ recommend
    def _check_k(self, k) -> int:
        k = self.top_k if k is None else k
        if isinstance(k, bool) or not isinstance(k, (numbers.Integral, np.integer)) or k <= 0:
            raise RequestError(f"k must be a positive int, got {k!r}")
        return int(k)

    def _id_lists(self, lists, b: int, what: str, cat: Catalog) -> list[Optional[set]]:
        """One optional id list per history -> sets of internal ids (ids outside the catalog are ignored)."""
        if lists is None:
            return [None] * b
        if isinstance(lists, (str, bytes)) or not isinstance(lists, (Sequence, np.ndarray)) or len(lists) != b:
            raise RequestError(f"{what} must be a list with one id list per history ({b}); an entry may be null")
        out = []
        for row, ids in enumerate(lists):
            if ids is None:
                out.append(None)
                continue
            ids = self._check_history(ids, f"{what}[{row}]")
            out.append({cat.index[k] for k in map(self._to_key, ids) if k in cat.index})
        return out

    def _rank_scores(self, cat: Catalog, scores: np.ndarray, banned: set, allow: Optional[set], k: int):
        """Exact top-k of a full score row (single graph, popularity): banned, inactive and (with an allow
        list) everything outside it are removed before the top-k."""
        if cat.active is not None and cat.n_active < cat.n_items:
            banned = banned | set(np.flatnonzero(~cat.active).tolist())
        if allow is not None:
            cand = np.array(sorted(allow - banned), dtype=np.int64)
            order = top_k_indices(scores[cand], k) if cand.size else np.empty(0, dtype=np.int64)
            return [(cat.ids[i], float(scores[i])) for i in cand[order]]
        return [(cat.ids[i], float(scores[i])) for i in top_k_indices(scores, k, banned)]

    def recommend_batch(self, histories, ratings=None, k: Optional[int] = None, exclude_seen: bool = True,
                        exclude=None, allow=None, queries=None, explain: bool = False) -> list[list[tuple]]:
        """Top-k (item id, score) per history, one encoder call for the batch.

        `exclude` (deny list): None or one list of ids (or None) per history, removed besides the seen items.
        `allow` (allow list): None or one list of ids (or None) per history: only those may be recommended.
        Both are applied before the top-k (never by filtering a short list), as are removed items. Empty
        histories raise unless empty_history='popularity' (then: most popular eligible items, and the model
        runs only on the other rows). Fewer than k items come back when fewer than k are eligible.

        `queries` (two-part, needs the query encoder): None or one string (or None) per history; a row with a
        query is ranked by (u + w q_hat) @ v_i + b_i (an empty history: u = 0), and its scores are those.
        `explain=True` (two-part): each item comes as (id, score, because), `because` = up to explain_k
        (history id, cosine similarity) pairs, most similar first (see _explain_row)."""
        k = self._check_k(k)
        explain = self._check_explain(explain)
        cat = self._catalog
        items, rates, seen = self._prepare(histories, ratings, cat)
        b = len(items)
        excl = self._id_lists(exclude, b, "exclude", cat)
        allowed = self._id_lists(allow, b, "allow", cat)
        shifts = self._query_shifts(queries, b)
        empty = [row for row, h in enumerate(items) if not h]
        if empty and self.empty_history != "popularity":
            raise RequestError(f"empty history at row(s) {empty[:20]} (after dropping unknown ids); pass at least "
                             f"one known item or construct the Recommender with empty_history='popularity'")
        banned = [(seen[r] if exclude_seen else set()) | (excl[r] or set()) for r in range(b)]
        results: list[list[tuple]] = [[] for _ in items]
        # rows the model ranks: a known history, or (two-part) a query alone
        ranked = [row for row in range(b) if items[row] or shifts[row] is not None]
        if ranked and self.mode == "single":
            arr_i, arr_r, length = self._pad([items[r] for r in ranked], [rates[r] for r in ranked])
            scores = self.predict_arrays(arr_i, arr_r, length)[C.SCORES_OUTPUT]
            for j, row in enumerate(ranked):
                results[row] = self._rank_scores(cat, scores[j], banned[row], allowed[row], k)
        elif ranked:
            users = self._user_vectors(cat, items, rates, ranked, shifts)
            found = cat.retriever.search(users, k, banned=[banned[r] for r in ranked],
                                         allow=[None if allowed[r] is None else np.fromiter(allowed[r], np.int64)
                                                for r in ranked])
            for j, row in enumerate(ranked):
                ids, vals = found[j]
                results[row] = [(cat.ids[i], float(v)) for i, v in zip(ids.tolist(), vals.tolist())]
        for row in empty:
            if shifts[row] is None:
                results[row] = self._rank_scores(cat, cat.popularity, banned[row], allowed[row], k)
        if explain:
            results = [self._explain_row(cat, items[row], results[row]) for row in range(b)]
        return results

    def recommend(self, history, ratings=None, k: Optional[int] = None, exclude_seen: bool = True,
                  exclude=None, allow=None, query: Optional[str] = None, explain: bool = False) -> list[tuple]:
        """Top-k for one history: recommend_batch with one row (query: one string or None)."""
        return self.recommend_batch([self._check_history(history)], None if ratings is None else [ratings], k,
                                    exclude_seen, None if exclude is None else [exclude],
                                    None if allow is None else [allow], None if query is None else [query],
                                    explain)[0]

    def _user_vectors(self, cat: Catalog, items: list, rates: list, rows: list[int],
                      shifts: list[Optional[np.ndarray]]) -> np.ndarray:
        """float32 [len(rows), d]: each row's encoder user vector (0 for an empty history) plus its query shift
        w * q_hat. Without queries: the encoder output itself (no copy)."""
        live = [j for j, r in enumerate(rows) if items[r]]
        user = None
        if live:
            arr_i, arr_r, length = self._pad([items[rows[j]] for j in live], [rates[rows[j]] for j in live])
            user = self._encode(cat, arr_i, arr_r, length)[C.ENCODER_OUTPUTS["next_item"]]
        if len(live) == len(rows) and all(shifts[r] is None for r in rows):
            return user
        out = np.zeros((len(rows), cat.table.dim), dtype=np.float32)
        if user is not None:
            out[live] = user
        for j, r in enumerate(rows):
            if shifts[r] is not None:
                out[j] += shifts[r]
        return out

    # ------------------------------------------------------------------------------------------ explain
    def _check_explain(self, explain) -> bool:
        if not isinstance(explain, (bool, np.bool_)):
            raise RequestError(f"explain must be true or false, got {type(explain).__name__} {explain!r}")
        if explain and self.mode != "two_part":
            raise RequestError("explain needs the two-part export (its item table holds the vectors it compares): "
                               "this Recommender serves the single graph (mode='single'); construct it with "
                               "mode='auto' or mode='two_part'")
        return bool(explain)

    @staticmethod
    def _explain_history(history: list[int]) -> np.ndarray:
        """The distinct internal ids of a (truncated) history, most recent first: ties in similarity then go
        to the more recent item."""
        return np.fromiter(dict.fromkeys(reversed(history)), dtype=np.int64)  # insertion order = first seen

    def _explain_row(self, cat: Catalog, history: list[int], ranked: list[tuple]) -> list[tuple]:
        """(id, score) pairs -> (id, score, because): because = up to explain_k (history id, cosine) pairs,
        highest first, never the item itself. One [k, L] matmul of the gathered rows, scaled by their inverse
        norms. An empty history (popularity, or a query alone) explains nothing: because = []."""
        hist = self._explain_history(history)
        if not ranked or hist.size == 0:
            return [(i, s, []) for i, s in ranked]
        index = cat.index
        rec_ids = [index[i] for i, _ in ranked]
        k = len(rec_ids)
        rows = np.concatenate([np.array(rec_ids, dtype=np.int64), hist])  # one gather for both sides
        unit = cat.explain_vectors[rows] * cat.explain_inv_norm[rows, None]
        sims = unit[:k] @ unit[k:].T  # cosines [k, L]
        if not set(rec_ids).isdisjoint(history):  # only with exclude_seen=False: never the item itself
            sims[rows[:k, None] == hist[None, :]] = -np.inf
        top = np.argsort(-sims, axis=1, kind="stable")[:, :self.explain_k]
        top_sims = sims[np.arange(k)[:, None], top].tolist()  # one conversion, not one float() per pair
        top_ids = hist[top].tolist()
        ids = cat.ids
        out = []
        for r, (item, score) in enumerate(ranked):
            because = [(ids[h], v) for h, v in zip(top_ids[r], top_sims[r]) if v != -np.inf]
            out.append((item, score, because))
        return out

    # ------------------------------------------------------------------------------------------ score
    def score_batch(self, histories, candidates, ratings=None) -> list[dict[str, np.ndarray]]:
        """rating / like (probability) / like_logit per candidate, for each history (one encoder call).

        With empty_history='popularity', a row whose history is empty (after dropping unknown ids) is answered
        without the model: {"popularity": the candidates' item_popularity} and no rating / like estimate. The
        model runs only on the other rows (not at all when every row is empty)."""
        heads = [t for t in ("rating", "like") if t in self.tasks]
        if not heads:
            raise RequestError(f"this model has no rating/like head (tasks={self.tasks}); only recommend() works")
        cat = self._catalog
        items, rates, _ = self._prepare(histories, ratings, cat)
        if isinstance(candidates, (str, bytes)) or not isinstance(candidates, (Sequence, np.ndarray)) \
                or len(candidates) != len(items):
            raise RequestError(f"candidates must be a list with one id list per history ({len(items)})")
        cand_ids = []
        for row, c in enumerate(candidates):
            what = f"candidates[{row}]" if len(items) > 1 else "candidates"
            c = self._check_history(c, what)
            if not c:
                raise RequestError(f"{what} is empty: pass at least one item to score")
            ids, _ = self._lookup(c, what, allow_drop=False, cat=cat)
            cand_ids.append(ids)
        empty = [row for row, h in enumerate(items) if not h]
        if empty and self.empty_history != "popularity":
            raise RequestError(f"empty history at row(s) {empty[:20]} (after dropping unknown ids); construct the "
                             f"Recommender with empty_history='popularity' to score from an empty history")
        results: list[dict[str, np.ndarray]] = [
            {"popularity": cat.popularity[c].astype(np.float32)} if not items[row] else {}
            for row, c in enumerate(cand_ids)]
        live = [row for row in range(len(items)) if items[row]]
        if not live:
            return results
        arr_i, arr_r, length = self._pad([items[r] for r in live], [rates[r] for r in live])
        width = max(len(cand_ids[r]) for r in live)
        arr_c = np.zeros((len(live), width), dtype=np.int64)
        for j, row in enumerate(live):
            arr_c[j, :len(cand_ids[row])] = cand_ids[row]
        if self.mode == "single":
            out = self.predict_arrays(arr_i, arr_r, length, arr_c)
        else:
            out = self._score_candidates(cat, self._encode(cat, arr_i, arr_r, length), arr_c)
        for j, row in enumerate(live):
            n, res = len(cand_ids[row]), results[row]
            if "rating" in out:
                res["rating"] = out["rating"][j, :n].copy()
            if "like_logit" in out:
                logit = out["like_logit"][j, :n].copy()
                res["like_logit"] = logit
                res["like"] = _sigmoid(logit)
        return results

    def score(self, history, candidates, ratings=None) -> dict[str, np.ndarray]:
        return self.score_batch([self._check_history(history)], [self._check_history(candidates, "candidates")],
                                None if ratings is None else [ratings])[0]

    def __repr__(self) -> str:
        return (f"Recommender({str(self.folder)!r}, mode={self.mode}, n_items={self.n_items}, tasks={self.tasks}, "
                f"providers={self.providers})")
