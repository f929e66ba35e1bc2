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

Errors are JSON `{"detail": "<message>", ...}`: 400 for input the runtime rejects (unknown ids, empty history,
NaN or out-of-range ratings, k <= 0, no rating/like head, batch too large) with the runtime's own message;
422 for a body of the wrong shape or types, with one message naming every bad field. Never a 500 for bad input.

Imports only fastapi / pydantic (+ uvicorn inside `serve`) and export.runtime: no torch. The endpoints are
plain `def`, so FastAPI runs the blocking onnxruntime call in its threadpool; one Recommender (one
InferenceSession, thread-safe) is shared by every request.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from export.runtime import Recommender

__all__ = ["create_app", "serve", "DEFAULT_MAX_BATCH"]

DEFAULT_MAX_BATCH = 1024
"""Largest number of histories one /recommend/batch or /score/batch request may carry."""

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
    """How many items to return (default: runtime.json top_k)."""
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
    """Input the runtime rejected: answered as 400 with the runtime's message."""


def _finite(x) -> Optional[float]:
    """JSON has no NaN/inf: a non-finite score goes out as null instead of crashing the encoder."""
    x = float(x)
    return x if math.isfinite(x) else None


def _items(pairs) -> list[dict]:
    return [{"id": i, "score": _finite(s)} for i, s in pairs]


def _score_out(candidates: list, res: dict) -> dict:
    out: dict[str, Any] = {"candidates": [str(c) for c in candidates]}
    for key in ("rating", "like", "like_logit"):
        if key in res:
            out[key] = [_finite(v) for v in np.asarray(res[key]).tolist()]
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


# ------------------------------------------------------------------------------------------------ app
def create_app(onnx_dir_or_recommender: Union[str, os.PathLike, Recommender], *, providers: Optional[list] = None,
               unknown_items: str = "error", empty_history: str = "error", intra_op_threads: Optional[int] = None,
               model_file: Optional[str] = None, model_name: Optional[str] = None,
               max_batch: int = DEFAULT_MAX_BATCH) -> FastAPI:
    """A FastAPI app serving one Recommender (built here from an onnx folder, or the one given).

    The Recommender options (providers, unknown_items, empty_history, intra_op_threads, model_file) apply only
    when a folder is given. A broken folder raises `RuntimeArtifactError` here, before any port is bound.
    """
    if isinstance(onnx_dir_or_recommender, Recommender):
        rec = onnx_dir_or_recommender
    else:
        rec = Recommender(onnx_dir_or_recommender, providers=providers, unknown_items=unknown_items,
                          empty_history=empty_history, intra_op_threads=intra_op_threads, model_file=model_file)
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
    name = model_name or _model_name(rec)
    provider = rec.providers[0]

    app = FastAPI(title="distillrec", version="1", summary="Recommendations from the distilled student (ONNX)")
    app.state.recommender = rec
    app.state.model_name = name

    @app.exception_handler(RequestValidationError)
    def _on_validation_error(request: Request, exc: RequestValidationError):
        errors = _safe(list(exc.errors()))
        return JSONResponse(status_code=422, content={"detail": _validation_message(errors), "errors": errors})

    @app.exception_handler(_BadRequest)
    def _on_bad_request(request: Request, exc: _BadRequest):
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(Exception)
    def _on_error(request: Request, exc: Exception):  # a bug, not bad input: still answer in JSON
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(exc).__name__}: {exc}"})

    def _tag(body: dict) -> dict:
        body["model"] = name
        body["provider"] = provider
        return body

    def _call(fn, *args, **kwargs):
        # the runtime validates ids / ratings / k / histories and raises ValueError with a precise message
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            raise _BadRequest(str(e)) from e

    def _check_batch(n: int, what: str) -> None:
        if n > max_batch:
            raise _BadRequest(f"{what} holds {n} histories; this service accepts at most max_batch={max_batch} "
                             f"per request (split the batch)")

    @app.post("/recommend")
    def recommend(req: RecommendRequest) -> dict:
        got = _call(rec.recommend, req.history, ratings=req.ratings, k=req.k, exclude_seen=req.exclude_seen,
                            exclude=req.exclude)
        return _tag({"items": _items(got)})

    @app.post("/recommend/batch")
    def recommend_batch(req: RecommendBatchRequest) -> dict:
        _check_batch(len(req.histories), "histories")
        got = _call(rec.recommend_batch, req.histories, ratings=req.ratings, k=req.k, exclude_seen=req.exclude_seen,
                                  exclude=req.exclude)
        return _tag({"results": [{"items": _items(r)} for r in got]})

    @app.post("/score")
    def score(req: ScoreRequest) -> dict:
        got = _call(rec.score, req.history, req.candidates, ratings=req.ratings)
        return _tag(_score_out(req.candidates, got))

    @app.post("/score/batch")
    def score_batch(req: ScoreBatchRequest) -> dict:
        _check_batch(len(req.histories), "histories")
        got = _call(rec.score_batch, req.histories, req.candidates, ratings=req.ratings)
        return _tag({"results": [_score_out(c, r) for c, r in zip(req.candidates, got)]})

    @app.get("/health")
    def health():
        # one real batch-1 inference (an all-padding history): proves the session runs, not just that it loaded
        try:
            out = rec.predict_arrays(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32),
                                     np.zeros(1, np.int64))
            ok = all(np.all(np.isfinite(v)) for v in out.values())
            detail = None if ok else "the model returned non-finite scores for an empty history"
        except Exception as e:  # report, never crash the probe
            ok, detail = False, f"{type(e).__name__}: {e}"
        body = {"status": "ok" if ok else "error", "model": name, "provider": provider,
                "providers": list(rec.providers)}
        if detail:
            body["detail"] = detail
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @app.get("/metadata")
    def metadata() -> dict:
        m = rec.meta
        return {
            "model": name,
            "model_file": rec.model_path.name,
            "schema_version": m.get("schema_version"),
            "n_items": rec.n_items,
            "tasks": list(rec.tasks),
            "max_history": rec.max_history,
            "top_k": rec.top_k,
            "like_threshold": rec.like_threshold,
            "rating_range": list(rec.rating_range),
            "inputs": m.get("inputs"),
            "outputs": list(rec.output_names),
            "data_hash": m.get("data_hash"),
            "opset": m.get("opset"),
            "providers": list(rec.providers),
            "requested_providers": m.get("providers"),
            "unknown_items": rec.unknown_items,
            "empty_history": rec.empty_history,
            "max_batch": max_batch,
        }

    return app


# ------------------------------------------------------------------------------------------------ server
_ENV = "DISTILLREC_SERVE_OPTIONS"


def _app_from_env() -> FastAPI:
    """uvicorn factory for workers > 1 (each worker process builds its own app from the options in env)."""
    import json
    opts = json.loads(os.environ[_ENV])
    return create_app(opts.pop("onnx_dir"), **opts)


def serve(onnx_dir, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, *,
          providers: Optional[list] = None, unknown_items: str = "error", empty_history: str = "error",
          intra_op_threads: Optional[int] = None, model_file: Optional[str] = None,
          max_batch: int = DEFAULT_MAX_BATCH, log_level: str = "info") -> None:
    """Run the service with uvicorn until interrupted (Ctrl-C / SIGTERM).

    workers > 1 starts that many processes, each with its own onnxruntime session; unless intra_op_threads is
    given they split the CPU cores between them instead of each taking all of them.
    """
    import uvicorn

    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    opts = dict(providers=providers, unknown_items=unknown_items, empty_history=empty_history,
                intra_op_threads=intra_op_threads, model_file=model_file, max_batch=max_batch)
    # build once here: a missing / corrupt run folder fails now with its message, before any port is bound
    app = create_app(onnx_dir, **opts)
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    import json
    if intra_op_threads is None:
        opts["intra_op_threads"] = max(1, (os.cpu_count() or 1) // workers)
    del app
    os.environ[_ENV] = json.dumps({"onnx_dir": str(Path(onnx_dir).resolve()), **opts})
    uvicorn.run("export.service:_app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level)
