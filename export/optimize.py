"""Serving variants of the exported student, each checked against the PyTorch student before it is placed.

  student.opt.onnx   onnxruntime graph optimizations (ORT_ENABLE_EXTENDED, CPU provider) applied offline and
                     saved (`SessionOptions.optimized_model_filepath`): fused com.microsoft ops (FusedMatMul,
                     BiasGelu, SkipLayerNormalization, ...). Same math; CPU-specific (an EXTENDED-optimized
                     graph is tied to the provider it was optimized for; on GPU serve student.onnx).
  student.int8.onnx  dynamic quantization (`quantize_dynamic`, weights QInt8, activations quantized per call).
                     The catalog-scoring MatMul (user vector x item table -> next_item_scores) is EXCLUDED by
                     default: it ranks the whole catalog, and int8 rounding of the item table reorders the
                     top of the list. `include_catalog_matmul=True` quantizes it too.
  student.fp16.onnx  float16 weights and compute, float32 inputs/outputs (keep_io_types). GPU only: the runtime
                     refuses it on the CPU provider (fused FP16 graphs have crashed onnxruntime's CPU provider).

Parity of a variant is measured on the same inputs as the FP32 check (export/onnx_export.parity_feeds) against
the PyTorch student; tolerances (VARIANT_TOLERANCES) are looser than FP32's for INT8/FP16 and are written
next to the measurements in parity.json["variants"]. A variant that misses its tolerance is NOT placed (and a
stale file of that name is removed), so runtime.json only ever lists variants that passed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from export.contract import (ENCODER_VARIANT_FILES, META_PRECISION, META_VARIANT,  # noqa: F401  (the contract)
                             VARIANT_FILES)

DEFAULT_VARIANTS = ("opt", "int8", "fp16")
DEFAULT_ENCODER_VARIANTS = ("opt", "int8", "qdq", "fp16")
PRECISIONS = {"opt": "fp32", "int8": "int8", "qdq": "int8", "fp16": "fp16"}
TOP_K = 10
VARIANT_TOLERANCES = {
    # same math as FP32 with fused kernels: the FP32 tolerance (ExportConfig.parity_tol) applies
    "opt": {"max_abs_diff": None},
    # int8 weights: the ranking must survive (mean top-10 overlap with FP32 PyTorch), and rating / like may
    # move by at most 10% of the output scale (max |diff| / max(1, max |output|))
    "int8": {"top10_overlap_min": 0.9, "max_rel_diff": 0.1},
    # fp16 compute: 1% of the output scale on every output, and the same ranking floor as INT8
    "fp16": {"top10_overlap_min": 0.9, "max_rel_diff": 1e-2},
    # static (calibrated) int8 of the user encoder: the same criteria as dynamic int8
    "qdq": {"top10_overlap_min": 0.9, "max_rel_diff": 0.1},
}
RANKED_OUTPUTS = ("next_item_scores", "user_vector")
"""Outputs judged by their ranking (top-K overlap) rather than their values for int8 / qdq: the catalog scores of
the single graph, and the encoder's user vector (scored against the item table: user_vector @ vectors.T + bias)."""
_log = logging.getLogger("distillrec.export")


class VariantError(ValueError):
    """A variant could not be built."""


# ---------------------------------------------------------------------------------------------- graph helpers
def _constant_names(graph) -> set:
    """Initializers, Constant outputs and everything computed from constants only (e.g. Transpose(table))."""
    names = {i.name for i in graph.initializer}
    changed = True
    while changed:
        changed = False
        for n in graph.node:
            if n.op_type == "Constant" or (n.input and all((not x) or x in names for x in n.input)):
                new = [o for o in n.output if o not in names]
                if new:
                    names.update(new)
                    changed = True
    return names


def _const_dims(graph, name: str, producer: dict) -> set:
    """Sizes of the initializers a constant tensor is computed from (its own dims when it is one)."""
    inits = {i.name: i for i in graph.initializer}
    out, stack, seen = set(), [name], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in inits:
            out.update(int(d) for d in inits[t].dims)
        elif t in producer:
            stack.extend(x for x in producer[t].input if x)
    return out


def find_catalog_matmul(model, output: str = "next_item_scores", n_items: Optional[int] = None):
    """The MatMul/Gemm that scores the whole catalog: the first one met walking the graph back from `output`
    (breadth first) whose other operand is constant (the frozen item table, possibly behind a Transpose) with
    an axis of size n_items. Returns the NodeProto or None."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consts = _constant_names(graph)
    queue, seen = [output], set()
    while queue:
        t = queue.pop(0)
        if t in seen or t not in producer:
            continue
        seen.add(t)
        node = producer[t]
        if node.op_type in ("MatMul", "Gemm", "FusedMatMul"):
            const_in = [x for x in node.input[:2] if x in consts]
            if const_in and (n_items is None or n_items in _const_dims(graph, const_in[0], producer)):
                return node
        queue.extend(x for x in node.input if x and x not in consts)
    return None


def _first_matmul_back_from(model, output: str):
    producer = {o: n for n in model.graph.node for o in n.output}
    kinds = ("MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
    queue, seen = [output], set()
    while queue:
        t = queue.pop(0)
        if t in seen or t not in producer:
            continue
        seen.add(t)
        if producer[t].op_type in kinds:
            return producer[t]
        queue.extend(x for x in producer[t].input if x)
    return None


def _set_meta(model, **props) -> None:
    for key, value in props.items():
        for p in list(model.metadata_props):
            if p.key == key:
                model.metadata_props.remove(p)
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)


def _op_counts(model) -> dict:
    out: dict = {}
    for n in model.graph.node:
        key = f"{n.domain}.{n.op_type}" if n.domain and n.domain != "ai.onnx" else n.op_type
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs 'please run pre-processing' to the root logger; the fp16 converter warns
    for every clamped constant (the -1e9 attention fill becomes -1e4, which softmax still maps to 0)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


# ---------------------------------------------------------------------------------------------- builders
def ort_optimize(src: Path, dst: Path, level: str = "extended", tag: bool = True,
                 disabled_optimizers: Optional[list] = None) -> dict:
    """Run onnxruntime's graph optimizer once on CPU and save the result (offline optimization)."""
    import onnx
    import onnxruntime as ort
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise VariantError(f"optimization level must be one of {sorted(levels)}, got {level!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=disabled_optimizers or [])
    model = onnx.load(str(dst))
    if tag:
        _set_meta(model, **{META_PRECISION: "fp32", META_VARIANT: "opt"})
        onnx.save(model, str(dst))
    return {"level": f"ORT_ENABLE_{level.upper()}", "optimized_for": "CPUExecutionProvider",
            "onnxruntime_version": ort.__version__, "ops": _op_counts(model)}


def quantize_int8_plain(src: Path, dst: Path, per_channel: bool = False) -> dict:
    """Dynamic INT8 (weights QInt8, activations quantized per call) of a graph WITHOUT a catalog MatMul (the user
    encoder: its catalog scoring happens outside the graph), after the same BASIC pre-processing."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    pre = Path(str(dst) + ".pre.onnx")
    try:
        ort_optimize(src, pre, level="basic", tag=False)
        with _quiet():
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pre)
    q = onnx.load(str(dst))
    _set_meta(q, **{META_PRECISION: "int8", META_VARIANT: "int8"})
    onnx.save(q, str(dst))
    ops = _op_counts(q)
    return {"weight_type": "QInt8", "per_channel": per_channel, "mode": "dynamic",
            "preprocess": "ORT_ENABLE_BASIC (constant folding)",
            "quantized_matmuls": ops.get("MatMulInteger", 0) + ops.get("com.microsoft.MatMulIntegerToFloat", 0)
            + ops.get("com.microsoft.DynamicQuantizeMatMul", 0), "ops": ops}


class FeedReader:
    """onnxruntime.quantization CalibrationDataReader over a list of feeds ({input name: array})."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = list(feeds), 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def _weight_matmuls(model) -> list[str]:
    """Names of MatMul / Gemm nodes whose second operand is constant (a weight): the ones static quantization
    converts. Activation x activation MatMuls (q @ k^T, softmax @ v) stay FP32: quantizing the attention
    probabilities costs ranking quality and those batched [T, dh] products are not where the time goes."""
    consts = _constant_names(model.graph)
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
            and n.input[1] in consts]


def quantize_qdq(src: Path, dst: Path, calibration: list[dict], quant_format: str = "qdq",
                 calibrate_method: str = "minmax", per_channel: bool = True, activation_type: str = "quint8",
                 exclude: tuple = ()) -> dict:
    """Static INT8: weights QInt8 (per output channel), activations quantized with ranges calibrated on
    `calibration` (feeds of the graph's inputs: real training histories when the export has them).

    Only MatMul / Gemm with a constant weight are quantized (op_types_to_quantize + nodes_to_quantize):
    LayerNorm, Softmax, Gelu, the attention products and the mask arithmetic stay FP32. `exclude`: more node
    names to keep in FP32 (e.g. the last projection). Activations default to QUInt8 (U8S8: the x86 VNNI path;
    onnxruntime's documented default for CPU). quant_format "qdq" (QuantizeLinear / DequantizeLinear pairs that
    onnxruntime fuses into integer kernels at load) or "qoperator" (QLinearMatMul ... written out)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    acts = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}
    for value, table, what in ((quant_format, formats, "quant_format"), (calibrate_method, methods, "calibrate_method"),
                               (activation_type, acts, "activation_type")):
        if value not in table:
            raise VariantError(f"{what} must be one of {sorted(table)}, got {value!r}")
    if not calibration:
        raise VariantError("static quantization needs calibration feeds (none given)")
    pre = Path(str(dst) + ".pre.onnx")
    try:
        ort_optimize(src, pre, level="basic", tag=False)
        model = onnx.load(str(pre))
        nodes = [n for n in _weight_matmuls(model) if n not in set(exclude)]
        if not nodes:
            raise VariantError("no MatMul / Gemm with a constant weight to quantize")
        with _quiet():
            quantize_static(str(pre), str(dst), FeedReader(calibration), quant_format=formats[quant_format],
                            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes,
                            per_channel=per_channel, activation_type=acts[activation_type],
                            weight_type=QuantType.QInt8, calibrate_method=methods[calibrate_method],
                            extra_options={"CalibTensorRangeSymmetric": False})
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pre)
        for tmp in Path(dst).parent.glob("augmented_model*.onnx"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    q = onnx.load(str(dst))
    _set_meta(q, **{META_PRECISION: "int8", META_VARIANT: "qdq"})
    onnx.save(q, str(dst))
    ops = _op_counts(q)
    return {"mode": "static", "format": quant_format, "calibrate_method": calibrate_method,
            "per_channel": per_channel, "weight_type": "QInt8", "activation_type": activation_type.upper(),
            "calibration_batches": len(calibration),
            "calibration_rows": int(sum(next(iter(f.values())).shape[0] for f in calibration)),
            "quantized_nodes": nodes, "excluded_nodes": list(exclude),
            "preprocess": "ORT_ENABLE_BASIC (constant folding)", "ops": ops}


def quantize_int8(src: Path, dst: Path, include_catalog_matmul: bool = False, per_channel: bool = False,
                  n_items: Optional[int] = None) -> dict:
    """Dynamic INT8 quantization (weights QInt8); the catalog-scoring MatMul stays FP32 unless included.

    Pre-processing: onnxruntime's BASIC (provider-independent) optimizations are applied first, which
    constant-fold e.g. Transpose(item table) into an initializer; quantize_dynamic only quantizes a MatMul
    whose weight is an initializer, so without this step the include flag would silently do nothing."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    pre = Path(str(dst) + ".pre.onnx")
    try:
        # MatMulAddFusion would turn the catalog MatMul + item_bias Add into a Gemm, which the quantizer then
        # splits again under new node names (defeating nodes_to_exclude): keep MatMul + Add as exported.
        ort_optimize(src, pre, level="basic", tag=False, disabled_optimizers=["MatMulAddFusion"])
        model = onnx.load(str(pre))
        node = find_catalog_matmul(model, n_items=n_items)
        if node is None:
            raise VariantError("could not find the catalog-scoring MatMul (walking back from next_item_scores); "
                               "refusing to quantize without knowing what is quantized")
        exclude = [] if include_catalog_matmul else [node.name]
        with _quiet():
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                             nodes_to_exclude=exclude)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pre)
    q = onnx.load(str(dst))
    scoring = _first_matmul_back_from(q, "next_item_scores")
    fp32 = scoring is not None and scoring.op_type in ("MatMul", "Gemm")
    if exclude and not fp32:
        raise VariantError(f"the catalog MatMul {node.name} was quantized although it was excluded "
                           f"(found {None if scoring is None else scoring.op_type})")
    if include_catalog_matmul and fp32:
        raise VariantError(f"the catalog MatMul {node.name} was left in FP32 although it was included")
    _set_meta(q, **{META_PRECISION: "int8", META_VARIANT: "int8"})
    onnx.save(q, str(dst))
    ops = _op_counts(q)
    return {"weight_type": "QInt8", "per_channel": per_channel, "mode": "dynamic",
            "preprocess": "ORT_ENABLE_BASIC (constant folding)", "catalog_matmul": node.name,
            "catalog_matmul_quantized": bool(include_catalog_matmul), "nodes_to_exclude": exclude,
            "quantized_matmuls": ops.get("MatMulInteger", 0) + ops.get("com.microsoft.MatMulIntegerToFloat", 0),
            "ops": ops}


def convert_fp16(src: Path, dst: Path) -> dict:
    """FP16 weights/compute with FP32 inputs and outputs (keep_io_types=True)."""
    import onnx
    try:  # the converter named by the design; onnxruntime ships a maintained copy of it as a fallback
        from onnxconverter_common import float16 as conv
        converter = "onnxconverter_common.float16"
    except ImportError:  # pragma: no cover - depends on the environment
        from onnxruntime.transformers import float16 as conv
        converter = "onnxruntime.transformers.float16"
    model = onnx.load(str(src))
    with _quiet():
        m16 = conv.convert_float_to_float16(model, keep_io_types=True)
    _set_meta(m16, **{META_PRECISION: "fp16", META_VARIANT: "fp16"})
    onnx.checker.check_model(m16)
    onnx.save(m16, str(dst))
    io_types = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                for v in list(m16.graph.input) + list(m16.graph.output)}
    if any(t == "float16" for t in io_types.values()):
        raise VariantError(f"fp16 conversion changed the graph's input/output types: {io_types}")
    return {"converter": converter, "keep_io_types": True, "io_types": io_types, "gpu_only": True,
            "ops": _op_counts(m16)}


# ---------------------------------------------------------------------------------------------- parity
def top_k_overlap(ref: np.ndarray, got: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Per row |top-k(ref) & top-k(got)| / k."""
    k = min(k, ref.shape[1])
    a = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    b = np.argsort(-got, axis=1, kind="stable")[:, :k]
    return np.array([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist())])


def measure(session, references: list[dict], output_names: list[str], scores_fn=None) -> dict:
    """Run `session` on every reference point -> max |diff| / scale / relative diff per output, top-10 overlap.

    The overlap compares the catalog rankings: next_item_scores of the single graph, or scores_fn(outputs)
    ([B, N], e.g. user_vector @ item vectors.T + bias for the encoder) when given."""
    worst = {n: 0.0 for n in output_names}
    scale = {n: 0.0 for n in output_names}
    overlaps, finite, points = [], True, []
    for ref in references:
        got = dict(zip(output_names, session.run(output_names, ref["feed"])))
        diffs = {}
        for n in output_names:
            r, g = ref["out"][n], got[n]
            if r.shape != g.shape:
                diffs[n] = float("inf")
                worst[n] = float("inf")
                continue
            finite &= bool(np.all(np.isfinite(g)))
            d = float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0
            diffs[n] = d if np.isfinite(d) else float("inf")
            worst[n] = max(worst[n], diffs[n])
            scale[n] = max(scale[n], float(np.max(np.abs(r)))) if r.size else scale[n]
        if scores_fn is not None:
            r_s, g_s = scores_fn(ref["out"]), scores_fn(got)
            if r_s.shape == g_s.shape and np.all(np.isfinite(g_s)):
                overlaps.append(top_k_overlap(r_s, g_s))
        elif "next_item_scores" in got and got["next_item_scores"].shape == ref["out"]["next_item_scores"].shape:
            overlaps.append(top_k_overlap(ref["out"]["next_item_scores"], got["next_item_scores"]))
        points.append({**ref["point"], "max_abs_diff": diffs})
    ov = np.concatenate(overlaps) if overlaps else np.zeros(0)
    rel = {n: (worst[n] / max(1.0, scale[n])) for n in output_names}
    return {"max_abs_diff": worst, "max_abs_value": scale, "max_rel_diff": rel, "finite": finite,
            f"top{TOP_K}_overlap_mean": float(ov.mean()) if ov.size else None,
            f"top{TOP_K}_overlap_min": float(ov.min()) if ov.size else None, "rows": int(ov.size), "points": points}


def judge(kind: str, rec: dict, tolerance: dict, parity_tol: float) -> list[str]:
    problems = []
    if not rec["finite"]:
        problems.append("non-finite outputs")
    if kind == "opt":
        for n, d in rec["max_abs_diff"].items():
            if not d <= parity_tol:
                problems.append(f"{n}: max |diff| {d:.3g} > {parity_tol:g}")
        return problems
    mean = rec[f"top{TOP_K}_overlap_mean"]
    if mean is not None and not mean >= tolerance["top10_overlap_min"]:
        problems.append(f"next_item_scores: mean top-{TOP_K} overlap with FP32 {mean:.3f} < "
                        f"{tolerance['top10_overlap_min']}")
    if mean is None and kind in ("int8", "qdq"):
        problems.append("no ranking measured (no next_item_scores and no scores function)")
    for n, r in rec["max_rel_diff"].items():
        if kind in ("int8", "qdq") and n in RANKED_OUTPUTS:
            continue  # the ranking criterion above is what matters for the catalog scores / the user vector
        if not r <= tolerance["max_rel_diff"]:
            problems.append(f"{n}: max |diff| / max(1, |output|) = {r:.3g} > {tolerance['max_rel_diff']:g}")
    return problems


def _parity_session(path: Path, kind: str):
    import onnxruntime as ort
    so = ort.SessionOptions()
    if kind == "fp16":
        # Measured on CPU as a REFERENCE only, with graph optimizations off (no fused FP16 kernels); the
        # runtime refuses to SERVE fp16 on CPU. gpu_check.py measures it on CUDA / TensorRT.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _build_one(kind: str, src: Path, tmp: Path, include_catalog_matmul: bool, n_items: Optional[int],
               catalog: bool, calibration: Optional[list], qdq_options: Optional[dict]) -> dict:
    """Write variant `kind` of `src` to tmp; returns its build record."""
    if kind == "opt":
        return ort_optimize(src, tmp)
    if kind == "int8":
        if catalog:
            return quantize_int8(src, tmp, include_catalog_matmul, n_items=n_items)
        return quantize_int8_plain(src, tmp)
    if kind == "qdq":
        return quantize_qdq(src, tmp, calibration or [], **(qdq_options or {}))
    return convert_fp16(src, tmp)


def build_variants(fp32_path: Path, onnx_dir: Path, references: list[dict], output_names: list[str],
                   variants=DEFAULT_VARIANTS, parity_tol: float = 1e-4, include_catalog_matmul: bool = False,
                   n_items: Optional[int] = None, strict: bool = False, files: Optional[dict] = None,
                   scores_fn=None, calibration: Optional[list] = None, qdq_options: Optional[dict] = None) -> dict:
    """Build, check and place each requested variant. Returns {variant: record} for parity.json.

    files: variant -> file name (default VARIANT_FILES, the single graph with its catalog MatMul; the encoder
    passes ENCODER_VARIANT_FILES, scores_fn (its user vector ranked against the item table) and, for "qdq",
    calibration feeds). A failing variant is recorded (passed: false, problems) and not placed; strict=True
    raises instead."""
    from distill.io import atomic_path  # export-time only (the runtime never imports this module)
    files = dict(VARIANT_FILES if files is None else files)
    catalog = files == VARIANT_FILES  # the single graph scores the catalog inside: its MatMul stays FP32
    unknown = sorted(set(variants) - set(files))
    if unknown:
        raise VariantError(f"unknown variant(s) {unknown}; choose from {sorted(files)}")
    onnx_dir = Path(onnx_dir)
    records: dict = {}
    for kind in files:
        dst = onnx_dir / files[kind]
        if kind not in variants:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)  # stale: built from an earlier fp32 graph
            continue
        rec: dict = {"file": files[kind], "tolerance": dict(VARIANT_TOLERANCES[kind])}
        if kind == "opt":
            rec["tolerance"]["max_abs_diff"] = parity_tol
        try:
            with atomic_path(dst) as tmp:
                rec["build"] = _build_one(kind, fp32_path, tmp, include_catalog_matmul, n_items, catalog,
                                          calibration, qdq_options)
                sess = _parity_session(tmp, kind)
                rec.update(measure(sess, references, output_names, scores_fn=scores_fn))
                rec["measured_on"] = sess.get_providers()[0] + (
                    " (graph optimizations disabled; reference only, fp16 is served on GPU)" if kind == "fp16" else "")
                rec["problems"] = judge(kind, rec, VARIANT_TOLERANCES[kind], parity_tol)
                rec["passed"] = not rec["problems"]
                if not rec["passed"]:
                    raise VariantError("; ".join(rec["problems"]))
            rec["size_bytes"] = dst.stat().st_size
        except Exception as e:
            rec.setdefault("problems", [f"{type(e).__name__}: {e}"])
            rec["passed"] = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)
            msg = f"variant {kind} ({files[kind]}) not written: {'; '.join(rec['problems'])}"
            if strict:
                raise VariantError(msg) from e
            _log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        rec["gpu_only"] = kind == "fp16"
        rec["precision"] = PRECISIONS[kind]
        records[kind] = rec
    return records
