"""HTTP service over the exported student: FastAPI + uvicorn on top of `export.runtime.Recommender`.

    distillrec serve runs/<name>                     # = serve("runs/<name>/onnx")
    curl -s localhost:8000/recommend -H 'content-type: application/json' \\
         -d '{"history": ["50", "172", "133"], "ratings": [5, 4, 3], "k": 5}'

Endpoints (JSON in, JSON out):

    POST /recommend        {history, ratings?, k?, exclude?, exclude_seen?, allow?, query?, explain?}
                           -> {items: [{id, score}], model, provider}
    POST /recommend/batch  {histories, ratings?, k?, exclude?, exclude_seen?, allow?, queries?, explain?}
                           -> {results: [{items}], model, provider}
    POST /score            {history, candidates, ratings?}  -> {candidates, rating, like, like_logit, model, provider}
    POST /score/batch      {histories, candidates, ratings?} -> {results: [{candidates, rating, ...}], model, provider}
    GET  /health           -> {status: "ok", provider, providers, model}   (liveness; runs one tiny inference)
    GET  /ready            -> 200 {status: "ready", ...} once the model + table are loaded and the batcher runs;
                              503 {status: "starting" | "draining"} before the app's startup and during shutdown
    GET  /metadata         -> runtime.json without the item list, plus the providers actually running
    GET  /metrics          -> Prometheus text format 0.0.4 (see `Metrics`)

`allow` (one id list; per history in /recommend/batch) restricts the answer to those ids; `exclude` removes
ids. Ids outside the catalog are ignored in both.

`query` (one string; `queries` in /recommend/batch: one string or null per history) steers the answer with text
through the export's query encoder (onnx/query/, `distillrec query RUN`); without one it is a 400 saying so.
`explain: true` adds to every item `"because": [{"id", "similarity"}, ...]`: the history items most similar to
it (export/runtime.py). Both are two-part features: the single graph answers them with a 400.

Errors are JSON `{"detail": "<message>", ...}`: 400 for input the runtime rejects (`export.runtime.RequestError`:
unknown ids, empty history, NaN or out-of-range ratings, ratings sent to a model that does not use them, k <= 0
or above the limit, no rating/like head, batch too large) with the runtime's own message; 422 for a body of the
wrong shape or types, with one message naming every bad field. 503 with a `Retry-After` header (whole seconds)
when the batching queue is full (see below). Any other exception is a server fault: 500 with
`{"detail": "internal error", "request_id": ...}`; the exception and its traceback go to the log under that
request id, never into the response. Never a 500 for bad input.

A recommendation shorter than k (seen + excluded items leave fewer than k of the catalog, or none) carries a
`note` saying so instead of a silently short or empty list.

Micro-batching (`batching=True`, the default): POST /recommend is an `async` endpoint that parses the body
(orjson, then the same strict pydantic model as before: identical 422 messages), queues the request in a
bounded queue (`max_queue`) and awaits its answer; ONE worker thread (export/batching.py) answers everything
queued with one `recommend_batch` call of up to `batch_max` rows (waiting at most `batch_wait_ms` for more)
and cuts each row to its own k. A full queue is answered at once with 503 + Retry-After: memory never grows
with the load. The batcher lives from the app's startup to its shutdown (the ASGI lifespan; uvicorn runs it,
so does `with TestClient(app)`); a request that arrives while no batcher runs (lifespan not run, or
`batching=False`) is answered unbatched in the threadpool, with the same code. The other endpoints are plain
`def` (FastAPI's threadpool): /recommend/batch is already a batch. The item table's version on disk is
checked every `reload_check_s` (by the batcher thread between batches, or a small watch thread when batching
is off) and `rec.reload()` swaps it in.

Responses are serialized with orjson (numpy scalars included; a non-finite score goes out as null), falling
back to the stdlib json when orjson is not installed.

Imports only fastapi / pydantic / orjson (+ uvicorn inside `serve`), export.runtime and export.batching: no
torch. One Recommender (one InferenceSession, thread-safe) is shared by every request. `create_app` is named
steps: `_load_recommender` -> `_Handlers` (the endpoint functions) -> `_install_error_handlers` +
`_add_routes` + `_MetricsMiddleware`, with `_lifespan` starting and stopping the batcher. Several workers:
`serve(workers=N)` hands each worker process a picklable `ServiceSettings` through the app factory
`build_app`; nothing is passed through (or written to) os.environ. Metrics are per worker process.
"""
from __future__ import annotations

import asyncio
import bisect
import functools
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool

from export.batching import (DEFAULT_BATCH_MAX, DEFAULT_BATCH_WAIT_MS, DEFAULT_MAX_QUEUE, DEFAULT_RELOAD_CHECK_S,
                             BatcherClosed, MicroBatcher, Overloaded, RecommendJob, TableWatcher, WatchThread,
                             recommend_rows, supports_allow)
from export.runtime import Recommender, RequestError, default_intra_op_threads

try:  # the fast encoder; the service still works (slower) without it
    import orjson
except ImportError:  # pragma: no cover - orjson is part of the serve extra
    orjson = None

__all__ = ["create_app", "build_app", "serve", "ServiceSettings", "Metrics", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_K",
           "DEFAULT_MAX_QUEUE", "DEFAULT_BATCH_MAX", "DEFAULT_BATCH_WAIT_MS", "DEFAULT_RELOAD_CHECK_S"]

log = logging.getLogger("distillrec.service")

DEFAULT_MAX_BATCH = 1024
"""Largest number of histories one /recommend/batch or /score/batch request may carry."""
DEFAULT_MAX_K = 1000
"""Largest k a request may ask for (also capped by the catalog size)."""

# ------------------------------------------------------------------------------------------------ schemas
# Strict types: "5" is not a rating and 1.5 / true are not item ids (pydantic's lax mode would coerce them).
ItemId = Union[StrictStr, StrictInt]
Rating = Union[StrictInt, StrictFloat]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Body):
    history: list[ItemId]
    """Raw item ids, oldest first. Longer than max_history: the last max_history are used, all count as seen."""
    ratings: Optional[list[Rating]] = None
    """One per history item, 1..5, or 0 for unknown. Omitted: every rating unknown."""
    k: Optional[StrictInt] = None
    """How many items to return (default: runtime.json top_k); at most min(max_k, catalog size)."""
    exclude: Optional[list[ItemId]] = None
    """Extra ids never to recommend (ids outside the catalog are ignored)."""
    exclude_seen: StrictBool = True
    allow: Optional[list[ItemId]] = None
    """Only these ids may be recommended (ids outside the catalog are ignored); omitted: the whole catalog."""
    query: Optional[StrictStr] = None
    """Text steering the answer (needs the export's query encoder); omitted: the history alone."""
    explain: StrictBool = False
    """Add to each item the history items most similar to it: "because": [{id, similarity}]."""


class RecommendBatchRequest(_Body):
    histories: list[list[ItemId]]
    ratings: Optional[list[Optional[list[Rating]]]] = None
    k: Optional[StrictInt] = None
    exclude: Optional[list[Optional[list[ItemId]]]] = None
    exclude_seen: StrictBool = True
    allow: Optional[list[Optional[list[ItemId]]]] = None
    """One id list (or null = no restriction) per history."""
    queries: Optional[list[Optional[StrictStr]]] = None
    """One query (or null = none) per history."""
    explain: StrictBool = False


class ScoreRequest(_Body):
    history: list[ItemId]
    candidates: list[ItemId]
    ratings: Optional[list[Rating]] = None


class ScoreBatchRequest(_Body):
    histories: list[list[ItemId]]
    candidates: list[list[ItemId]]
    ratings: Optional[list[Optional[list[Rating]]]] = None


# ------------------------------------------------------------------------------------------------ helpers
class _BadRequest(Exception):
    """Input the runtime (RequestError) or the service limits rejected: answered as 400 with that message."""


def _finite(x) -> Optional[float]:
    """JSON has no NaN/inf: a non-finite score goes out as null instead of crashing the encoder."""
    x = float(x)
    return x if math.isfinite(x) else None


def _items(ranked) -> list[dict]:
    """(id, score) pairs, or (id, score, because) triples of an explain=True answer."""
    out = []
    for row in ranked:
        item = {"id": row[0], "score": _finite(row[1])}
        if len(row) > 2:
            item["because"] = [{"id": h, "similarity": _finite(sim)} for h, sim in row[2]]
        out.append(item)
    return out


def _score_out(candidates: list, res: dict) -> dict:
    """source "model", or "popularity" for an empty history under empty_history='popularity' (no rating/like)."""
    out: dict[str, Any] = {"candidates": [str(c) for c in candidates]}
    for key in ("rating", "like", "like_logit", "popularity"):
        if key in res:
            out[key] = [_finite(v) for v in np.asarray(res[key]).tolist()]
    out["source"] = "popularity" if "popularity" in res else "model"
    return out


def _safe(obj):
    """Make a validation error's payload JSON-safe (inputs may hold NaN/inf floats, ctx may hold exceptions)."""
    if isinstance(obj, dict):
        return {str(k): _safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _loc(loc) -> str:
    # ("body", "history", 0, "str") -> "history[0]"; the trailing union-member tag adds nothing for a reader
    parts = [p for p in loc if p != "body"]
    while parts and parts[-1] in ("str", "int", "float", "bool"):
        parts = parts[:-1]
    s = ""
    for p in parts:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s or "body"


def _validation_message(errors: list[dict]) -> str:
    by_loc: dict[str, list] = {}
    for e in errors:
        if e.get("type") == "json_invalid":
            return f"invalid request: the body is not valid JSON ({(e.get('ctx') or {}).get('error', 'decode error')})"
        where = _loc(e.get("loc", ()))
        got = by_loc.setdefault(where, [[], None if e.get("type") == "missing" else e.get("input")])
        if e.get("msg") not in got[0]:  # a union reports one error per member for the same field: merge them
            got[0].append(e.get("msg", "invalid"))
    msgs = []
    for where, (texts, value) in by_loc.items():
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        msgs.append(f"{where}: {' or '.join(texts)} (got {shown})" if value is not None else f"{where}: {texts[0]}")
    return "invalid request: " + "; ".join(msgs[:20]) + (" ..." if len(msgs) > 20 else "")


def _query_encoder_info(rec) -> Optional[dict]:
    """/metadata's summary of the query encoder (None: queries are not served)."""
    enc = getattr(rec, "query_encoder", None)
    if enc is None:
        return None
    return {"weight": enc.weight, "dim": enc.dim, "max_query_chars": enc.max_query_chars,
            "item_table_version": enc.item_table_version, "source": enc.source}


def _model_name(rec: Recommender) -> str:
    folder = Path(rec.folder).resolve()
    run = folder.parent.name if folder.name == "onnx" else folder.name
    return f"{run}/{rec.model_path.name}"


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _request_id(request: Request) -> str:
    """The caller's X-Request-ID when it is a plain token, else a fresh one (it is logged and echoed)."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]


def _shortfall_note(n_got: int, k: int, n_items: int) -> Optional[str]:
    """Why a recommendation holds fewer than k items (None when it holds k)."""
    if n_got >= k:
        return None
    if n_got == 0:
        return (f"no items left to recommend: the seen items (exclude_seen) and `exclude` cover all {n_items} "
                f"catalog items")
    return (f"only {n_got} of the requested k={k} items: the other catalog items ({n_items} in all) are seen "
            f"(exclude_seen) or in `exclude`")


def _dumps(content) -> bytes:
    """orjson: numpy arrays / scalars serialize, NaN and inf become null. Without orjson: the stdlib, with
    numpy scalars converted (the callers already map non-finite scores to null)."""
    if orjson is not None:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(content, default=lambda o: o.item() if isinstance(o, np.generic) else str(o),
                      separators=(",", ":")).encode()


class _JSON(Response):
    """JSON response rendered with orjson (about 20x faster than the stdlib for an answer of 10 items)."""
    media_type = "application/json"

    def render(self, content) -> bytes:
        return _dumps(content)


def _loads(body: bytes):
    """Parse a request body: orjson, or the stdlib for the NaN / Infinity literals orjson refuses (they reach
    the runtime, which names them: a 400, as before). Invalid JSON raises the same 422 FastAPI would."""
    if orjson is not None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        pos, msg = getattr(e, "pos", 0), getattr(e, "msg", str(e))
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": msg}}]) from None


def _parse(model: type, body: bytes):
    """body bytes -> a validated `model`, or RequestValidationError with FastAPI's error list ("body" first in
    each loc), so the 422 answer is the same as when FastAPI validates. Measured: orjson + model_validate costs
    ~15 us for a 50-item history; a hand-written validator saves ~6 us of ~1 ms per request, not worth a
    second copy of the error messages."""
    if not body:  # FastAPI's answer to a missing body
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    data = _loads(body)
    if not isinstance(data, dict):  # FastAPI's wording (model_validate would name the class instead)
        raise RequestValidationError([{"type": "model_attributes_type", "loc": ("body",), "input": data,
                                       "msg": "Input should be a valid dictionary or object to extract fields from"}])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        for err in errors:
            err["loc"] = ("body", *err.get("loc", ()))
        raise RequestValidationError(errors) from None


def _merge_allow(rec, exclude, allow, n: int):
    """For a runtime without `allow`: /recommend/batch's per-history allow lists as extra `exclude` ids."""
    if allow is None:
        return exclude
    if len(allow) != n:
        raise _BadRequest(f"allow must be a list with one id list per history ({n})")
    exclude = list(exclude) if exclude is not None else [None] * n
    if len(exclude) != n:
        return exclude  # the runtime names this mismatch
    out = []
    for ex, al in zip(exclude, allow):
        if al is not None:
            keep = {str(x) for x in al}
            ex = list(ex or []) + [i for i in rec.item_ids if i not in keep]
        out.append(ex)
    return out


# ------------------------------------------------------------------------------------------------ metrics
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Request latency buckets (seconds): 0.5 ms (a batch-1 answer on CPU) to 1 s (anything slower is an outage)."""
_ENDPOINTS = ("/recommend", "/recommend/batch", "/score", "/score/batch", "/health", "/ready", "/metadata",
              "/metrics")
"""Endpoint label values; any other path is counted as "other" (a scan of random URLs must not create series)."""


def _batch_buckets(batch_max: int) -> tuple:
    """Powers of two up to batch_max (and batch_max itself)."""
    out, b = [], 1
    while b < batch_max:
        out.append(b)
        b *= 2
    out.append(batch_max)
    return tuple(out)


class _Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: bucket `le` counts observations <= le)."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot: above every bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, acc = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.bounds, self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{_fmt(b)}"}} {acc}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {_fmt(self.sum)}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


def _fmt(v) -> str:
    """A sample value / bucket bound in the text format (ints as ints, floats by repr, +Inf / NaN spelled)."""
    if isinstance(v, (bool, int)):
        return str(int(v))
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _label(v) -> str:
    """A label value escaped for the text format (backslash, double quote, newline)."""
    return str(v).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


class Metrics:
    """Prometheus text exposition (format 0.0.4), written by hand (no client library), for ONE worker process.

    Every sample carries a `pid` label: with `serve(workers=N)` each process keeps its own counters and a
    scrape of the shared port reaches one of them; aggregating across workers (sum by endpoint, code) is the
    scraper's job. Families:

      distillrec_requests_total{endpoint,code}           counter   answered HTTP requests
      distillrec_request_latency_seconds{endpoint}       histogram time in the app, first byte in to last out
      distillrec_batch_size                              histogram rows per session call of the batcher
      distillrec_queue_depth / distillrec_queue_capacity gauge     requests waiting for the batcher / max_queue
      distillrec_rejected_total                          counter   requests answered 503 because the queue was full
      distillrec_table_version                           gauge     item table version served (0: no table)
      distillrec_reloads_total / distillrec_reload_errors_total  counter  item table swaps / failed reloads
      distillrec_ready                                   gauge     1 while /ready answers 200
    """

    def __init__(self, batch_max: int = DEFAULT_BATCH_MAX):
        self._lock = threading.Lock()  # the event loop and the batcher thread both write
        self.requests: dict[tuple, int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.batch_size = _Histogram(_batch_buckets(batch_max))
        self.rejected = 0
        self.pid = os.getpid()

    def observe_request(self, path: str, code: int, seconds: float) -> None:
        endpoint = path if path in _ENDPOINTS else "other"
        with self._lock:
            key = (endpoint, int(code))
            self.requests[key] = self.requests.get(key, 0) + 1
            hist = self.latency.get(endpoint)
            if hist is None:
                hist = self.latency[endpoint] = _Histogram(LATENCY_BUCKETS)
            hist.observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batch_size.observe(size)

    def count_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def render(self, *, queue_depth: int, queue_capacity: int, table_version: int, reloads: int,
               reload_errors: int, ready: bool) -> str:
        pid = f'pid="{self.pid}"'
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("distillrec_requests_total", "counter", "HTTP requests answered, by endpoint and status code.")
            for (ep, code), n in sorted(self.requests.items()):
                out.append(f'distillrec_requests_total{{endpoint="{_label(ep)}",code="{code}",{pid}}} {n}')
            family("distillrec_request_latency_seconds", "histogram",
                   "Seconds from the request entering the app to the last byte of the answer, by endpoint.")
            for ep, hist in sorted(self.latency.items()):
                out += hist.lines("distillrec_request_latency_seconds", f'endpoint="{_label(ep)}",{pid}')
            family("distillrec_batch_size", "histogram", "Requests answered per session call of the batcher.")
            out += self.batch_size.lines("distillrec_batch_size", pid)
            family("distillrec_rejected_total", "counter", "Requests answered 503 because the queue was full.")
            out.append(f"distillrec_rejected_total{{{pid}}} {self.rejected}")
        for name, kind, help_, v in (
                ("distillrec_queue_depth", "gauge", "Requests waiting for the batcher.", queue_depth),
                ("distillrec_queue_capacity", "gauge", "The batching queue's bound (max_queue).", queue_capacity),
                ("distillrec_table_version", "gauge", "Item table version served (0: the model has no table).",
                 table_version),
                ("distillrec_reloads_total", "counter", "Item table reloads (a new version swapped in).", reloads),
                ("distillrec_reload_errors_total", "counter", "Failed item table checks or reloads.", reload_errors),
                ("distillrec_ready", "gauge", "1 while /ready answers 200.", int(ready))):
            family(name, kind, help_)
            out.append(f"{name}{{{pid}}} {v}")
        return "\n".join(out) + "\n"


class _MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: that costs a task per request): counts each HTTP answer by
    endpoint and status, and times it. An exception escaping the app is counted as the 500 it becomes."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(scope.get("path", ""), status[0], time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class ServiceSettings:
    """Everything one service process needs to build its app; picklable, so `serve(workers=N)` hands it to each
    worker process through the app factory `build_app` (no environment variables)."""

    folder: str
    """The runtime folder (runs/<name>/onnx)."""
    providers: Optional[tuple] = None
    """Execution providers in any order (default: runtime.json "providers"), see export.runtime.Recommender."""
    unknown_items: str = "error"
    """"error": an unknown id is a 400; "drop": unknown ids are left out of the history."""
    empty_history: str = "error"
    """"error": an empty history is a 400; "popularity": answered from item popularity without the model."""
    intra_op_threads: Optional[int] = None
    """onnxruntime intra-op threads per session (None: export.runtime.default_intra_op_threads)."""
    model_file: Optional[str] = None
    """Which model file of the folder to serve (default: runtime.json model_file, student.onnx)."""
    model_name: Optional[str] = None
    """Name reported in every answer (default: <run>/<model file>)."""
    max_batch: int = DEFAULT_MAX_BATCH
    """Most histories per /recommend/batch or /score/batch request."""
    max_k: int = DEFAULT_MAX_K
    """Largest k a request may ask for; the catalog size caps it too."""
    trt_cache_root: Optional[str] = None
    """Root of the TensorRT engine caches (default $DISTILLREC_TRT_CACHE or ~/.cache/distillrec/trt)."""
    batching: bool = True
    """Micro-batch concurrent POST /recommend requests (one worker thread, one session call per batch). False:
    each request runs its own session call in the threadpool (the behaviour before batching)."""
    max_queue: int = DEFAULT_MAX_QUEUE
    """Requests that may wait for the batcher; beyond it, 503 + Retry-After (export.batching.DEFAULT_MAX_QUEUE)."""
    batch_max: int = DEFAULT_BATCH_MAX
    """Most /recommend requests per session call (export.batching.DEFAULT_BATCH_MAX says why 16 on CPU)."""
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    """Extra wait for more requests once the queued ones are taken, only while requests arrive concurrently
    (export.batching.DEFAULT_BATCH_WAIT_MS says why 0.5 ms on CPU)."""
    reload_check_s: Optional[float] = DEFAULT_RELOAD_CHECK_S
    """Seconds between looks at the item table's version on disk (None: never reload)."""
    retrieval: str = "auto"
    """Two-part top-k: "exact", "ann" (faiss) or "auto" (ANN from export.retrieval.ANN_MIN_ITEMS items)."""

    def __post_init__(self):
        _check_limits(max_batch=self.max_batch, max_k=self.max_k)
        if self.retrieval not in ("auto", "exact", "ann"):
            raise ValueError(f"retrieval must be 'auto', 'exact' or 'ann', got {self.retrieval!r}")
        _check_batching(batching=self.batching, max_queue=self.max_queue, batch_max=self.batch_max,
                        batch_wait_ms=self.batch_wait_ms, reload_check_s=self.reload_check_s)


def _check_limits(**limits) -> None:
    for name, v in limits.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_batching(*, batching, max_queue, batch_max, batch_wait_ms, reload_check_s) -> None:
    """The batching settings, each with the fix in its message."""
    if not isinstance(batching, bool):
        raise ValueError(f"batching must be True or False, got {batching!r}")
    _check_limits(max_queue=max_queue, batch_max=batch_max)
    if isinstance(batch_wait_ms, bool) or not isinstance(batch_wait_ms, (int, float)) \
            or not (0 <= batch_wait_ms <= 1000):
        raise ValueError(f"batch_wait_ms must be a number of milliseconds in [0, 1000] (0 = never wait for more "
                         f"requests), got {batch_wait_ms!r}")
    if reload_check_s is not None and (isinstance(reload_check_s, bool) or not isinstance(reload_check_s, (int, float))
                                       or not (0 < reload_check_s < math.inf)):
        raise ValueError(f"reload_check_s must be a positive number of seconds, or None to never reload the item "
                         f"table, got {reload_check_s!r}")


# ------------------------------------------------------------------------------------------------ handlers
class _Handlers:
    """The endpoint functions over one Recommender: validate the service limits, call the runtime, shape JSON.

    POST /recommend is `async`: it queues the request for the batcher (or, with no batcher running, runs it in
    the threadpool) and never blocks the event loop. Every other endpoint is a plain `def` that FastAPI runs in
    its threadpool (the onnxruntime call blocks). `start` / `stop` are the app's lifespan."""

    def __init__(self, rec: Recommender, name: str, max_batch: int, max_k: int, *, batching: bool = True,
                 max_queue: int = DEFAULT_MAX_QUEUE, batch_max: int = DEFAULT_BATCH_MAX,
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
                 reload_check_s: Optional[float] = DEFAULT_RELOAD_CHECK_S):
        self.rec, self.name, self.max_batch = rec, name, max_batch
        self.provider = rec.providers[0]
        self.max_k = max_k
        self.batching, self.max_queue, self.batch_max, self.batch_wait_ms = batching, max_queue, batch_max, \
            batch_wait_ms
        self.native_allow = supports_allow(rec)
        self.metrics = Metrics(batch_max)
        self.watcher = TableWatcher(rec, reload_check_s)
        self.batcher: Optional[MicroBatcher] = None
        self._watch_thread: Optional[WatchThread] = None
        self.state = "starting"  # -> "ready" (startup done) -> "draining" (shutdown) -> "stopped"

    # ---- lifespan
    def start(self) -> None:
        """App startup: the batcher (or, batching off, the table watch thread); then /ready answers 200."""
        if self.batching:
            self.batcher = MicroBatcher(self.rec, max_queue=self.max_queue, max_batch=self.batch_max,
                                        max_wait_ms=self.batch_wait_ms, on_batch=self.metrics.observe_batch,
                                        request_error=RequestError).start()
        # the table watch has its own thread: a reload (loading a table, building an ANN index: up to a minute at
        # 10^6 items) never holds up the batcher; the swap is one assignment that requests in flight do not see
        self._watch_thread = WatchThread(self.watcher)
        self._watch_thread.start()
        self.state = "ready"

    def stop(self, timeout: float = 10.0) -> None:
        """App shutdown: /ready turns 503, queued requests are answered, the worker thread exits."""
        self.state = "draining"
        if self.batcher is not None:
            self.batcher.close(timeout)
        if self._watch_thread is not None:
            self._watch_thread.close(timeout)
        self.state = "stopped"

    @property
    def ready(self) -> bool:
        return self.state == "ready" and (self.batcher is None or self.batcher.running)

    # ---- helpers
    def _tag(self, body: dict) -> dict:
        body["model"] = self.name
        body["provider"] = self.provider
        return body

    @staticmethod
    def _call(fn, *args, **kwargs):
        """The runtime validates ids / ratings / k / histories: its RequestError is the client's fault (400)."""
        try:
            return fn(*args, **kwargs)
        except RequestError as e:
            raise _BadRequest(str(e)) from e

    def _check_batch(self, n: int, what: str) -> None:
        if n > self.max_batch:
            raise _BadRequest(f"{what} holds {n} histories; this service accepts at most max_batch={self.max_batch} "
                              f"per request (split the batch)")

    @property
    def k_limit(self) -> int:
        """The largest k served now: max_k, cut to the live catalog (add-items grows it)."""
        return min(self.max_k, self.rec.n_items)

    def _k(self, k: Optional[int]) -> int:
        """The k to serve: the request's (at most the limit) or the model's top_k (cut to the catalog)."""
        limit = self.k_limit
        if k is None:
            return min(self.rec.top_k, limit)
        if k > limit:
            raise _BadRequest(f"k={k} exceeds the limit of {limit} (the catalog has {self.rec.n_items} "
                              f"items; this service's max_k is {self.max_k}); ask for at most {limit}")
        return k  # k <= 0 is left to the runtime, which names it

    def _ranked(self, got: list, k: int) -> dict:
        body = {"items": _items(got)}
        note = _shortfall_note(len(got), k, self.rec.n_items)
        if note:
            body["note"] = note
        return body

    def _job(self, req: RecommendRequest) -> RecommendJob:
        k = self._k(req.k)
        if k <= 0:  # one call serves the batch with its largest k, so the runtime cannot see this row's k
            raise _BadRequest(f"k must be a positive int, got {k!r}")
        return RecommendJob(history=req.history, ratings=req.ratings, k=k, exclude=req.exclude,
                            exclude_seen=req.exclude_seen, allow=req.allow, query=req.query, explain=req.explain)

    # ---- endpoints
    async def recommend(self, request: Request) -> Response:
        """Parse (orjson + the strict pydantic model), then the batcher; the threadpool when none runs."""
        job = self._job(_parse(RecommendRequest, await request.body()))
        batcher = self.batcher
        try:
            if batcher is not None and batcher.running:
                got = await batcher.recommend(job)
            else:
                got = (await run_in_threadpool(recommend_rows, self.rec, [job], self.native_allow))[0]
        except RequestError as e:
            raise _BadRequest(str(e)) from e
        return _JSON(self._tag(self._ranked(got, job.k)))

    def recommend_batch(self, req: RecommendBatchRequest) -> Response:
        self._check_batch(len(req.histories), "histories")
        k = self._k(req.k)
        kw: dict[str, Any] = {}
        exclude = req.exclude
        if req.allow is not None and self.native_allow:
            kw["allow"] = req.allow
        else:
            exclude = _merge_allow(self.rec, exclude, req.allow, len(req.histories))
        if req.queries is not None:  # only when used: a runtime (wrapper) without queries serves the rest
            kw["queries"] = req.queries
        if req.explain:
            kw["explain"] = True
        got = self._call(self.rec.recommend_batch, req.histories, ratings=req.ratings, k=k,
                         exclude_seen=req.exclude_seen, exclude=exclude, **kw)
        return _JSON(self._tag({"results": [self._ranked(r, k) for r in got]}))

    def score(self, req: ScoreRequest) -> Response:
        got = self._call(self.rec.score, req.history, req.candidates, ratings=req.ratings)
        return _JSON(self._tag(_score_out(req.candidates, got)))

    def score_batch(self, req: ScoreBatchRequest) -> Response:
        self._check_batch(len(req.histories), "histories")
        got = self._call(self.rec.score_batch, req.histories, req.candidates, ratings=req.ratings)
        return _JSON(self._tag({"results": [_score_out(c, r) for c, r in zip(req.candidates, got)]}))

    def health(self, request: Request) -> Response:
        """Liveness: one real batch-1 inference (an all-padding history) proves the session runs, not just that
        it loaded."""
        rec = self.rec
        try:
            out = rec.predict_arrays(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32), np.zeros(1, np.int64))
            ok = all(np.all(np.isfinite(v)) for v in out.values())
            detail = None if ok else "the model returned non-finite scores for an empty history"
        except Exception as e:  # report, never crash the probe; the error text goes to the log only
            rid = _request_id(request)
            log.error("health check inference failed (request_id=%s): %s: %s", rid, type(e).__name__, e,
                      exc_info=e)
            ok, detail = False, f"inference failed; see the service log (request_id {rid})"
        body = {"status": "ok" if ok else "error", "model": self.name, "provider": self.provider,
                "providers": list(rec.providers)}
        if detail:
            body["detail"] = detail
        return _JSON(status_code=200 if ok else 503, content=body)

    async def readiness(self) -> Response:
        """Readiness: 200 once the app started (model + item table loaded, batcher running); 503 while starting
        or draining, so a load balancer sends no traffic to this instance then."""
        body = {"status": "ready" if self.ready else self.state, "model": self.name, "batching": self.batching,
                "table_version": self.watcher.table_version}
        if self.ready:
            body["queue_depth"] = self.batcher.depth if self.batcher is not None else 0
            return _JSON(body)
        body["detail"] = {"starting": "the service has not finished starting (the app's startup has not run)",
                          "draining": "the service is shutting down", "stopped": "the service has shut down"}.get(
            self.state, f"batcher not running (state {self.state})")
        if self.state == "ready":  # the worker thread died: not ready, and say so
            body["status"], body["detail"] = "error", "the batcher thread is not running; see the service log"
        return _JSON(body, status_code=503)

    async def metrics_text(self) -> Response:
        b = self.batcher
        text = self.metrics.render(queue_depth=b.depth if b is not None else 0, queue_capacity=self.max_queue,
                                   table_version=self.watcher.table_version, reloads=self.watcher.reloads,
                                   reload_errors=self.watcher.errors, ready=self.ready)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def metadata(self) -> Response:
        rec, m = self.rec, self.rec.meta
        return _JSON({
            "model": self.name,
            "model_file": rec.model_path.name,
            "schema_version": m.get("schema_version"),
            "mode": getattr(rec, "mode", "single"),
            "n_items": rec.n_items,
            "n_active": rec.catalog.n_active if hasattr(rec, "catalog") else rec.n_items,
            "retrieval": getattr(getattr(getattr(rec, "catalog", None), "retriever", None), "kind", None),
            "tasks": list(rec.tasks),
            "uses_ratings": rec.uses_ratings,
            "max_history": rec.max_history,
            "top_k": rec.top_k,
            "max_k": self.k_limit,
            "like_threshold": rec.like_threshold,
            "rating_range": list(rec.rating_range),
            "inputs": list(getattr(rec, "input_names", [i["name"] for i in m.get("inputs") or []])),
            "outputs": list(rec.output_names),
            "data_hash": m.get("data_hash"),
            "opset": m.get("opset"),
            "providers": list(rec.providers),
            "requested_providers": m.get("providers"),
            "intra_op_threads": rec.intra_op_threads,
            "unknown_items": rec.unknown_items,
            "empty_history": rec.empty_history,
            "max_batch": self.max_batch,
            "table_version": self.watcher.table_version,
            "explain_space": getattr(rec, "explain_space", None),
            "query_encoder": _query_encoder_info(rec),
            "batching": {"enabled": self.batching, "max_queue": self.max_queue, "batch_max": self.batch_max,
                         "batch_wait_ms": self.batch_wait_ms, "reload_check_s": self.watcher.check_s},
        })


# ------------------------------------------------------------------------------------------------ app steps
def _load_recommender(source: Union[str, os.PathLike, Recommender], options: dict) -> Recommender:
    """Step 1: the Recommender given (or any object with its API: a wrapper), or one built from the folder (a
    broken folder raises here)."""
    if isinstance(source, Recommender) or (not isinstance(source, (str, os.PathLike))
                                           and callable(getattr(source, "recommend_batch", None))):
        return source
    return Recommender(source, **options)


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Step 2: 422 for a malformed body, 400 for rejected input, 503 + Retry-After when the queue is full or the
    service is shutting down, a generic 500 (logged, never echoed) otherwise."""

    @app.exception_handler(RequestValidationError)
    def _on_validation_error(request: Request, exc: RequestValidationError):
        errors = _safe(list(exc.errors()))
        return _JSON(status_code=422, content={"detail": _validation_message(errors), "errors": errors})

    @app.exception_handler(_BadRequest)
    def _on_bad_request(request: Request, exc: _BadRequest):
        return _JSON(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(Overloaded)
    def _on_overloaded(request: Request, exc: Overloaded):
        metrics.count_rejected()
        return _JSON(status_code=503, headers={"retry-after": str(exc.retry_after)},
                     content={"detail": str(exc), "retry_after": exc.retry_after, "queue_depth": exc.depth,
                              "max_queue": exc.max_queue})

    @app.exception_handler(BatcherClosed)
    def _on_closed(request: Request, exc: BatcherClosed):
        return _JSON(status_code=503, headers={"retry-after": "1"}, content={"detail": str(exc), "retry_after": 1})

    @app.exception_handler(Exception)
    def _on_error(request: Request, exc: Exception):  # a bug or a failing session, not bad input
        rid = _request_id(request)
        log.error("internal error on %s %s (request_id=%s): %s: %s", request.method, request.url.path, rid,
                  type(exc).__name__, exc, exc_info=exc)
        return _JSON(status_code=500, content={"detail": "internal error", "request_id": rid},
                     headers={"x-request-id": rid})


_RECOMMEND_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": RecommendRequest.model_json_schema()}}}}
"""/recommend parses its own body (orjson): its schema is declared for the OpenAPI page by hand."""


def _add_routes(app: FastAPI, h: _Handlers) -> None:
    """Step 3: the endpoints."""
    app.add_api_route("/recommend", h.recommend, methods=["POST"], openapi_extra=_RECOMMEND_BODY)
    app.add_api_route("/recommend/batch", h.recommend_batch, methods=["POST"])
    app.add_api_route("/score", h.score, methods=["POST"])
    app.add_api_route("/score/batch", h.score_batch, methods=["POST"])
    app.add_api_route("/health", h.health, methods=["GET"])
    app.add_api_route("/ready", h.readiness, methods=["GET"])
    app.add_api_route("/metadata", h.metadata, methods=["GET"])
    app.add_api_route("/metrics", h.metrics_text, methods=["GET"])


def _lifespan(h: _Handlers):
    """Startup starts the batcher (then /ready is 200); shutdown drains it off the event loop (queued requests
    are answered, the worker thread exits) -- uvicorn runs this on SIGTERM after the open requests finished."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        h.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, h.stop)
    return lifespan


def create_app(onnx_dir_or_recommender: Union[str, os.PathLike, Recommender], *, providers: Optional[list] = None,
               unknown_items: str = "error", empty_history: str = "error", intra_op_threads: Optional[int] = None,
               model_file: Optional[str] = None, model_name: Optional[str] = None,
               max_batch: int = DEFAULT_MAX_BATCH, max_k: int = DEFAULT_MAX_K,
               trt_cache_root: Optional[str] = None, batching: bool = True, max_queue: int = DEFAULT_MAX_QUEUE,
               batch_max: int = DEFAULT_BATCH_MAX, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
               reload_check_s: Optional[float] = DEFAULT_RELOAD_CHECK_S, retrieval: str = "auto") -> FastAPI:
    """A FastAPI app serving one Recommender (built here from an onnx folder, or the one given).

    The Recommender options (providers, unknown_items, empty_history, intra_op_threads, model_file,
    trt_cache_root) apply only when a folder is given. A broken folder raises `RuntimeArtifactError` here,
    before any port is bound; a bad max_batch / max_k / batching setting raises ValueError. The batcher starts
    with the app (its lifespan), see the module docstring; ServiceSettings documents each setting.
    """
    _check_limits(max_batch=max_batch, max_k=max_k)
    _check_batching(batching=batching, max_queue=max_queue, batch_max=batch_max, batch_wait_ms=batch_wait_ms,
                    reload_check_s=reload_check_s)
    options = dict(providers=None if providers is None else list(providers), unknown_items=unknown_items,
                   empty_history=empty_history, intra_op_threads=intra_op_threads, model_file=model_file,
                   trt_cache_root=trt_cache_root, retrieval=retrieval)
    rec = _load_recommender(onnx_dir_or_recommender, options)
    handlers = _Handlers(rec, model_name or _model_name(rec), max_batch, max_k, batching=batching,
                         max_queue=max_queue, batch_max=batch_max, batch_wait_ms=batch_wait_ms,
                         reload_check_s=reload_check_s)

    app = FastAPI(title="distillrec", version="1", summary="Recommendations from the distilled student (ONNX)",
                  lifespan=_lifespan(handlers), default_response_class=_JSON)
    app.state.recommender = rec
    app.state.model_name = handlers.name
    app.state.handlers = handlers
    app.state.metrics = handlers.metrics
    _install_error_handlers(app, handlers.metrics)
    _add_routes(app, handlers)
    app.add_middleware(_MetricsMiddleware, metrics=handlers.metrics)
    return app


def build_app(settings: ServiceSettings) -> FastAPI:
    """The app factory: what each uvicorn worker process calls (functools.partial(build_app, settings))."""
    opts = asdict(settings)
    folder = opts.pop("folder")
    return create_app(folder, **opts)


# ------------------------------------------------------------------------------------------------ server
def _uvicorn_options(access_log: bool) -> dict:
    """uvloop + httptools when installed (the fastest event loop and HTTP parser uvicorn has), else asyncio + h11;
    the access log off by default (one log line per request costs more than the answer's JSON)."""
    import importlib.util
    have = lambda m: importlib.util.find_spec(m) is not None  # noqa: E731
    return dict(loop="uvloop" if have("uvloop") else "asyncio", http="httptools" if have("httptools") else "h11",
                access_log=access_log)


def serve(onnx_dir, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, *,
          providers: Optional[list] = None, unknown_items: str = "error", empty_history: str = "error",
          intra_op_threads: Optional[int] = None, model_file: Optional[str] = None,
          max_batch: int = DEFAULT_MAX_BATCH, max_k: int = DEFAULT_MAX_K, trt_cache_root: Optional[str] = None,
          batching: bool = True, max_queue: int = DEFAULT_MAX_QUEUE, batch_max: int = DEFAULT_BATCH_MAX,
          batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, reload_check_s: Optional[float] = DEFAULT_RELOAD_CHECK_S,
          access_log: bool = False, log_level: str = "info", retrieval: str = "auto") -> None:
    """Run the service with uvicorn until interrupted (Ctrl-C / SIGTERM: open requests finish, the batcher
    drains, the process exits).

    workers > 1 starts that many processes, each with its own onnxruntime session, batcher and metrics; unless
    intra_op_threads is given, each takes default_intra_op_threads(workers) threads, so together they do not
    oversubscribe the cores. The settings reach the workers as the arguments of the app factory, not through
    os.environ. uvloop / httptools are used when installed; access_log=False by default.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if intra_op_threads is None and workers > 1:
        intra_op_threads = default_intra_op_threads(workers)
    settings = ServiceSettings(folder=str(Path(onnx_dir).resolve()), providers=None if providers is None
                               else tuple(providers), unknown_items=unknown_items, empty_history=empty_history,
                               intra_op_threads=intra_op_threads, model_file=model_file, max_batch=max_batch,
                               max_k=max_k, trt_cache_root=trt_cache_root, batching=batching, max_queue=max_queue,
                               batch_max=batch_max, batch_wait_ms=batch_wait_ms, reload_check_s=reload_check_s,
                               retrieval=retrieval)
    # build once here: a missing / corrupt run folder fails now with its message, before any port is bound
    app = build_app(settings)
    uv = _uvicorn_options(access_log)
    if workers == 1:
        import uvicorn
        uvicorn.run(app, host=host, port=port, log_level=log_level, **uv)
        return
    del app
    _run_workers(settings, host, port, workers, log_level, uv)


def _run_workers(settings: ServiceSettings, host: str, port: int, workers: int, log_level: str,
                 uv: Optional[dict] = None) -> None:
    """uvicorn's multi-process supervisor with the app factory bound to `settings` (pickled to each worker).

    This is what uvicorn.run does for workers > 1, except that uvicorn.run insists on an import string, which
    cannot carry arguments (hence the environment variable this replaces)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(functools.partial(build_app, settings), factory=True, host=host, port=port,
                            workers=workers, log_level=log_level, **(uv or {}))
    sock = config.bind_socket()
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
