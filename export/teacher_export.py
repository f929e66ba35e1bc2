"""Export the teacher (LLM with its LoRA merged + task heads) to ONNX: the benchmark's fastest fair teacher.

    export_teacher(run_dir) -> runs/<name>/teacher_onnx/teacher.onnx + teacher_parity.json

The teacher (~0.5 GB for SmolLM2-135M) is written outside runs/<name>/onnx/, the folder production ships
(paths: export/contract.py). A teacher.onnx that an older export left in onnx/ is removed once the new one
is placed.

Graph signature (what serve_bench's TeacherOnnxSystem feeds):
  inputs   input_ids       int64 [batch, tokens]   right-padded token ids (distill.teacher.SequenceBuilder)
           attention_mask  int64 [batch, tokens]   1 = real token
           before_pos      int64 [batch]           per row: the last token BEFORE the target item's text
           item_pos        int64 [batch]           per row: the last token OF the target item's text
  outputs  next_item_scores float32 [batch, n_items]  (read at before_pos)
           rating           float32 [batch]           (read at item_pos; when the teacher has the task)
           like_logit       float32 [batch]           (read at item_pos; when the teacher has the task)
This is `teacher_predict` (distill/teacher_eval.py) with one (row, position) pair per row.

Exporter choice: optimum's ONNX exporter lives in `optimum-onnx` (optimum 2.x holds no ONNX code); its only
release, 0.1.0, requires transformers < 4.58 while this project runs transformers 5.x, so it cannot be
installed alongside (pip would downgrade transformers to 4.57 and optimum to 2.1). It would also only export
the bare LM, not our heads and gathers. We export with torch.onnx.export(dynamo=True, opset 20) on the
merged model (peft merge_and_unload: plain Linear weights, no LoRA branches at inference), with eager
attention (the ONNX graph then carries plain MatMul/Softmax, no opset-23 Attention op); docs/export.md.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from distill.io import atomic_path, write_json
from export import contract as C

INPUT_NAMES = C.TEACHER_INPUT_NAMES
TASK_OUTPUTS = C.TASK_OUTPUTS
PARITY_TOL = 1e-3
EXTERNAL_DATA_BYTES = 2 * 1024 ** 3 - 64 * 1024 ** 2  # protobuf's 2 GB limit, with headroom for the graph


class TeacherExportError(ValueError):
    """The teacher graph could not be exported or disagrees with the PyTorch teacher."""


class ServingTeacher(nn.Module):
    """(input_ids, attention_mask, before_pos, item_pos) -> next_item_scores [B, N], rating [B], like_logit [B].

    The heads' item table (item projection of the frozen item vectors + item embedding) does not depend on
    the request: it is computed once here and stored as a constant, like the student's frozen table."""

    def __init__(self, teacher):
        super().__init__()
        self.backbone = teacher.backbone
        self.inputs = teacher.inputs  # soft item/rating tokens (input='item_tokens') or None
        heads = teacher.heads
        self.heads = heads
        self.tasks = [t for t in TASK_OUTPUTS if t == "next_item" or t in heads.tasks]
        self.output_names = [TASK_OUTPUTS[t] for t in self.tasks]
        with torch.no_grad():
            self.register_buffer("item_table_t", heads.item_table().detach().T.contiguous().clone())

    def forward(self, input_ids, attention_mask, before_pos, item_pos):
        if self.inputs is None:
            h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            emb = self.inputs(input_ids, self.backbone.get_input_embeddings())
            h = self.backbone(inputs_embeds=emb, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(h.shape[0], device=h.device)
        hb, hi = h[rows, before_pos], h[rows, item_pos]
        out = [self.heads.user_vector(hb) @ self.item_table_t + self.heads.item_bias]
        z = self.heads.norm(hi)
        if "rating" in self.tasks:
            out.append(self.heads.rating(z).squeeze(-1) + self.heads.rating_mean)
        if "like" in self.tasks:
            out.append(self.heads.like(z).squeeze(-1))
        return tuple(out)


def _set_eager_attention(model: nn.Module) -> Optional[str]:
    """Eager attention: decomposes to MatMul/Softmax (no SDPA -> opset-23 Attention, no mask fast paths)."""
    cfg = getattr(model, "config", None)
    before = getattr(cfg, "_attn_implementation", None)
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            with contextlib.suppress(Exception):
                c._attn_implementation = "eager"
    return before


def random_feeds(vocab: int, pad_id: int, seed: int, shapes=((1, 17), (2, 33), (3, 64))) -> list[dict]:
    """Fresh right-padded token batches (ids in [3, vocab)), a full-length row and shorter ones per batch,
    with before_pos < item_pos inside each row's real tokens."""
    rng = np.random.default_rng([seed, 104729])
    feeds = []
    for b, t in shapes:
        lengths = rng.integers(max(4, t // 3), t + 1, size=b)
        lengths[0] = t
        ids = np.full((b, t), pad_id, dtype=np.int64)
        mask = np.zeros((b, t), dtype=np.int64)
        before, item = np.zeros(b, np.int64), np.zeros(b, np.int64)
        for r, n in enumerate(lengths):
            ids[r, :n] = rng.integers(3, vocab, size=n)
            mask[r, :n] = 1
            item[r] = n - 1
            before[r] = rng.integers(1, n - 1)
        feeds.append({"input_ids": ids, "attention_mask": mask, "before_pos": before, "item_pos": item})
    return feeds


def _export(wrapper: ServingTeacher, example: dict, opset: int, path: Path) -> float:
    from torch.export import Dim
    batch, tokens = Dim("batch", min=1), Dim("tokens", min=2)
    dyn = {"input_ids": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: tokens},
           "before_pos": {0: batch}, "item_pos": {0: batch}}
    args = tuple(torch.from_numpy(example[k]) for k in INPUT_NAMES)
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg_log.level
    reg_log.setLevel(logging.ERROR)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, dynamic_shapes=dyn,
                                     input_names=list(INPUT_NAMES), output_names=wrapper.output_names,
                                     external_data=False, optimize=True, verbose=False, report=False)
    except Exception as e:
        raise TeacherExportError(f"torch.onnx.export (dynamo, opset {opset}) failed on the teacher: "
                                 f"{type(e).__name__}: {str(e)[:2000]}") from e
    finally:
        reg_log.setLevel(level)
    n_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters()) + \
        sum(b.numel() * b.element_size() for b in wrapper.buffers())
    external = n_bytes > EXTERNAL_DATA_BYTES
    prog.save(str(path), external_data=external)
    return time.perf_counter() - t0


def torch_reference(wrapper: ServingTeacher, feeds: list[dict]) -> list[list[np.ndarray]]:
    out = []
    for feed in feeds:
        with torch.no_grad():
            out.append([t.numpy() for t in wrapper(*(torch.from_numpy(feed[k]) for k in INPUT_NAMES))])
    return out


def _compare(names: list[str], sess, feeds: list[dict], refs: list, tol: float) -> dict:
    worst = {n: 0.0 for n in names}
    scale = {n: 0.0 for n in names}
    points, problems = [], []
    for feed, ref in zip(feeds, refs):
        got = sess.run(names, feed)
        diffs = {}
        for n, r, g in zip(names, ref, got):
            b, t = feed["input_ids"].shape
            if r.shape != g.shape:
                problems.append(f"{n}: shape {g.shape} vs torch {r.shape} at batch={b} tokens={t}")
                diffs[n] = worst[n] = float("inf")
                continue
            if not np.all(np.isfinite(g)):
                problems.append(f"{n}: non-finite values at batch={b} tokens={t}")
            d = float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64))))
            diffs[n] = d if np.isfinite(d) else float("inf")
            worst[n] = max(worst[n], diffs[n])
            scale[n] = max(scale[n], float(np.max(np.abs(r))))
        points.append({"batch": int(feed["input_ids"].shape[0]), "tokens": int(feed["input_ids"].shape[1]),
                       "lengths": feed["attention_mask"].sum(1).tolist(), "max_abs_diff": diffs})
    for n, d in worst.items():
        if not d <= tol:
            problems.append(f"{n}: max |onnx - torch| = {d:.3g} exceeds {tol:g} (largest |output| {scale[n]:.3g})")
    return {"tolerance": tol, "max_abs_diff": worst, "max_abs_value": scale, "points": points,
            "problems": problems, "passed": not problems}


def _remove_legacy_teacher(run_dir: Path) -> list[str]:
    """Exports before the teacher_onnx/ folder put teacher.onnx into onnx/ (the serving folder): remove it."""
    removed = []
    legacy = C.serving_dir(run_dir)
    for name in (C.TEACHER_ONNX_FILE, C.TEACHER_ONNX_FILE + ".data", C.TEACHER_PARITY_FILE):
        p = legacy / name
        if p.is_file():
            p.unlink()
            removed.append(str(p))
    if removed:
        logging.getLogger("distillrec.export").warning(
            "removed the teacher an older export left in the serving folder (now in %s): %s",
            C.teacher_onnx_dir(run_dir), removed)
    return removed


def export_teacher(run_dir: Path, opset: int = 20, seed: int = 0, tol: float = PARITY_TOL,
                   out_dir: Optional[Path] = None) -> dict:
    """runs/<name>/teacher -> runs/<name>/teacher_onnx/teacher.onnx + teacher_parity.json. Returns a summary.

    out_dir overrides the folder (default: export.contract.teacher_onnx_dir(run_dir)).

    teacher.onnx is only (re)placed when the parity check passes; teacher_parity.json is written either way.
    """
    import onnx
    import onnxruntime as ort
    import peft
    import transformers

    from distill.teacher import load_teacher
    run_dir = Path(run_dir)
    onnx_dir = Path(out_dir) if out_dir is not None else C.teacher_onnx_dir(run_dir)
    t0 = time.perf_counter()
    teacher, tok, meta = load_teacher(run_dir / "teacher", merge=True)
    load_s = time.perf_counter() - t0
    lora_left = [n for n, _ in teacher.backbone.named_modules() if "lora_" in n]
    if lora_left:
        raise TeacherExportError(f"merge_and_unload left LoRA modules in the backbone: {lora_left[:5]}")
    wrapper = ServingTeacher(teacher).eval()
    vocab = int(teacher.backbone.config.vocab_size)
    if teacher.inputs is not None:  # virtual ids: items and ratings above the LM's vocabulary
        vocab = teacher.inputs.vocab + teacher.inputs.n_items + teacher.inputs.rating_emb.shape[0]
    pad_id = int(getattr(tok, "pad_id", 0) or 0)
    # the reference is the teacher as it predicts (its own attention implementation, e.g. sdpa) ...
    feeds = random_feeds(vocab, pad_id, seed)
    refs = torch_reference(wrapper, feeds)
    # ... the export uses eager attention (plain MatMul/Softmax in the graph)
    attn_before = _set_eager_attention(teacher.backbone)
    example = random_feeds(vocab, pad_id, seed, shapes=((2, 24),))[0]
    example["attention_mask"][1, 20:] = 0  # a padded row in the example too
    example["item_pos"][1] = 19
    example["before_pos"][1] = min(int(example["before_pos"][1]), 18)

    onnx_dir.mkdir(parents=True, exist_ok=True)
    path = onnx_dir / C.TEACHER_ONNX_FILE
    with atomic_path(path) as tmp:
        export_s = _export(wrapper, example, opset, tmp)
        graph = onnx.load(str(tmp), load_external_data=False)
        ops = sorted({n.op_type for n in graph.graph.node})
        ins = [i.name for i in graph.graph.input]
        outs = [o.name for o in graph.graph.output]
        if ins != list(INPUT_NAMES) or outs != wrapper.output_names:
            raise TeacherExportError(f"teacher graph has inputs {ins} / outputs {outs}; expected "
                                     f"{list(INPUT_NAMES)} / {wrapper.output_names}")
        if "Attention" in ops:
            raise TeacherExportError("the teacher graph contains the opset-23 Attention op; export at opset 20")
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        rec = _compare(wrapper.output_names, sess, feeds, refs, tol)
        rec.update(opset=opset, exporter="torch.onnx.export(dynamo=True)", attn_implementation="eager",
                   attn_implementation_trained=attn_before, lora_merged=True, seed=seed,
                   reference=f"PyTorch teacher, LoRA merged, attn_implementation={attn_before}",
                   torch_version=torch.__version__, transformers_version=transformers.__version__,
                   peft_version=peft.__version__, onnxruntime_version=ort.__version__,
                   outputs=wrapper.output_names, op_types=ops, base_model=meta.get("teacher", {}).get("model"),
                   n_items=int(wrapper.item_table_t.shape[1]))
        if not rec["passed"]:
            write_json(onnx_dir / C.TEACHER_PARITY_FILE, rec)
            raise TeacherExportError("teacher ONNX parity failed: " + "; ".join(rec["problems"]))
    rec["size_bytes"] = path.stat().st_size
    rec["export_seconds"] = round(export_s, 2)
    rec["load_seconds"] = round(load_s, 2)
    write_json(onnx_dir / C.TEACHER_PARITY_FILE, rec)
    if out_dir is None:
        _remove_legacy_teacher(run_dir)
    return {"onnx": str(path), "parity": str(onnx_dir / C.TEACHER_PARITY_FILE), "parity_passed": True,
            "max_abs_diff": rec["max_abs_diff"], "size_bytes": rec["size_bytes"], "outputs": wrapper.output_names,
            "opset": opset, "export_seconds": rec["export_seconds"]}
