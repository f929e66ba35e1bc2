"""HTTP service over the exported student: FastAPI + uvicorn on top of `export.runtime.Recommender`.

    distillrec serve runs/<name>                     # = serve("runs/<name>/onnx")
    curl -s localhost:8000/recommend -H 'content-type: application/json' \\
         -d '{"history": ["50", "172", "133"], "ratings": [5, 4, 3], "k": 5}'

Endpoints (JSON in, JSON out):

    POST /recommend        {history, ratings?, k?, exclude?, exclude_seen?}  -> {items: [{id, score}], model, provider}
    POST /recommend/batch  {histories, ratings?, k?, exclude?, exclude_seen?} -> {results: [{items}], model, provider}
    POST /score            {history, candidates, ratings?}  -> {candidates, rating, like, like_logit, model, provider}
    POST /score/batch      {histories, candidates, ratings?} -> {results: [{candidates, rating, ...}], model, provider}
    GET  /health           -> {status: "ok", provider, providers, model}   (runs one tiny inference)
    GET  /metadata         -> runtime.json without the item list, plus the providers actually running

Errors are JSON `{"detail": "<message>", ...}`: 400 for input the runtime rejects (`export.runtime.RequestError`:
unknown ids, empty history, NaN or out-of-range ratings, ratings sent to a model that does not use them, k <= 0
or above the limit, no rating/like head, batch too large) with the runtime's own message; 422 for a body of the
wrong shape or types, with one message naming every bad field. Any other exception is a server fault: 500 with
`{"detail": "internal error", "request_id": ...}`; the exception and its traceback go to the log under that
request id, never into the response. Never a 500 for bad input.

A recommendation shorter than k (seen + excluded items leave fewer than k of the catalog, or none) carries a
`note` saying so instead of a silently short or empty list.

Imports only fastapi / pydantic (+ uvicorn inside `serve`) and export.runtime: no torch. The endpoints are
plain `def`, so FastAPI runs the blocking onnxruntime call in its threadpool; one Recommender (one
InferenceSession, thread-safe) is shared by every request. `create_app` is three named steps:
`_load_recommender` -> `_Handlers` (the endpoint functions) -> `_install_error_handlers` + `_add_routes`.
Several workers: `serve(workers=N)` hands each worker process a picklable `ServiceSettings` through the app
factory `build_app`; nothing is passed through (or written to) os.environ.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from export.runtime import Recommender, RequestError, default_intra_op_threads

__all__ = ["create_app", "build_app", "serve", "ServiceSettings", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_K"]

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


class RecommendBatchRequest(_Body):
    histories: list[list[ItemId]]
    ratings: Optional[list[Optional[list[Rating]]]] = None
    k: Optional[StrictInt] = None
    exclude: Optional[list[Optional[list[ItemId]]]] = None
    exclude_seen: StrictBool = True


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


def _items(pairs) -> list[dict]:
    return [{"id": i, "score": _finite(s)} for i, s in pairs]


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

    def __post_init__(self):
        _check_limits(max_batch=self.max_batch, max_k=self.max_k)


def _check_limits(**limits) -> None:
    for name, v in limits.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


# ------------------------------------------------------------------------------------------------ handlers
class _Handlers:
    """The endpoint functions over one Recommender: validate the service limits, call the runtime, shape JSON.

    Plain `def` methods: FastAPI runs them in its threadpool (the onnxruntime call blocks)."""

    def __init__(self, rec: Recommender, name: str, max_batch: int, max_k: int):
        self.rec, self.name, self.max_batch = rec, name, max_batch
        self.provider = rec.providers[0]
        self.k_limit = min(max_k, rec.n_items)
        self.max_k = max_k

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

    def _k(self, k: Optional[int]) -> int:
        """The k to serve: the request's (at most the limit) or the model's top_k (cut to the catalog)."""
        if k is None:
            return min(self.rec.top_k, self.k_limit)
        if k > self.k_limit:
            raise _BadRequest(f"k={k} exceeds the limit of {self.k_limit} (the catalog has {self.rec.n_items} "
                              f"items; this service's max_k is {self.max_k}); ask for at most {self.k_limit}")
        return k  # k <= 0 is left to the runtime, which names it

    def _ranked(self, got: list, k: int) -> dict:
        body = {"items": _items(got)}
        note = _shortfall_note(len(got), k, self.rec.n_items)
        if note:
            body["note"] = note
        return body

    # ---- endpoints
    def recommend(self, req: RecommendRequest) -> dict:
        k = self._k(req.k)
        got = self._call(self.rec.recommend, req.history, ratings=req.ratings, k=k, exclude_seen=req.exclude_seen,
                         exclude=req.exclude)
        return self._tag(self._ranked(got, k))

    def recommend_batch(self, req: RecommendBatchRequest) -> dict:
        self._check_batch(len(req.histories), "histories")
        k = self._k(req.k)
        got = self._call(self.rec.recommend_batch, req.histories, ratings=req.ratings, k=k,
                         exclude_seen=req.exclude_seen, exclude=req.exclude)
        return self._tag({"results": [self._ranked(r, k) for r in got]})

    def score(self, req: ScoreRequest) -> dict:
        got = self._call(self.rec.score, req.history, req.candidates, ratings=req.ratings)
        return self._tag(_score_out(req.candidates, got))

    def score_batch(self, req: ScoreBatchRequest) -> dict:
        self._check_batch(len(req.histories), "histories")
        got = self._call(self.rec.score_batch, req.histories, req.candidates, ratings=req.ratings)
        return self._tag({"results": [_score_out(c, r) for c, r in zip(req.candidates, got)]})

    def health(self, request: Request):
        """One real batch-1 inference (an all-padding history): proves the session runs, not just that it loaded."""
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
        return JSONResponse(status_code=200 if ok else 503, content=body)

    def metadata(self) -> dict:
        rec, m = self.rec, self.rec.meta
        return {
            "model": self.name,
            "model_file": rec.model_path.name,
            "schema_version": m.get("schema_version"),
            "n_items": rec.n_items,
            "tasks": list(rec.tasks),
            "uses_ratings": rec.uses_ratings,
            "max_history": rec.max_history,
            "top_k": rec.top_k,
            "max_k": self.k_limit,
            "like_threshold": rec.like_threshold,
            "rating_range": list(rec.rating_range),
            "inputs": m.get("inputs"),
            "outputs": list(rec.output_names),
            "data_hash": m.get("data_hash"),
            "opset": m.get("opset"),
            "providers": list(rec.providers),
            "requested_providers": m.get("providers"),
            "intra_op_threads": rec.intra_op_threads,
            "unknown_items": rec.unknown_items,
            "empty_history": rec.empty_history,
            "max_batch": self.max_batch,
        }


# ------------------------------------------------------------------------------------------------ app steps
def _load_recommender(source: Union[str, os.PathLike, Recommender], options: dict) -> Recommender:
    """Step 1: the Recommender given, or one built from the folder (a broken folder raises here)."""
    if isinstance(source, Recommender):
        return source
    return Recommender(source, **options)


def _install_error_handlers(app: FastAPI) -> None:
    """Step 2: 422 for a malformed body, 400 for rejected input, a generic 500 (logged, never echoed) otherwise."""

    @app.exception_handler(RequestValidationError)
    def _on_validation_error(request: Request, exc: RequestValidationError):
        errors = _safe(list(exc.errors()))
        return JSONResponse(status_code=422, content={"detail": _validation_message(errors), "errors": errors})

    @app.exception_handler(_BadRequest)
    def _on_bad_request(request: Request, exc: _BadRequest):
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(Exception)
    def _on_error(request: Request, exc: Exception):  # a bug or a failing session, not bad input
        rid = _request_id(request)
        log.error("internal error on %s %s (request_id=%s): %s: %s", request.method, request.url.path, rid,
                  type(exc).__name__, exc, exc_info=exc)
        return JSONResponse(status_code=500, content={"detail": "internal error", "request_id": rid},
                            headers={"x-request-id": rid})


def _add_routes(app: FastAPI, h: _Handlers) -> None:
    """Step 3: the six endpoints."""
    app.add_api_route("/recommend", h.recommend, methods=["POST"])
    app.add_api_route("/recommend/batch", h.recommend_batch, methods=["POST"])
    app.add_api_route("/score", h.score, methods=["POST"])
    app.add_api_route("/score/batch", h.score_batch, methods=["POST"])
    app.add_api_route("/health", h.health, methods=["GET"])
    app.add_api_route("/metadata", h.metadata, methods=["GET"])


def create_app(onnx_dir_or_recommender: Union[str, os.PathLike, Recommender], *, providers: Optional[list] = None,
               unknown_items: str = "error", empty_history: str = "error", intra_op_threads: Optional[int] = None,
               model_file: Optional[str] = None, model_name: Optional[str] = None,
               max_batch: int = DEFAULT_MAX_BATCH, max_k: int = DEFAULT_MAX_K,
               trt_cache_root: Optional[str] = None) -> FastAPI:
    """A FastAPI app serving one Recommender (built here from an onnx folder, or the one given).

    The Recommender options (providers, unknown_items, empty_history, intra_op_threads, model_file,
    trt_cache_root) apply only when a folder is given. A broken folder raises `RuntimeArtifactError` here,
    before any port is bound; a bad max_batch / max_k raises ValueError.
    """
    _check_limits(max_batch=max_batch, max_k=max_k)
    options = dict(providers=None if providers is None else list(providers), unknown_items=unknown_items,
                   empty_history=empty_history, intra_op_threads=intra_op_threads, model_file=model_file,
                   trt_cache_root=trt_cache_root)
    rec = _load_recommender(onnx_dir_or_recommender, options)
    handlers = _Handlers(rec, model_name or _model_name(rec), max_batch, max_k)

    app = FastAPI(title="distillrec", version="1", summary="Recommendations from the distilled student (ONNX)")
    app.state.recommender = rec
    app.state.model_name = handlers.name
    _install_error_handlers(app)
    _add_routes(app, handlers)
    return app


def build_app(settings: ServiceSettings) -> FastAPI:
    """The app factory: what each uvicorn worker process calls (functools.partial(build_app, settings))."""
    opts = asdict(settings)
    folder = opts.pop("folder")
    return create_app(folder, **opts)


# ------------------------------------------------------------------------------------------------ server
def serve(onnx_dir, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, *,
          providers: Optional[list] = None, unknown_items: str = "error", empty_history: str = "error",
          intra_op_threads: Optional[int] = None, model_file: Optional[str] = None,
          max_batch: int = DEFAULT_MAX_BATCH, max_k: int = DEFAULT_MAX_K, trt_cache_root: Optional[str] = None,
          log_level: str = "info") -> None:
    """Run the service with uvicorn until interrupted (Ctrl-C / SIGTERM).

    workers > 1 starts that many processes, each with its own onnxruntime session; unless intra_op_threads is
    given, each takes default_intra_op_threads(workers) threads, so together they do not oversubscribe the
    cores. The settings reach the workers as the arguments of the app factory, not through os.environ.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if intra_op_threads is None and workers > 1:
        intra_op_threads = default_intra_op_threads(workers)
    settings = ServiceSettings(folder=str(Path(onnx_dir).resolve()), providers=None if providers is None
                               else tuple(providers), unknown_items=unknown_items, empty_history=empty_history,
                               intra_op_threads=intra_op_threads, model_file=model_file, max_batch=max_batch,
                               max_k=max_k, trt_cache_root=trt_cache_root)
    # build once here: a missing / corrupt run folder fails now with its message, before any port is bound
    app = build_app(settings)
    if workers == 1:
        import uvicorn
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    del app
    _run_workers(settings, host, port, workers, log_level)


def _run_workers(settings: ServiceSettings, host: str, port: int, workers: int, log_level: str) -> None:
    """uvicorn's multi-process supervisor with the app factory bound to `settings` (pickled to each worker).

    This is what uvicorn.run does for workers > 1, except that uvicorn.run insists on an import string, which
    cannot carry arguments (hence the environment variable this replaces)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(functools.partial(build_app, settings), factory=True, host=host, port=port,
                            workers=workers, log_level=log_level)
    sock = config.bind_socket()
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
