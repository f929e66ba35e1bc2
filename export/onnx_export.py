"""Export the student to ONNX (dynamic batch / history / candidates), verify the graph, check parity.

Artifacts written to `runs/<name>/onnx/` (file names: export/contract.py; docs/export.md):
  student.onnx   the exported graph; the item table is a constant (freeze_item_table)
  parity.json    max |onnx - torch| per output at several (batch, history, candidates) points
  runtime.json   everything `export/runtime.py` needs besides the graph (raw item ids, popularity, ...)

The teacher (export_run(teacher=True)) goes to `runs/<name>/teacher_onnx/`, outside the serving folder.

student.onnx and runtime.json are only (re)placed once the graph check and the parity check pass;
parity.json is written either way so a failure can be inspected.

Variants (export/optimize.py) are built from the placed student.onnx: student.opt.onnx, student.int8.onnx,
student.fp16.onnx, each with its own parity in parity.json["variants"]; runtime.json["variants"] lists the
ones that passed.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from export.config import ExportConfig
from distill.io import atomic_path, write_json
from distill.student import Student

from export import contract as C
# the artifact contract (names, dtypes, axes, file names) lives in export/contract.py; re-exported here
from export.contract import (EXPORT_HINT, INPUT_AXES, INPUT_DTYPES, INPUT_NAMES, RATING_RANGE,  # noqa: F401
                             SCHEMA_VERSION, TASK_OUTPUTS)


class ExportError(ValueError):
    """The exported graph is malformed or disagrees with the PyTorch student."""


class ServingStudent(nn.Module):
    """Serving signature of the student: 4 named inputs -> tuple of the outputs its tasks provide."""

    def __init__(self, student: Student):
        super().__init__()
        self.student = student
        self.tasks = [t for t in TASK_OUTPUTS if t in student.tasks]
        if "next_item" not in self.tasks:
            raise ExportError(f"the student has no next_item head (tasks={student.tasks}); nothing to serve")
        self.output_names = [TASK_OUTPUTS[t] for t in self.tasks]

    def forward(self, history_items, history_ratings, history_length, candidates):
        out = self.student(history_items, history_ratings, history_length, candidates)
        return tuple(out[t] for t in self.tasks)


# ---------------------------------------------------------------------------------------------- helpers
def _effective_max_history(student: Student, meta: dict) -> int:
    """The model's position table holds max_len + 1 slots: never feed it more than max_len items."""
    requested = int(meta.get("max_history", student.cfg.max_len))
    return max(1, min(requested, int(student.cfg.max_len)))


def _random_inputs(rng: np.random.Generator, n_items: int, batch: int, hist: int, n_cand: int,
                   lengths: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Left-padded random requests; padding slots hold random ids/ratings (the model must ignore them)."""
    if lengths is None:
        lengths = rng.integers(0, hist + 1, size=batch)
        lengths[0] = 0  # an empty history (all padding)
        if batch > 1:
            lengths[-1] = hist  # a full one
    ratings = rng.integers(0, 6, size=(batch, hist)).astype(np.float32)
    ratings[rng.random((batch, hist)) < 0.2] += 0.4  # non-integer ratings are rounded by the model
    return {
        "history_items": rng.integers(0, n_items, size=(batch, hist)).astype(np.int64),
        "history_ratings": ratings,
        "history_length": np.asarray(lengths, dtype=np.int64),
        "candidates": rng.integers(0, n_items, size=(batch, n_cand)).astype(np.int64),
    }


def parity_points(max_history: int) -> list[tuple[int, int, int]]:
    """(batch, history length, candidates): batch 1 and 2 (and larger), history 1, 2, 50 and the model's
    max, candidates 1 and 100; history clipped to what the model accepts (duplicates dropped)."""
    out = []
    for b, h in [(1, 1), (2, 2), (1, 50), (2, 50), (1, max_history), (2, max_history), (3, max_history), (5, 50)]:
        h = max(1, min(h, max_history))
        for c in (1, 100):
            if (b, h, c) not in out:
                out.append((b, h, c))
    return out


def parity_feeds(n_items: int, max_history: int, seed: int = 0) -> list[tuple[tuple[int, int, int], dict]]:
    """The parity requests: one per parity point, fresh (not the export example's random stream).

    Batch 1 holds an empty history (all padding) at candidates=1 and a full one at candidates=100; larger
    batches mix an empty row, a full row and random lengths."""
    rng = np.random.default_rng([seed, 7919])
    out = []
    for b, h, c in parity_points(max_history):
        lengths = None
        if b == 1:
            lengths = np.array([0 if c == 1 else h])
        out.append(((b, h, c), _random_inputs(rng, n_items, b, h, c, lengths)))
    return out


def reference_outputs(wrapper: ServingStudent, max_history: int, seed: int = 0) -> list[dict]:
    """PyTorch outputs on the parity requests: [{"point", "feed", "out": {output name: array}}]."""
    refs = []
    for (b, h, c), feed in parity_feeds(wrapper.student.n_items, max_history, seed):
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(*(torch.from_numpy(feed[k]) for k in INPUT_NAMES))]
        refs.append({"point": {"batch": b, "history": h, "candidates": c,
                               "history_length": feed["history_length"].tolist()},
                     "feed": feed, "out": dict(zip(wrapper.output_names, ref))})
    return refs


def _dynamic_shapes() -> dict:
    from torch.export import Dim
    batch = Dim("batch", min=1)
    hist = Dim("history", min=1)
    cand = Dim("candidates", min=1)
    return {"history_items": {0: batch, 1: hist}, "history_ratings": {0: batch, 1: hist},
            "history_length": {0: batch}, "candidates": {0: batch, 1: cand}}


# ONNX ops the export must not contain. opset 23's fused `Attention` op broke on onnxruntime's CPU provider
# with padding masks; the student writes attention as plain MatMul/Softmax (distill/student.Block) and is
# exported at opset 20, where torch's scaled_dot_product_attention also decomposes. A graph that still
# gets `Attention` (a model switched to SDPA and exported at opset >= 23) is refused here.
FORBIDDEN_OPS = {("", "Attention"): "opset 23's Attention op broke on onnxruntime CPU with padding masks; "
                                    "export at opset 20 (ExportConfig.opset) so attention is decomposed"}


def graph_op_types(model) -> dict[str, int]:
    """op type (domain-qualified when not the default domain) -> count, over the main graph."""
    out: dict[str, int] = {}
    for n in model.graph.node:
        key = f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def check_op_set(model, allow: tuple = ()) -> None:
    """Raise ExportError when the graph contains an op of FORBIDDEN_OPS (unless its name is in `allow`)."""
    for n in model.graph.node:
        key = ("" if n.domain in ("", "ai.onnx") else n.domain, n.op_type)
        if key in FORBIDDEN_OPS and n.op_type not in allow:
            raise ExportError(f"the exported graph contains the ONNX op {n.op_type!r} (node {n.name}, opset "
                              f"{max((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), default='?')}): "
                              f"{FORBIDDEN_OPS[key]}")


def _elem_type_name(elem_type: int) -> str:
    import onnx
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def verify_graph(model, output_names: list[str], n_items: int) -> None:
    """Names, dtypes and symbolic dims of the graph's inputs/outputs; raises ExportError."""
    import onnx
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise ExportError(f"onnx.checker rejected the exported graph: {e}") from e
    check_op_set(model)
    ins = {v.name: v for v in model.graph.input}
    outs = {v.name: v for v in model.graph.output}
    if list(ins) != list(INPUT_NAMES):
        raise ExportError(f"graph inputs are {list(ins)}, expected {list(INPUT_NAMES)}")
    if list(outs) != list(output_names):
        raise ExportError(f"graph outputs are {list(outs)}, expected {output_names}")

    def dims(v):
        return [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                for d in v.type.tensor_type.shape.dim]

    for name, v in ins.items():
        dtype = _elem_type_name(v.type.tensor_type.elem_type)
        if dtype != INPUT_DTYPES[name]:
            raise ExportError(f"input {name} has dtype {dtype}, expected {INPUT_DTYPES[name]}")
        d = dims(v)
        if len(d) != len(INPUT_AXES[name]) or not all(isinstance(x, str) and x for x in d):
            raise ExportError(f"input {name} has dims {d}; every axis {INPUT_AXES[name]} must be symbolic "
                              f"(an example input of size 1 freezes an axis)")
    if dims(ins["history_items"]) != dims(ins["history_ratings"]):
        raise ExportError(f"history_items {dims(ins['history_items'])} and history_ratings "
                          f"{dims(ins['history_ratings'])} must share their symbolic dims")
    batch_sym = dims(ins["history_items"])[0]
    cand_sym = dims(ins["candidates"])[1]
    for name, v in outs.items():
        dtype = _elem_type_name(v.type.tensor_type.elem_type)
        if dtype != "float32":
            raise ExportError(f"output {name} has dtype {dtype}, expected float32")
        d = dims(v)
        expected = [batch_sym, n_items] if name == "next_item_scores" else [batch_sym, cand_sym]
        if d != expected:
            raise ExportError(f"output {name} has dims {d}, expected {expected}")


def check_parity(wrapper: ServingStudent, onnx_path: Path, max_history: int, tol: float, seed: int = 0,
                 providers: Optional[list] = None, label: Optional[str] = None,
                 references: Optional[list[dict]] = None) -> dict:
    """Run torch and onnxruntime on fresh random requests; returns the parity record, raises ExportError.

    The record is returned inside the exception too (`err.parity`) so a failure can still be written.
    """
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=providers or ["CPUExecutionProvider"])
    refs = references if references is not None else reference_outputs(wrapper, max_history, seed)
    names = wrapper.output_names
    points, worst, scale = [], {n: 0.0 for n in names}, {n: 0.0 for n in names}
    problems = []
    for ref in refs:
        feed, pt = ref["feed"], ref["point"]
        b, h, c = pt["batch"], pt["history"], pt["candidates"]
        got = sess.run(names, feed)
        diffs = {}
        for name, g in zip(names, got):
            r = ref["out"][name]
            if r.shape != g.shape:
                problems.append(f"{name}: shape {g.shape} from onnxruntime vs {r.shape} from torch "
                                f"at batch={b} history={h} candidates={c}")
                diffs[name] = float("inf")
                worst[name] = float("inf")
                continue
            for src, arr in (("onnxruntime", g), ("torch", r)):
                if not np.all(np.isfinite(arr)):
                    problems.append(f"{name}: non-finite values from {src} at batch={b} history={h} "
                                    f"candidates={c} lengths={feed['history_length'].tolist()}")
            d = float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0
            diffs[name] = d if np.isfinite(d) else float("inf")
            worst[name] = max(worst[name], diffs[name])
            if r.size:
                scale[name] = max(scale[name], float(np.max(np.abs(r))))
        points.append({**pt, "max_abs_diff": diffs})
    for name, d in worst.items():
        if not d <= tol:
            problems.append(f"output {name}: max |onnx - torch| = {d:.3g} exceeds parity_tol={tol:g} "
                            f"(largest |torch output| = {scale[name]:.3g})")
    record = {"tolerance": tol, "points": points, "max_abs_diff": worst, "max_abs_value": scale,
              "batch_sizes": sorted({p["batch"] for p in points}),
              "history_lengths": sorted({p["history"] for p in points}),
              "passed": not problems,
              "problems": problems, "onnxruntime_version": ort.__version__, "torch_version": torch.__version__,
              "providers": sess.get_providers(), "seed": seed}
    if problems:
        err = ExportError(f"ONNX parity check failed for {label or onnx_path}: " + "; ".join(problems))
        err.parity = record
        raise err
    return record


def _export_graph(wrapper: nn.Module, example: tuple, opset: int, path: Path, input_names: Optional[list] = None,
                  dynamic_shapes: Optional[dict] = None, what: str = "the student") -> None:
    """torch.onnx.export (dynamo) of `wrapper` (which names its outputs in .output_names) to `path`."""
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg_log.level
    reg_log.setLevel(logging.ERROR)  # "torchvision is not installed" x4
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # axis-renaming and pytree deprecation chatter
            prog = torch.onnx.export(wrapper, example, dynamo=True, opset_version=opset,
                                     dynamic_shapes=dynamic_shapes or _dynamic_shapes(),
                                     input_names=list(input_names or INPUT_NAMES),
                                     output_names=wrapper.output_names, external_data=False, optimize=True,
                                     verbose=False, report=False)
    except Exception as e:
        raise ExportError(f"torch.onnx.export (dynamo, opset {opset}) failed on {what}: "
                          f"{type(e).__name__}: {e}") from e
    finally:
        reg_log.setLevel(level)
    if prog is None:
        raise ExportError("torch.onnx.export returned no program")
    prog.save(str(path), external_data=False)


def _runtime_meta(student: Student, meta: dict, wrapper: ServingStudent, cfg: ExportConfig,
                  max_history: int, folder: Path) -> dict:
    item_ids = meta.get("item_ids")
    if not isinstance(item_ids, list) or len(item_ids) != student.n_items:
        raise ExportError(f"{folder / 'config.json'} must list item_ids (raw ids, one per internal id: "
                          f"{student.n_items}); got {type(item_ids).__name__} of length "
                          f"{len(item_ids) if isinstance(item_ids, list) else 'n/a'}; re-run the student stage")
    item_ids = [str(x) for x in item_ids]
    if len(set(item_ids)) != len(item_ids):
        raise ExportError(f"{folder / 'config.json'}: item_ids contain duplicates")
    popularity = meta.get("item_popularity")
    if popularity is None:
        popularity = [0] * student.n_items
    if len(popularity) != student.n_items:
        raise ExportError(f"{folder / 'config.json'}: item_popularity has {len(popularity)} entries, "
                          f"expected {student.n_items}")
    return {
        "schema_version": SCHEMA_VERSION,
        "model_file": C.STUDENT_FILE,
        "n_items": student.n_items,
        "item_ids": item_ids,
        "item_popularity": [int(x) for x in popularity],
        "like_threshold": float(meta.get("like_threshold", 4.0)),
        "max_history": max_history,
        "top_k": int(cfg.top_k),
        "tasks": list(wrapper.tasks),
        "inputs": [{"name": n, "dtype": INPUT_DTYPES[n], "shape": list(INPUT_AXES[n])} for n in INPUT_NAMES],
        "outputs": list(wrapper.output_names),
        "rating_range": list(RATING_RANGE),
        # a model trained on click-only data never saw a rating: the runtime rejects ratings sent to it
        "uses_ratings": bool(meta.get("has_ratings", C.uses_ratings(wrapper.tasks))),
        "data_hash": meta.get("data_hash"),
        "opset": int(cfg.opset),
        "providers": list(cfg.providers),
    }


# ---------------------------------------------------------------------------------------------- stage
def _opt(cfg, name, value, default):
    """kwarg > ExportConfig field (once the config has it) > default."""
    if value is not None:
        return value
    return getattr(cfg, name, default)


def export_student(student_dir: Path, onnx_dir: Path, cfg: ExportConfig, seed: int = 0,
                   variants: Optional[Sequence[str]] = None, int8_include_catalog_matmul: Optional[bool] = None,
                   strict_variants: Optional[bool] = None, calibration: Optional[tuple] = None) -> dict:
    """student/ -> onnx/student.onnx (+ variants) + the two-part model (encoder.onnx, scorer.onnx, items/, +
    encoder variants) + parity.json + runtime.json. Returns a summary dict.

    calibration: (histories, ratings or None), the run's training histories as internal ids, for the static
    INT8 encoder variant (without them it is calibrated on random requests, which measurably hurts it).

    variants: any of "opt", "int8", "fp16" (default: all; export/optimize.py); each is checked against the
    PyTorch student on the parity inputs and only placed when it meets its tolerance. strict_variants=True
    makes a failing variant fail the export instead of being left out with a warning.
    """
    from export.optimize import DEFAULT_VARIANTS, build_variants
    variants = tuple(_opt(cfg, "variants", variants, DEFAULT_VARIANTS))
    include_catalog = bool(_opt(cfg, "int8_include_catalog_matmul", int8_include_catalog_matmul, False))
    strict = bool(_opt(cfg, "strict_variants", strict_variants, False))
    student_dir, onnx_dir = Path(student_dir), Path(onnx_dir)
    student = Student.load(student_dir).eval()
    meta = json.loads((student_dir / "config.json").read_text())
    student.freeze_item_table()
    wrapper = ServingStudent(student).eval()
    max_history = _effective_max_history(student, meta)
    runtime = _runtime_meta(student, meta, wrapper, cfg, max_history, student_dir)

    # Example: batch >= 2 and distinct batch / L / C sizes (a size-1 example silently freezes an axis).
    if max_history < 2:
        raise ExportError(f"max_history={max_history} (student max_len={student.cfg.max_len}): the history axis "
                          f"cannot be exported as dynamic from a length-1 example; use max_len >= 2")
    rng = np.random.default_rng(seed)
    hist = min(max_history, 5)
    batch = 2 if hist != 2 else 3
    ex = _random_inputs(rng, student.n_items, batch=batch, hist=hist, n_cand=hist + batch + 1)
    example = tuple(torch.from_numpy(ex[k]) for k in INPUT_NAMES)

    onnx_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = onnx_dir / C.STUDENT_FILE
    refs = reference_outputs(wrapper, max_history, seed)
    t0 = time.perf_counter()
    import onnx
    with atomic_path(onnx_path) as tmp:
        _export_graph(wrapper, example, cfg.opset, tmp)
        export_s = time.perf_counter() - t0
        graph = onnx.load(str(tmp))
        verify_graph(graph, wrapper.output_names, student.n_items)
        try:
            parity = check_parity(wrapper, tmp, max_history, cfg.parity_tol, seed=seed, label=str(onnx_path),
                                  references=refs)
        except ExportError as e:
            rec = getattr(e, "parity", None)
            if rec is not None:
                write_json(onnx_dir / C.PARITY_FILE, {**rec, "opset": cfg.opset})
            raise
    parity = {**parity, "opset": cfg.opset, "op_types": graph_op_types(graph)}

    t1 = time.perf_counter()
    var = build_variants(onnx_path, onnx_dir, refs, wrapper.output_names, variants=variants,
                         parity_tol=cfg.parity_tol, include_catalog_matmul=include_catalog,
                         n_items=student.n_items, strict=strict)
    variants_s = time.perf_counter() - t1
    parity["variants"] = var
    write_json(onnx_dir / C.PARITY_FILE, parity)
    runtime["variants"] = {"fp32": {"file": C.STUDENT_FILE, "precision": "fp32", "gpu_only": False}}
    for kind, rec in var.items():
        if rec.get("passed"):
            runtime["variants"][kind] = {"file": rec["file"], "precision": rec["precision"],
                                         "gpu_only": rec["gpu_only"]}
    two_part_s = time.perf_counter()
    runtime["two_part"], parity["two_part"] = export_two_part(student, onnx_dir, runtime, cfg, refs, max_history, seed,
                                                              calibration=calibration, strict_variants=strict,
                                                              student_dir=student_dir)
    two_part_s = time.perf_counter() - two_part_s
    write_json(onnx_dir / C.PARITY_FILE, parity)

    def _short(rec):
        return {k: rec.get(k) for k in ("file", "passed", "size_bytes", "max_abs_diff", "max_rel_diff",
                                        "top10_overlap_mean", "problems")}

    return {
        "onnx": str(onnx_path),
        "runtime": str(onnx_dir / C.RUNTIME_META_FILE),
        "parity": str(onnx_dir / C.PARITY_FILE),
        "parity_passed": parity["passed"],
        "max_abs_diff": parity["max_abs_diff"],
        "size_bytes": onnx_path.stat().st_size,
        "outputs": list(wrapper.output_names),
        "max_history": max_history,
        "opset": cfg.opset,
        "export_seconds": round(export_s, 2),
        "variants_seconds": round(variants_s, 2),
        "two_part_seconds": round(two_part_s, 2),
        "two_part_parity": parity["two_part"]["max_abs_diff"],
        "item_table_version": runtime["two_part"]["table_version_at_export"],
        "variants": {k: _short(r) for k, r in var.items()},
    }


def export_two_part(student: Student, onnx_dir: Path, runtime: dict, cfg: ExportConfig, refs: list[dict],
                    max_history: int, seed: int, variants: Optional[Sequence[str]] = None,
                    calibration: Optional[tuple] = None, strict_variants: Optional[bool] = None,
                    student_dir: Optional[Path] = None) -> tuple[dict, dict]:
    """encoder.onnx + scorer.onnx + a new item table version, verified, then the served two-part path is checked
    against the PyTorch student (export/two_part.py). runtime.json is written with the "two_part" block only for
    the parity check and rewritten without it when the check fails (the single graph stays servable).

    encoder.onnx comes from the lean export forward (two_part.LeanUserEncoder: fewer nodes, the same numbers; the
    parity check holds it to parity_tol). Then its variants (variants, default ExportConfig.encoder_variants:
    opt / int8 / qdq / fp16) are built and checked (parity.json "two_part"["variants"]); runtime.json "two_part"
    "variants" lists fp32 and those that passed. calibration: (histories, ratings or None) of the run's training
    split (internal ids, chronological) for the static INT8 variant; without it random requests calibrate."""
    import onnx
    from export import two_part as TP
    enc_variants = tuple(_opt(cfg, "encoder_variants", variants, ()))
    strict = bool(_opt(cfg, "strict_variants", strict_variants, False))
    enc_path, sc_path = onnx_dir / C.ENCODER_FILE, onnx_dir / C.SCORER_FILE
    with atomic_path(enc_path) as tmp:
        encoder = TP.export_encoder(student, tmp, cfg.opset, hist=min(max_history, 5), seed=seed, forward="lean")
        TP.verify_io(onnx.load(str(tmp)), TP.encoder_io(), encoder.output_names, "encoder.onnx")
    scorer = None
    if any(t in student.tasks for t in C.SCORER_OUTPUTS):
        with atomic_path(sc_path) as tmp:
            scorer = TP.export_scorer(student, tmp, cfg.opset, seed=seed)
            TP.verify_io(onnx.load(str(tmp)), TP.scorer_io(scorer), scorer.output_names, "scorer.onnx")
    else:
        sc_path.unlink(missing_ok=True)
    from export.item_table import ItemTableError, current_version, publish_version
    items_dir = C.item_table_dir(onnx_dir)
    try:
        previous = current_version(items_dir)
    except ItemTableError:
        previous = None
    model_id = TP.student_model_id(student_dir) if student_dir is not None else None
    version = TP.write_item_table(student, onnx_dir, runtime["item_ids"], runtime["item_popularity"], model_id)
    meta = {**TP.two_part_meta(student, encoder, scorer), "table_version_at_export": version, "model_id": model_id}
    write_json(onnx_dir / C.RUNTIME_META_FILE, {**runtime, "two_part": meta})
    try:
        parity = TP.check_two_part_parity(onnx_dir, refs, cfg.parity_tol, single_graph=onnx_dir / C.STUDENT_FILE)
    except ExportError:
        write_json(onnx_dir / C.RUNTIME_META_FILE, runtime)
        if previous is not None:  # the unchecked table is not served: CURRENT goes back to what it named
            publish_version(items_dir, previous)
        for f in C.ENCODER_VARIANT_FILES.values():
            (onnx_dir / f).unlink(missing_ok=True)  # stale: built from an earlier encoder.onnx
        raise
    t0 = time.perf_counter()
    var = TP.build_encoder_variants(student, onnx_dir, refs, encoder.output_names, enc_variants, cfg.parity_tol,
                                    max_history, calibration=calibration, strict=strict, seed=seed)
    for kind, rec in var.items():
        if rec.get("passed"):
            meta["variants"][kind] = {"file": rec["file"], "precision": rec["precision"], "gpu_only": rec["gpu_only"]}
    write_json(onnx_dir / C.RUNTIME_META_FILE, {**runtime, "two_part": meta})
    enc_graph = onnx.load(str(enc_path))
    return meta, {**parity, "op_types": graph_op_types(enc_graph), "nodes": len(enc_graph.graph.node),
                  "variants": var, "variants_seconds": round(time.perf_counter() - t0, 2)}


def export_run(run_dir: Path, cfg: ExportConfig, seed: int = 0, variants: Optional[Sequence[str]] = None,
               int8_include_catalog_matmul: Optional[bool] = None, strict_variants: Optional[bool] = None,
               teacher: Optional[bool] = None, calibration: Optional[tuple] = None) -> dict:
    """The export stage: runs/<name>/student -> runs/<name>/onnx (student.onnx + variants, the two-part model,
    parity, runtime). calibration: see export_student (the orchestration passes the run's training histories).

    teacher=True (or ExportConfig.teacher once the config has it) also exports the teacher
    (export/teacher_export.py: teacher_onnx/teacher.onnx + teacher_parity.json, outside the serving folder
    onnx/) when runs/<name>/teacher exists."""
    run_dir = Path(run_dir)
    summary = export_student(run_dir / "student", C.serving_dir(run_dir), cfg, seed=seed, variants=variants,
                             int8_include_catalog_matmul=int8_include_catalog_matmul,
                             strict_variants=strict_variants, calibration=calibration)
    if bool(_opt(cfg, "teacher", teacher, False)):
        if not (run_dir / "teacher" / "config.json").exists():
            if teacher:  # asked for explicitly: an error; from the config default: a note
                raise ExportError(f"{run_dir / 'teacher'} is missing: run the teacher stage first, or export "
                                  f"without the teacher")
            logging.getLogger("distillrec.export").warning("no teacher in %s: %s not exported", run_dir,
                                                           C.TEACHER_ONNX_RELPATH)
            return summary
        from export.teacher_export import export_teacher
        summary["teacher"] = export_teacher(run_dir, opset=cfg.opset, seed=seed)
    return summary
