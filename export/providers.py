"""onnxruntime execution providers: TensorRT -> CUDA -> CPU, with options, fallback detection and a record.

Stdlib + onnxruntime only (the serving runtime imports this module; no torch, no numpy needed).

    providers = build_providers(["tensorrt", "cuda", "cpu"], cache_dir=Path("~/.cache/distillrec/trt/ab12"),
                                max_history=50)
    sess, info = create_session("student.onnx", providers)
    info["actual"]   # what onnxruntime really runs, read back from the session

Names: "tensorrt" / "trt", "cuda", "cpu" (any case) or a full onnxruntime provider name
("CUDAExecutionProvider", ...). A `(name, options)` pair is accepted as is (its options win).
The list is put in priority order TensorRT -> CUDA -> (other GPU/NPU providers, as given) -> CPU, and the
CPU provider is always appended as the last resort.

Why the session is asked afterwards: `onnxruntime-gpu` installed on a machine without a usable GPU (no
driver, wrong CUDA/cuDNN/TensorRT libraries) still LISTS CUDA and TensorRT in
`get_available_providers()`; creating the session then only logs an error and silently runs everything
on CPU. `create_session` compares the first requested provider with `session.get_providers()[0]` and, on
a mismatch, emits a `ProviderFallbackWarning` (warnings + logging) naming both.

TensorRT engine / timing caches go to `cache_dir`, which the caller picks OUTSIDE the model folder (the
runtime: export.runtime.trt_cache_dir). A cache folder that cannot be created is not fatal: TensorRT then
runs without a cache (engines are rebuilt at every start) and a warning says so.

Provider names and their priority are part of the artifact contract (export/contract.py).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from export.contract import CPU, CUDA, TRT  # noqa: F401  (re-exported: P.CPU, P.TRT, ...)
from export.contract import INPUT_AXES
from export.contract import PROVIDER_ALIASES as ALIASES
from export.contract import PROVIDER_PRIORITY as PRIORITY

log = logging.getLogger("distillrec.providers")

# Inputs of the student graph and their axes (export/contract.py).
STUDENT_INPUTS = dict(INPUT_AXES)
# TensorRT optimization profile: min / opt / max size of every dynamic axis. TensorRT builds one engine
# per profile; a request outside [min, max] falls back to building a new engine (slow), so max must
# cover what the service will see. history.max is the model's max_history (the runtime truncates to it).
DEFAULT_PROFILE = {"min": {"batch": 1, "history": 1, "candidates": 1},
                   "opt": {"batch": 32, "history": 50, "candidates": 100},
                   "max": {"batch": 128, "history": None, "candidates": 1000}}

ProviderSpec = Union[str, tuple]


class ProviderFallbackWarning(RuntimeWarning):
    """The provider that serves is not the first one requested."""


def canonical_name(name: str) -> str:
    """'tensorrt' / 'cuda' / 'cpu' or a full onnxruntime provider name -> the full name; ValueError otherwise."""
    import onnxruntime as ort
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"provider names must be non-empty strings, got {name!r}")
    key = name.strip()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    known = set(ort.get_all_providers())
    if key in known:
        return key
    lower = {k.lower(): k for k in known}
    if key.lower() in lower:
        return lower[key.lower()]
    raise ValueError(f"unknown execution provider {name!r}; use one of {sorted(ALIASES)} or a full onnxruntime "
                     f"provider name such as {TRT!r}, {CUDA!r}, {CPU!r}")


def _shape_string(inputs: dict, sizes: dict) -> str:
    return ",".join(f"{name}:" + "x".join(str(int(sizes[a])) for a in axes) for name, axes in inputs.items())


def trt_profile_shapes(max_history: int, profile: Optional[dict] = None,
                       inputs: Optional[dict] = None) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes strings covering EVERY dynamic input (TensorRT needs all or none)."""
    prof = {k: dict(v) for k, v in DEFAULT_PROFILE.items()}
    for k, v in (profile or {}).items():
        if k not in prof:
            raise ValueError(f"profile keys are min/opt/max, got {k!r}")
        prof[k].update(v)
    prof["max"]["history"] = prof["max"]["history"] or int(max_history)
    for axis in ("batch", "history", "candidates"):  # keep min <= opt <= max
        prof["opt"][axis] = min(max(prof["opt"][axis], prof["min"][axis]), prof["max"][axis])
        if prof["min"][axis] < 1 or prof["min"][axis] > prof["max"][axis]:
            raise ValueError(f"TensorRT profile for {axis}: min={prof['min'][axis]} max={prof['max'][axis]}")
    inputs = inputs or STUDENT_INPUTS
    return {f"trt_profile_{k}_shapes": _shape_string(inputs, prof[k]) for k in ("min", "opt", "max")}


def tensorrt_options(cache_dir: Optional[Union[str, Path]], max_history: int, fp16: bool = True,
                     device_id: int = 0, profile: Optional[dict] = None, inputs: Optional[dict] = None,
                     workspace_bytes: Optional[int] = None) -> dict[str, Any]:
    opts: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": bool(fp16)}
    if cache_dir is not None:
        cache = str(Path(cache_dir))
        opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache,
                    trt_timing_cache_enable=True, trt_timing_cache_path=cache)
    if workspace_bytes:
        opts["trt_max_workspace_size"] = int(workspace_bytes)
    opts.update(trt_profile_shapes(max_history, profile, inputs))
    return opts


def cuda_options(device_id: int = 0) -> dict[str, Any]:
    return {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True}


def build_providers(names: Optional[Sequence[ProviderSpec]], cache_dir: Optional[Union[str, Path]] = None,
                    max_history: int = 50, fp16: bool = True, device_id: int = 0,
                    profile: Optional[dict] = None, inputs: Optional[dict] = None,
                    filter_available: bool = True) -> tuple[list, dict]:
    """-> (onnxruntime `providers=` list with options, record).

    record = {"requested": full names in priority order, "available": ..., "dropped": requested but not in
    this onnxruntime build, "chosen": names passed to the session}. Unknown names raise ValueError.
    """
    import onnxruntime as ort
    if isinstance(names, str):
        names = [names]
    names = list(names) if names else [CPU]
    specs: list[tuple[str, Optional[dict]]] = []
    for n in names:
        if isinstance(n, (tuple, list)):
            if len(n) != 2 or not isinstance(n[1], dict):
                raise ValueError(f"a provider with options must be (name, dict), got {n!r}")
            full, opts = canonical_name(n[0]), dict(n[1])
        else:
            full, opts = canonical_name(n), None
        if full not in [s[0] for s in specs]:
            specs.append((full, opts))
    order = {name: i for i, (name, _) in enumerate(specs)}
    specs.sort(key=lambda s: (PRIORITY.get(s[0], 2), order[s[0]]))
    requested = [s[0] for s in specs]
    available = list(ort.get_available_providers())
    out, dropped = [], []
    for full, opts in specs:
        if filter_available and full not in available:
            dropped.append(full)
            continue
        if opts is None:
            if full == TRT:
                opts = tensorrt_options(cache_dir, max_history, fp16, device_id, profile, inputs)
            elif full == CUDA:
                opts = cuda_options(device_id)
        out.append((full, opts) if opts else full)
    if CPU not in [_name(p) for p in out]:
        out.append(CPU)  # the fallback every build has
    record = {"requested": requested, "available": available, "dropped": dropped, "chosen": [_name(p) for p in out],
              "trt_cache": None}
    if TRT in record["chosen"] and cache_dir is not None:
        if _prepare_cache_dir(Path(cache_dir)):
            record["trt_cache"] = str(cache_dir)
        else:
            out = [_without_cache(p, str(cache_dir)) for p in out]
    return out, record


_CACHE_KEYS = ("trt_engine_cache_enable", "trt_engine_cache_path", "trt_timing_cache_enable",
               "trt_timing_cache_path")


def _prepare_cache_dir(path: Path) -> bool:
    """Create the TensorRT cache folder; False (with a warning) when it cannot be created or written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError as e:
        log.warning("TensorRT cache folder %s is not writable (%s: %s): TensorRT runs without an engine cache "
                    "and rebuilds its engines at every start; pass trt_cache_dir= or set $DISTILLREC_TRT_CACHE "
                    "to a writable folder", path, type(e).__name__, e)
        return False


def _without_cache(p, cache: str):
    """Drop the cache options this module set (a caller's own (name, options) pair is left as given)."""
    if isinstance(p, (tuple, list)) and _name(p) == TRT and p[1].get("trt_engine_cache_path") == cache:
        return (p[0], {k: v for k, v in p[1].items() if k not in _CACHE_KEYS})
    return p


def _name(p) -> str:
    return p[0] if isinstance(p, (tuple, list)) else str(p)


def check_fallback(session, requested: Sequence[str], what: str = "model") -> Optional[str]:
    """Compare the first requested provider with the one serving; warn (warnings + logging) on a mismatch.

    Returns the warning text, or None when the first requested provider serves."""
    actual = list(session.get_providers())
    if not requested or not actual or actual[0] == requested[0]:
        return None
    msg = (f"{what}: requested execution provider {requested[0]} (requested order: {list(requested)}) but "
           f"onnxruntime runs {actual[0]} (session providers: {actual}); inference falls back to {actual[0]}. "
           f"Check the onnxruntime flavour (onnxruntime-gpu), the CUDA/cuDNN/TensorRT libraries and the GPU "
           f"driver, or request {actual[0]} explicitly to silence this warning.")
    log.warning(msg)
    warnings.warn(msg, ProviderFallbackWarning, stacklevel=3)
    return msg


def create_session(path: Union[str, Path], providers: list, record: Optional[dict] = None, sess_options=None,
                   what: Optional[str] = None):
    """InferenceSession + the provider record completed with what actually runs (and any fallback warning)."""
    import onnxruntime as ort
    record = dict(record or {"requested": [_name(p) for p in providers]})
    sess = ort.InferenceSession(str(path), sess_options=sess_options, providers=providers)
    record["actual"] = list(sess.get_providers())
    record["fallback_warning"] = check_fallback(sess, record.get("requested") or [], what or str(path))
    record["fallback"] = record["fallback_warning"] is not None
    return sess, record
