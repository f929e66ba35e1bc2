"""Triton Inference Server model repository for the exported student (onnxruntime backend).

    write_repository("runs/x/onnx", "runs/x/triton")          # CPU instances
    write_repository("runs/x/onnx", "runs/x/triton", gpu=True)  # GPU instances + TensorRT FP16 accelerator

writes

    <out>/<model_name>/config.pbtxt     platform onnxruntime_onnx, max_batch_size, dynamic batching, instances
    <out>/<model_name>/1/model.onnx     a copy of the ONNX model (plus its external-data files, if any)
    <out>/<model_name>/runtime.json     raw item id <-> model index map (Triton passes internal indices)
    <out>/perf_input.json               perf_analyzer --input-data built from real, popular catalog items
    <out>/perf_input_ids.json           the same requests as raw item ids, for people and for checks

The config is derived from the ONNX graph itself, never typed by hand: names, element types and dims.
With max_batch_size > 0 Triton owns the leading batch axis, so `dims` lists the remaining axes (-1 where the
ONNX axis is symbolic). A rank-1 [batch] tensor (history_length) has no axis left; Triton requires a non-empty
`dims`, so it is declared `dims: [1]` with `reshape: { shape: [] }` (Triton model_configuration docs, "Reshape"):
clients send it as [batch, 1] and the backend hands the model [batch].

Dynamic batching concatenates requests along the batch axis and only merges requests whose other dims agree
(Triton's ragged-batching docs). Clients should therefore left-pad every history to max_history (item 0,
rating 0; history_length carries the real length) and send a fixed number of candidates, so that every request
has the same shape and can share a batch. Unpadded requests stay correct, they are just batched less.

Imports numpy + stdlib (+ onnx when installed, else onnxruntime to read the graph): no torch.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from export import contract as C
from export.contract import INPUT_NAMES
from export.runtime import Recommender, RuntimeArtifactError

__all__ = ["write_repository", "write_run_repository", "config_text", "model_config_pb2", "onnx_signature",
           "TritonRepositoryError"]

_ONNX_TO_TRITON = {  # onnx.TensorProto element type -> Triton DataType
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}
_ORT_TO_ONNX = {"tensor(float)": 1, "tensor(uint8)": 2, "tensor(int8)": 3, "tensor(uint16)": 4, "tensor(int16)": 5,
                "tensor(int32)": 6, "tensor(int64)": 7, "tensor(string)": 8, "tensor(bool)": 9,
                "tensor(float16)": 10, "tensor(double)": 11, "tensor(uint32)": 12, "tensor(uint64)": 13,
                "tensor(bfloat16)": 16}
_FIX = "re-run `distillrec export <run>`"


class TritonRepositoryError(RuntimeError):
    """The ONNX model / runtime.json cannot be described to Triton, or the options are inconsistent."""


# ------------------------------------------------------------------------------------------------ graph
def onnx_signature(model_path: Path) -> dict:
    """{"inputs": [(name, onnx elem type, [dim, ...])], "outputs": [...]}; a dim is an int or a str (symbolic)."""
    model_path = Path(model_path)
    if importlib.util.find_spec("onnx") is not None:
        import onnx
        try:
            graph = onnx.load(str(model_path), load_external_data=False).graph
        except Exception as e:
            raise TritonRepositoryError(f"{model_path} cannot be read by onnx ({type(e).__name__}: {e}); {_FIX}") from e

        def sig(values):
            out = []
            for v in values:
                tt = v.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
                out.append((v.name, int(tt.elem_type), dims))
            return out
        init = {i.name for i in graph.initializer}
        return {"inputs": sig([i for i in graph.input if i.name not in init]), "outputs": sig(graph.output)}
    import onnxruntime as ort  # the runtime dependency: no onnx package needed to write a repository
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise TritonRepositoryError(f"{model_path} cannot be loaded ({type(e).__name__}: {e}); {_FIX}") from e

    def sig_ort(values):
        return [(v.name, _ORT_TO_ONNX.get(v.type, 0), [d if isinstance(d, int) else (d or "?") for d in v.shape])
                for v in values]
    return {"inputs": sig_ort(sess.get_inputs()), "outputs": sig_ort(sess.get_outputs())}


def _tensor_entries(sig: list, batched: bool, what: str) -> list[dict]:
    entries = []
    for name, elem, dims in sig:
        dtype = _ONNX_TO_TRITON.get(elem)
        if dtype is None:
            raise TritonRepositoryError(f"{what} {name!r} has ONNX element type {elem}, which Triton cannot carry")
        if not dims:
            raise TritonRepositoryError(f"{what} {name!r} is a scalar; every tensor needs the batch axis first")
        if batched:
            if isinstance(dims[0], int):
                raise TritonRepositoryError(
                    f"{what} {name!r} has a fixed first axis ({dims[0]}); with max_batch_size > 0 Triton needs a "
                    f"dynamic batch axis (use max_batch_size=0 or {_FIX})")
            rest = dims[1:]
        else:
            rest = dims
        entry = {"name": name, "data_type": dtype, "dims": [d if isinstance(d, int) else -1 for d in rest]}
        if not entry["dims"]:  # [batch] only: Triton needs non-empty dims -> [1], reshaped to [] for the model
            entry["dims"], entry["reshape"] = [1], True
        entries.append(entry)
    return entries


# ------------------------------------------------------------------------------------------------ config
def _q(s: str) -> str:
    return json.dumps(str(s))  # a JSON string literal is a valid protobuf text-format string literal


def _dims(d: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(x)) for x in d) + " ]"


def _tensor_block(entries: list[dict]) -> list[str]:
    lines = []
    for j, e in enumerate(entries):
        lines += ["  {", f"    name: {_q(e['name'])}", f"    data_type: {e['data_type']}",
                  f"    dims: {_dims(e['dims'])}"]
        if e.get("reshape"):
            lines.append("    reshape: { shape: [ ] }")
        lines.append("  }," if j < len(entries) - 1 else "  }")
    return lines


def _profile_shapes(sizes: dict) -> dict:
    """{input name: [size of each of its axes]} for the student's inputs (export/contract.py INPUT_AXES)."""
    return {name: [int(sizes[a]) for a in axes] for name, axes in C.INPUT_AXES.items()}


def _profile(shapes: dict) -> str:
    return ",".join(f"{n}:{'x'.join(str(int(x)) for x in s)}" for n, s in shapes.items())


def config_text(inputs: list[dict], outputs: list[dict], *, model_name: str, max_batch_size: int, gpu: bool,
                instances: int, preferred_batch_sizes: Sequence[int], max_queue_delay_us: int,
                max_history: int, max_candidates: int, trt_precision: Optional[str] = "FP16",
                trt_cache_dir: Optional[str] = None, trt_profiles: bool = True, cpu_threads: Optional[int] = None,
                warmup: bool = False) -> str:
    """The config.pbtxt text (protobuf text format of Triton's inference.ModelConfig)."""
    L = ["# generated by distillrec (export/triton.py) from the ONNX graph: do not edit by hand",
         f"name: {_q(model_name)}",
         'platform: "onnxruntime_onnx"',
         'backend: "onnxruntime"',
         f"max_batch_size: {int(max_batch_size)}",
         'default_model_filename: "model.onnx"',
         "input ["] + _tensor_block(inputs) + ["]", "output ["] + _tensor_block(outputs) + ["]"]
    if max_batch_size > 0:
        L += ["dynamic_batching {"]
        if preferred_batch_sizes:
            L += [f"  preferred_batch_size: {_dims(preferred_batch_sizes)}"]
        L += [f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}", "}"]
    L += ["instance_group [", "  {", f"    count: {int(instances)}", f"    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}",
          "  }", "]"]
    if gpu and trt_precision:
        params = [("precision_mode", trt_precision), ("max_workspace_size_bytes", str(1 << 30))]
        if trt_cache_dir:
            params += [("trt_engine_cache_enable", "1"), ("trt_engine_cache_path", trt_cache_dir),
                       ("trt_timing_cache_enable", "1"), ("trt_timing_cache_path", trt_cache_dir)]
        if trt_profiles and max_batch_size > 0:
            # one optimization profile covering every request the config admits (backend-side shapes: [B] for
            # history_length after the reshape); without it TensorRT rebuilds its engine whenever a shape grows
            b, opt_b = int(max_batch_size), int(max(preferred_batch_sizes or [1]))
            lo = _profile_shapes({"batch": 1, "history": 1, "candidates": 1})
            opt = _profile_shapes({"batch": opt_b, "history": max_history, "candidates": 1})
            hi = _profile_shapes({"batch": b, "history": max_history, "candidates": max_candidates})
            params += [("trt_profile_min_shapes", _profile(lo)), ("trt_profile_opt_shapes", _profile(opt)),
                       ("trt_profile_max_shapes", _profile(hi))]
        L += ["optimization {", "  execution_accelerators {", "    gpu_execution_accelerator [", "      {",
              '        name: "tensorrt"']
        L += [f"        parameters {{ key: {_q(k)} value: {_q(v)} }}" for k, v in params]
        L += ["      }", "    ]", "  }", "}"]
    if cpu_threads:
        L += [f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: {_q(str(int(cpu_threads)))} }} }}']
    if warmup:
        # one all-padding request (history_length 0, valid for the model) at load: builds TensorRT engines
        # before the first real request instead of during it
        L += ["model_warmup [", "  {", '    name: "empty_history"', "    batch_size: 1"]
        for e in inputs:
            dims = list(e["dims"])
            if max_batch_size == 0:  # the batch axis is part of dims: one request of batch 1
                dims[0] = 1
            has_history = "history" in C.INPUT_AXES.get(e["name"], ())
            dims = [max_history if d == -1 and has_history else 1 if d == -1 else d for d in dims]
            L += ["    inputs {", f"      key: {_q(e['name'])}", "      value: {",
                  f"        data_type: {e['data_type']}", f"        dims: {_dims(dims)}", "        zero_data: true",
                  "      }", "    }"]
        L += ["  }", "]"]
    return "\n".join(L) + "\n"


def model_config_pb2():
    """Triton's own ModelConfig protobuf module (from the `tritonclient` wheel), or None when not installed.

    `tritonclient.grpc/__init__` imports grpcio; when grpcio is absent the generated model_config_pb2.py is
    loaded straight from the wheel's files (it only needs protobuf).
    """
    try:
        from tritonclient.grpc import model_config_pb2 as mc
        return mc
    except Exception:  # ImportError, or tritonclient's RuntimeError "does not include grpc support"
        pass
    try:
        spec = importlib.util.find_spec("tritonclient")
    except (ImportError, ValueError, AttributeError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    import sys
    name = "_distillrec_triton_model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    mspec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


def parse_config(text: str):
    """Parse config.pbtxt text with Triton's schema -> inference.ModelConfig (raises on any unknown field)."""
    mc = model_config_pb2()
    if mc is None:
        raise ImportError("tritonclient is not installed (pip install --no-deps tritonclient): cannot load "
                          "Triton's model_config schema")
    from google.protobuf import text_format
    return text_format.Parse(text, mc.ModelConfig())


# ------------------------------------------------------------------------------------------------ perf data
def _perf_requests(meta: dict, n_requests: int, n_candidates: int) -> list[dict]:
    """Requests of the most popular items, each padded to max_history (same shape -> dynamic batching merges them).

    Request j: history = popularity ranks [j, j + len_j) (lengths cycle full / half / a quarter / 1),
    ratings cycle 5, 4, 3; candidates = the next n_candidates popular items after that history.
    """
    item_ids = [str(x) for x in meta["item_ids"]]
    n, L = len(item_ids), int(meta["max_history"])
    pop = np.asarray(meta.get("item_popularity") or [0] * n, dtype=np.float64)
    order = np.argsort(-pop, kind="stable")  # most popular first; ties by catalog order
    lengths = [L, max(1, L // 2), max(1, L // 4), 1]
    C = max(1, min(n_candidates, n))
    reqs = []
    for j in range(n_requests):
        length = min(lengths[j % len(lengths)], n)
        start = j % n
        hist = [int(order[(start + t) % n]) for t in range(length)]
        cands = [int(order[(start + length + t) % n]) for t in range(C)]
        ratings = [float(5 - (t % 3)) for t in range(length)]
        reqs.append({"history": hist, "ratings": ratings, "candidates": cands})
    return reqs


def _perf_files(meta: dict, inputs: list[dict], batched: bool, n_requests: int, n_candidates: int):
    L = int(meta["max_history"])
    item_ids = [str(x) for x in meta["item_ids"]]
    data, readable = [], []
    for r in _perf_requests(meta, n_requests, n_candidates):
        k = len(r["history"])
        items = [0] * (L - k) + r["history"]  # left padding, as the runtime does
        rates = [0.0] * (L - k) + r["ratings"]
        tensors = {"history_items": (items, [L]), "history_ratings": (rates, [L]),
                   "history_length": ([k], [1]), "candidates": (r["candidates"], [len(r["candidates"])])}
        if not batched:  # max_batch_size 0: the request shape includes the batch axis explicitly
            tensors = {nm: (v, [1, *s]) if nm != "history_length" else (v, [1]) for nm, (v, s) in tensors.items()}
        data.append({e["name"]: {"content": tensors[e["name"]][0], "shape": tensors[e["name"]][1]} for e in inputs})
        readable.append({"history": [item_ids[i] for i in r["history"]], "ratings": r["ratings"],
                         "candidates": [item_ids[i] for i in r["candidates"]], "history_length": k,
                         "padded_to": L})
    return {"data": data}, {"model_input": "internal indices = positions in runtime.json item_ids",
                            "requests": readable}


# ------------------------------------------------------------------------------------------------ write
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _external_data_files(model_path: Path) -> list[Path]:
    if importlib.util.find_spec("onnx") is None:
        # without onnx, copy the conventional side files if present
        return [p for p in model_path.parent.glob(model_path.name + ".data")]
    import onnx
    model = onnx.load(str(model_path), load_external_data=False)
    files = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for kv in init.external_data:
                if kv.key == "location":
                    files.add(model_path.parent / kv.value)
    return sorted(files)


def write_repository(onnx_dir, out_dir, *, model_name: str = "distillrec_student", max_batch_size: int = 128,
                     gpu: bool = False, instances: int = 1, preferred_batch_sizes: Sequence[int] = (8, 32),
                     max_queue_delay_us: int = 500, model_file: Optional[str] = None, max_candidates: int = 100,
                     trt_precision: Optional[str] = "FP16", trt_cache_dir: Optional[str] = "/tmp/distillrec_trt_cache",
                     trt_profiles: bool = True, cpu_threads: Optional[int] = None, warmup: bool = False,
                     perf_requests: int = 8, perf_candidates: int = 10) -> Path:
    """Write a Triton model repository for the ONNX model in `onnx_dir`; returns `out_dir` (the repository).

    model_file: which ONNX file of the folder to serve (default: runtime.json's model_file, i.e. student.onnx).
    gpu: KIND_GPU instances and a TensorRT execution accelerator (precision trt_precision, engine + timing cache
    in trt_cache_dir inside the container, one optimization profile up to max_batch_size x max_history x
    max_candidates unless trt_profiles=False). warmup: one all-padding request at load time.
    The model folder is replaced atomically (written beside it, then renamed into place).
    """
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    try:
        meta = Recommender._load_meta(onnx_dir / C.RUNTIME_META_FILE)
    except RuntimeArtifactError as e:
        raise TritonRepositoryError(str(e)) from e
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 0:
        raise ValueError(f"max_batch_size must be an int >= 0 (0 = no batching), got {max_batch_size!r}")
    if not isinstance(instances, int) or instances < 1:
        raise ValueError(f"instances must be a positive int, got {instances!r}")
    pref = [int(b) for b in (preferred_batch_sizes or ())]
    if max_batch_size == 0:
        pref = []
    elif any(b < 1 or b > max_batch_size for b in pref):
        raise ValueError(f"preferred_batch_sizes {pref} must lie in [1, max_batch_size={max_batch_size}]")
    if int(max_queue_delay_us) < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if trt_precision not in (None, "FP32", "FP16", "INT8"):
        raise ValueError(f"trt_precision must be FP32, FP16, INT8 or None, got {trt_precision!r}")
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ValueError(f"model_name must be a plain folder name, got {model_name!r}")

    model_path = onnx_dir / (model_file or meta.get("model_file", C.STUDENT_FILE))
    if not model_path.is_file():
        raise TritonRepositoryError(f"{model_path} is missing; {_FIX}")
    sig = onnx_signature(model_path)
    in_names = [s[0] for s in sig["inputs"]]
    out_names = [s[0] for s in sig["outputs"]]
    if in_names != list(INPUT_NAMES) or out_names != list(meta["outputs"]):
        raise TritonRepositoryError(f"{model_path} has inputs {in_names} / outputs {out_names}; runtime.json "
                                    f"expects {list(INPUT_NAMES)} / {meta['outputs']}; {_FIX}")
    batched = max_batch_size > 0
    if batched:
        batch_syms = {s[2][0] for s in sig["inputs"] + sig["outputs"] if s[2]}
        if len(batch_syms) != 1 or isinstance(next(iter(batch_syms)), int):
            raise TritonRepositoryError(f"{model_path}: the first axis of every input/output must be one shared "
                                        f"dynamic batch axis, got {sorted(map(str, batch_syms))}; {_FIX}")
    inputs = _tensor_entries(sig["inputs"], batched, "input")
    outputs = _tensor_entries(sig["outputs"], batched, "output")
    text = config_text(inputs, outputs, model_name=model_name, max_batch_size=max_batch_size, gpu=gpu,
                       instances=instances, preferred_batch_sizes=pref, max_queue_delay_us=int(max_queue_delay_us),
                       max_history=int(meta["max_history"]), max_candidates=int(max_candidates),
                       trt_precision=trt_precision, trt_cache_dir=trt_cache_dir, trt_profiles=trt_profiles,
                       cpu_threads=cpu_threads, warmup=warmup)
    mc = model_config_pb2()
    if mc is not None:  # validate with Triton's own schema whenever it is at hand
        try:
            parse_config(text)
        except Exception as e:
            raise TritonRepositoryError(f"generated config.pbtxt does not parse as inference.ModelConfig: {e}") from e

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / model_name
    staging = out_dir / f".{model_name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        (staging / "1").mkdir(parents=True)
        shutil.copyfile(model_path, staging / "1" / "model.onnx")
        for extra in _external_data_files(model_path):
            shutil.copyfile(extra, staging / "1" / extra.name)
        (staging / "config.pbtxt").write_text(text)
        shutil.copyfile(onnx_dir / C.RUNTIME_META_FILE, staging / C.RUNTIME_META_FILE)
        old = None
        if final.exists():
            old = out_dir / f".{model_name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

    perf, readable = _perf_files(meta, inputs, batched, int(perf_requests), int(perf_candidates))
    _atomic_write_text(out_dir / "perf_input.json", json.dumps(perf, indent=1) + "\n")
    _atomic_write_text(out_dir / "perf_input_ids.json", json.dumps(readable, indent=1) + "\n")
    return out_dir


def _gpu_from_providers(providers) -> bool:
    names = [p[0] if isinstance(p, (list, tuple)) else str(p) for p in (providers or [])]
    return any(n in (C.TRT, C.CUDA) for n in names)


def write_run_repository(run_dir, cfg=None, **overrides) -> Path:
    """`distillrec triton <run>`: runs/<name>/onnx -> runs/<name>/triton.

    Options come from `cfg.triton` when the config has such a section (a dataclass or a dict with the keyword
    names of `write_repository`), then from `overrides`; `gpu` defaults to whether cfg.export.providers asks for
    TensorRT or CUDA.
    """
    run_dir = Path(run_dir)
    opts: dict = {}
    section = getattr(cfg, "triton", None) if cfg is not None else None
    if section is not None:
        opts.update(section if isinstance(section, dict) else dict(vars(section)))
    if "gpu" not in opts and cfg is not None and getattr(cfg, "export", None) is not None:
        opts["gpu"] = _gpu_from_providers(getattr(cfg.export, "providers", None))
    opts.update(overrides)
    onnx_dir = C.serving_dir(run_dir)
    if not (onnx_dir / C.RUNTIME_META_FILE).is_file():
        raise TritonRepositoryError(f"{onnx_dir / C.RUNTIME_META_FILE} is missing; run `distillrec export {run_dir}` "
                                    f"first")
    return write_repository(onnx_dir, run_dir / "triton", **opts)
