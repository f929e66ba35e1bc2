"""The floor (roofline) of a student request on this machine, and where the student's time goes.

floor(request) = max(per-call overhead, FLOPs(request) / single-thread matmul rate)

  * per-call overhead: a TRIVIAL graph with the student's exact inputs and outputs (same names, dtypes,
    dynamic axes and output sizes: [B, n_items] scores, [B, C] rating / like; each output is an input
    cast and multiplied by zero) served through the SAME path as the student (export.runtime.Recommender
    + the same top-K post-processing), one intra-op thread: what any model costs before doing any math.
    The bare `session.run` of that graph is reported beside it.
  * matmul rate: an onnxruntime MatMul of [m, k] x [k, n] float32 on one intra-op thread, GFLOP/s at p50.
  * FLOPs: 2*M*K*N summed over every MatMul / Gemm (and quantized / fused matmul) node of the student
    graph, with the shapes the graph really has for that request (read by running the graph once with
    those intermediate tensors exposed as outputs). Elementwise ops, softmax and layer norms are left out,
    so this is a lower bound of the work.

Two-part serving (`two_part_floor`): the served graph is encoder.onnx (history item vectors -> user vector and
tower features); the catalog matmul (user vector @ item vectors + bias, 2*B*d*N FLOPs) runs in numpy in the
runtime, outside the graph. So the encoder's floor = max(bare session.run of a trivial graph with the ENCODER's
inputs and outputs, encoder MatMul FLOPs / matmul rate); the catalog matmul's FLOPs are counted and reported
beside it (they are part of the API's cost, not of the graph's). The Recommender API (raw ids in, raw ids out:
validation, id lookup, gather, encoder, retrieval with the history excluded, ids out) is timed interleaved with
the bare session.run on the same requests, so "what the API adds" is a difference of two p50s taken under the
same machine load.

`profile_ops` runs onnxruntime's profiler (SessionOptions.enable_profiling) and aggregates kernel time per
operator type: top operators by time, and the share of a call spent outside kernels (framework overhead).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .timing import time_calls

MATMUL_OPS = {"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
              "MatMulIntegerToFloat", "FusedGemm", "MatMulNBits", "QGemm"}
INPUTS = ("history_items", "history_ratings", "history_length", "candidates")


# ---------------------------------------------------------------------------------------------- trivial graph
def trivial_model(output_names: list[str], n_items: int, opset: int = 17):
    """An ONNX model with the student's inputs/outputs that does (almost) no work."""
    from onnx import TensorProto, helper, numpy_helper
    inputs = [helper.make_tensor_value_info("history_items", TensorProto.INT64, ["batch", "history"]),
              helper.make_tensor_value_info("history_ratings", TensorProto.FLOAT, ["batch", "history"]),
              helper.make_tensor_value_info("history_length", TensorProto.INT64, ["batch"]),
              helper.make_tensor_value_info("candidates", TensorProto.INT64, ["batch", "candidates"])]
    inits = [numpy_helper.from_array(np.zeros((1, n_items), np.float32), "zeros_row"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [helper.make_node("Cast", ["history_length"], ["len_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["len_f", "axis1"], ["len_col"]),
             helper.make_node("Cast", ["candidates"], ["cand_f"], to=TensorProto.FLOAT)]
    outputs = []
    for name in output_names:
        if name == "next_item_scores":
            nodes.append(helper.make_node("Mul", ["len_col", "zeros_row"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", n_items]))
        else:
            nodes.append(helper.make_node("Mul", ["cand_f", "zero"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "candidates"]))
    graph = helper.make_graph(nodes, "trivial_student", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="serve_bench")
    model.ir_version = min(model.ir_version, 10)
    return model


def trivial_folder(onnx_dir: Path, dst: Path) -> Path:
    """dst/ with runtime.json (copied, model_file -> trivial.onnx) + trivial.onnx: loadable by the runtime."""
    import onnx
    meta = json.loads((Path(onnx_dir) / "runtime.json").read_text())
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    onnx.save(trivial_model(list(meta["outputs"]), int(meta["n_items"])), str(dst / "trivial.onnx"))
    (dst / "runtime.json").write_text(json.dumps({**meta, "model_file": "trivial.onnx"}))
    return dst


def trivial_encoder_model(dim: int, outputs: dict, opset: int = 17):
    """An ONNX model with the two-part encoder's inputs (history_vectors [B, L, dim], history_ratings [B, L],
    history_length [B]) and outputs ({name: width}, each [B, width]) that does (almost) no work: each output is
    the length cast to float times a zero row."""
    from onnx import TensorProto, helper, numpy_helper
    inputs = [helper.make_tensor_value_info("history_vectors", TensorProto.FLOAT, ["batch", "history", dim]),
              helper.make_tensor_value_info("history_ratings", TensorProto.FLOAT, ["batch", "history"]),
              helper.make_tensor_value_info("history_length", TensorProto.INT64, ["batch"])]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [helper.make_node("Cast", ["history_length"], ["len_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["len_f", "axis1"], ["len_col"])]
    outs = []
    for name, width in outputs.items():
        inits.append(numpy_helper.from_array(np.zeros((1, int(width)), np.float32), f"zeros_{name}"))
        nodes.append(helper.make_node("Mul", ["len_col", f"zeros_{name}"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", int(width)]))
    graph = helper.make_graph(nodes, "trivial_encoder", inputs, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="serve_bench")
    model.ir_version = min(model.ir_version, 10)
    return model


# ---------------------------------------------------------------------------------------------- matmul rate
def matmul_rate(m: int = 256, k: int = 256, n: int = 256, threads: int = 1, min_samples: int = 50,
                min_seconds: float = 0.5) -> dict:
    """GFLOP/s of one onnxruntime MatMul [m, k] x [k, n] (float32) on `threads` intra-op threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((m, k)).astype(np.float32)
    st = time_calls(lambda x: sess.run(None, {"a": x}), [a], warmup=5, min_samples=min_samples,
                    min_seconds=min_seconds)
    flops = 2.0 * m * k * n
    return dict(m=m, k=k, n=n, threads=threads, p50_ms=st["p50_ms"], gflops=flops / (st["p50_ms"] * 1e-3) / 1e9,
                samples=st["samples"])


# ---------------------------------------------------------------------------------------------- FLOPs
def _matmul_inputs(node) -> tuple[str, str]:
    if node.op_type == "QLinearMatMul":
        return node.input[0], node.input[3]
    return node.input[0], node.input[1]


def _node_flops(node, a_shape: tuple, b_shape: tuple) -> float:
    a, b = list(a_shape), list(b_shape)
    if node.op_type in ("Gemm", "FusedGemm", "QGemm"):
        attrs = {x.name: x.i for x in node.attribute}
        if attrs.get("transA"):
            a = a[::-1]
        if attrs.get("transB"):
            b = b[::-1]
        return 2.0 * a[0] * a[1] * b[1]
    if node.op_type == "MatMulNBits":
        attrs = {x.name: x.i for x in node.attribute}
        return 2.0 * float(np.prod(a)) * attrs.get("N", 0)
    if node.op_type == "FusedMatMul":
        attrs = {x.name: x.i for x in node.attribute}
        if attrs.get("transA") and len(a) >= 2:
            a[-1], a[-2] = a[-2], a[-1]
        if attrs.get("transB") and len(b) >= 2:
            b[-1], b[-2] = b[-2], b[-1]
    if len(a) == 1:
        a = [1] + a
    if len(b) == 1:
        b = b + [1]
    batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])) if (len(a) > 2 or len(b) > 2) else ()
    return 2.0 * float(np.prod(batch)) * a[-2] * a[-1] * b[-1]


def count_matmul_flops(model_path: Path, feed: dict) -> dict:
    """FLOPs of the graph's matmul-like nodes for this feed (shapes read by running the graph once)."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(str(model_path))
    nodes = [n for n in model.graph.node if n.op_type in MATMUL_OPS]
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - contrib ops can defeat inference; types then default to float
        inferred = model
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    existing = {o.name for o in model.graph.output}
    wanted = []
    for n in nodes:
        for name in _matmul_inputs(n):
            if name and name not in inits and name not in wanted:
                wanted.append(name)
    for name in wanted:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name) or 1, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the nodes as written
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    feed = {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}}
    shapes = dict(inits)
    if wanted:
        shapes.update({name: tuple(v.shape) for name, v in zip(wanted, sess.run(wanted, feed))})
    total, per_op = 0.0, {}
    for n in nodes:
        a, b = _matmul_inputs(n)
        f = _node_flops(n, shapes[a], shapes[b])
        total += f
        per_op[n.op_type] = per_op.get(n.op_type, 0.0) + f
    return dict(flops=total, matmul_nodes=len(nodes), by_op=per_op)


def feed_of(req: tuple) -> dict:
    return dict(zip(INPUTS, (np.ascontiguousarray(a) for a in req)))


def encoder_feed(rt, req: tuple) -> dict:
    """The two-part encoder's feed for a request, as the runtime builds it (export.runtime.Recommender._encode:
    the history's item vectors gathered from the served item table)."""
    items, ratings, length = (np.ascontiguousarray(a) for a in req[:3])
    return {"history_vectors": np.ascontiguousarray(rt.catalog.table.vectors[items]),
            "history_ratings": ratings.astype(np.float32, copy=False), "history_length": length.astype(np.int64)}


# ---------------------------------------------------------------------------------------------- overhead
def overhead(onnx_dir: Path, reqs: list[tuple], fn_of_system, min_samples: int = 200,
             min_seconds: float = 0.5) -> dict:
    """p50 of the trivial graph through the serving path (fn_of_system(system) -> callable(req)) and of
    its bare session.run, one intra-op thread each."""
    from .systems import StudentOnnxSystem
    tmp = Path(tempfile.mkdtemp(prefix="trivial_onnx_"))
    try:
        trivial_folder(onnx_dir, tmp)
        system = StudentOnnxSystem(tmp, "trivial", ["CPUExecutionProvider"], label="trivial graph",
                                   model_file="trivial.onnx", intra_op_threads=1)
        path_st = time_calls(fn_of_system(system), reqs, warmup=10, min_samples=min_samples,
                             min_seconds=min_seconds)
        sess = system.rt.session
        names = [o.name for o in sess.get_outputs()]
        feeds = [feed_of(r) for r in reqs]
        bare_st = time_calls(lambda f: sess.run(names, f), feeds, warmup=10, min_samples=min_samples,
                             min_seconds=min_seconds)
        system.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(overhead_ms=path_st["p50_ms"], overhead_p99_ms=path_st["p99_ms"],
                session_run_ms=bare_st["p50_ms"], samples=path_st["samples"])


def floor_ms(overhead_ms: float, flops: float, gflops: float) -> float:
    """max(per-call overhead, compute time at the measured matmul rate)."""
    return max(overhead_ms, flops / (gflops * 1e9) * 1e3)


# ---------------------------------------------------------------------------------------------- two-part
def time_interleaved(fns: dict, args: list, warmup: int, min_samples: int, min_seconds: float) -> dict:
    """{name: time_calls-style summary}: the functions called one after the other on the same argument, round
    robin over `args`, until each has min_samples calls and min_seconds passed (so a load burst on a shared
    machine hits all of them alike). fns: {name: fn(arg)}."""
    from .timing import summarize
    for i in range(max(0, warmup)):
        for fn in fns.values():
            fn(args[i % len(args)])
    lat = {name: [] for name in fns}
    t_start = time.perf_counter()
    i = 0
    while True:
        a = args[i % len(args)]
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(a)
            lat[name].append((time.perf_counter() - t0) * 1e3)
        i += 1
        if i >= min_samples and time.perf_counter() - t_start >= min_seconds:
            break
    return {name: summarize(v) for name, v in lat.items()}


def api_requests(rt, reqs: list[tuple]) -> list[tuple]:
    """(raw-id history, ratings or None) per batch-1 request: what a caller of Recommender.recommend sends."""
    out = []
    for items, ratings, length, _ in reqs:
        n = int(length[0])
        hist = [rt.item_ids[i] for i in items[0, items.shape[1] - n:]]
        rates = ratings[0, items.shape[1] - n:].tolist() if rt.uses_ratings else None
        out.append((hist, rates))
    return out


def two_part_floor(onnx_dir: Path, variants: dict, reqs: list[tuple], gflops: float, top_k: int = 10,
                   min_samples: int = 200, min_seconds: float = 0.5) -> dict:
    """The two-part roofline at batch 1 on one intra-op thread, for each encoder variant {name: file}.

    floor = max(bare session.run of the trivial encoder graph, encoder MatMul FLOPs / gflops); per variant:
    the served encoder's bare session.run p50 / p99 and Recommender.recommend (ids in, ids out, exact retrieval,
    history excluded) p50 / p99, timed interleaved; api_adds_ms = API p50 - session.run p50."""
    import onnxruntime as ort
    from export.contract import ENCODER_FILE
    from export.runtime import Recommender
    onnx_dir = Path(onnx_dir)
    base = Recommender(onnx_dir, mode="two_part", retrieval="exact", intra_op_threads=1)
    feeds = [encoder_feed(base, r) for r in reqs]
    names = list(base.output_names)
    widths = {nm: int(v.shape[-1]) for nm, v in zip(names, base.session.run(names, feeds[0]))}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    trivial = ort.InferenceSession(trivial_encoder_model(base.catalog.table.dim, widths).SerializeToString(),
                                   sess_options=so, providers=["CPUExecutionProvider"])
    triv = time_calls(lambda f: trivial.run(names, f), feeds, warmup=10, min_samples=min_samples,
                      min_seconds=min_seconds)
    fl = count_matmul_flops(onnx_dir / ENCODER_FILE, feeds[0])
    b, d, n = feeds[0]["history_vectors"].shape[0], base.catalog.table.dim, base.catalog.n_active
    catalog_flops = 2.0 * b * d * n
    floor = floor_ms(triv["p50_ms"], fl["flops"], gflops)
    out = dict(n_items=base.catalog.n_items, batch=b, history=int(feeds[0]["history_vectors"].shape[1]),
               dim=d, top_k=top_k, trivial_run_ms=triv["p50_ms"], encoder_flops=fl["flops"],
               encoder_matmul_nodes=fl["matmul_nodes"], compute_ms=fl["flops"] / (gflops * 1e9) * 1e3,
               catalog_flops=catalog_flops, catalog_compute_ms=catalog_flops / (gflops * 1e9) * 1e3,
               floor_ms=floor, bound="overhead" if triv["p50_ms"] >= floor else "compute", gflops=gflops,
               variants={})
    del base
    for name, file in variants.items():
        rec = Recommender(onnx_dir, mode="two_part", variant=name, retrieval="exact", intra_op_threads=1)
        api = api_requests(rec, reqs)
        pairs = list(zip(feeds, api))
        st = time_interleaved({"session": lambda p: rec.session.run(names, p[0]),
                               "api": lambda p: rec.recommend(p[1][0], ratings=p[1][1], k=top_k)},
                              pairs, warmup=10, min_samples=min_samples, min_seconds=min_seconds)
        s, a = st["session"], st["api"]
        out["variants"][name] = dict(file=file, session_p50_ms=s["p50_ms"], session_p99_ms=s["p99_ms"],
                                     api_p50_ms=a["p50_ms"], api_p90_ms=a["p90_ms"], api_p99_ms=a["p99_ms"],
                                     api_adds_ms=a["p50_ms"] - s["p50_ms"], x_floor=s["p50_ms"] / floor,
                                     samples=s["samples"])
    return out


# ---------------------------------------------------------------------------------------------- profile
def profile_ops(model_path: Path, feeds: list[dict], calls: int = 200, threads: Optional[int] = 1,
                top: int = 10, warmup: int = 10) -> dict:
    """onnxruntime profile of `calls` runs -> top operator types by kernel time, per call."""
    import onnxruntime as ort
    tmp = Path(tempfile.mkdtemp(prefix="ort_profile_"))
    try:
        so = ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(tmp / "student")
        sess = ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        for i in range(warmup + calls):
            sess.run(names, feeds[i % len(feeds)])
        events = json.loads(Path(sess.end_profiling()).read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    runs = runs[warmup:] if len(runs) > warmup else runs
    if not runs:
        return dict(error="the profile holds no model_run events")
    t_first = runs[0]["ts"]
    nodes = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
             and e.get("ts", 0) >= t_first]
    n = len(runs)
    by_op: dict[str, list] = {}
    for e in nodes:
        op = (e.get("args") or {}).get("op_name", "?")
        acc = by_op.setdefault(op, [0.0, 0])
        acc[0] += float(e.get("dur", 0))
        acc[1] += 1
    run_us = sum(float(e["dur"]) for e in runs) / n
    kernel_us = sum(v[0] for v in by_op.values()) / n
    ops = sorted(({"op": op, "ms_per_call": tot / n / 1e3, "nodes_per_call": cnt / n,
                   "share_of_call": (tot / n) / run_us if run_us else None}
                  for op, (tot, cnt) in by_op.items()), key=lambda d: -d["ms_per_call"])
    return dict(calls=n, threads=threads, run_ms_per_call=run_us / 1e3, kernel_ms_per_call=kernel_us / 1e3,
                outside_kernels_share=max(0.0, 1 - kernel_us / run_us) if run_us else None, top_ops=ops[:top])
