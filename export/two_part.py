"""Two-part export: the user encoder graph + the scorer graph + the item table (export time; uses torch).

    encoder.onnx   history_vectors [B, L, d] (item table rows of the history, gathered by the runtime),
                   history_ratings [B, L], history_length [B]
                   -> user_vector [B, d] (+ rating_user / like_user [B, h]: the towers' user features)
    scorer.onnx    rating_user [B, h], rating_items [B, C, h], like_user, like_items -> rating, like_logit [B, C]
    items/         the item table (export/item_table.py): vectors, bias, tower item features, active, ...

next_item for item i is user_vector @ vectors[i] + bias[i]: the runtime ranks the catalog with one matmul
(or an ANN index) outside the graph, so the graph's cost no longer grows with the catalog and a new item is a
new table row, not a new export. The encoder reads item VECTORS, not ids, so added items can appear in
histories at once. Its final block computes only the last state (Student.encode_vectors(last_only=True)).

Parity: the served two-part path (export.runtime.Recommender, two-part mode) is compared with the PyTorch
student's single-graph outputs on the same requests as the single graph's parity check, and with the
single ONNX graph (student.onnx); both within ExportConfig.parity_tol (parity.json "two_part").
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from distill.student import Student
from export import contract as C
from export.item_table import write_table


class UserEncoder(nn.Module):
    """encoder.onnx: (history_vectors, history_ratings, history_length) -> the encoder outputs of the tasks."""

    def __init__(self, student: Student):
        super().__init__()
        self.student = student
        self.tasks = [t for t in C.ENCODER_OUTPUTS if t in student.tasks]
        self.output_names = [C.ENCODER_OUTPUTS[t] for t in self.tasks]

    def forward(self, history_vectors, history_ratings, history_length):
        z = self.student.encode_vectors(history_vectors, history_ratings, history_length, last_only=True)
        out = self.student.user_side(z)
        return tuple(out[t] for t in self.tasks)


NEG = -1e9
"""Additive attention bias of a masked key: the student's finite masked_fill value (-1e9), so softmax maps it to
exactly 0 as in Block.forward (|scores| << ulp(1e9) = 64: score + NEG rounds to NEG)."""


class LeanUserEncoder(nn.Module):
    """encoder.onnx from an export-specific forward: the numbers of UserEncoder (Student.encode_vectors(
    last_only=True) + Student.user_side) with fewer ONNX nodes.

    What differs from the training forward (same math on every state the output depends on):
      * masks are ONE additive bias [B, 1, T, T] built once (key padding + causal) instead of the bool
        And / Or / Not / eye chain and a masked_fill per block; the final block's single query gets the
        key-padding bias alone (its causal row allows every key).
        Padding rows (slots before BOS) see no allowed key here, where the student lets them see themselves:
        their softmax stays finite (every score is ~NEG) and no valid row ever reads them (their keys are
        masked), so the last state is unchanged. Parity is checked against the student at export.
      * qkv: one MatMul on the fused weight, one Reshape to [B, T, 3H, dh] and one Transpose to
        [B, 3H, T, dh], then a Split into q / k / v: no 5-D permute + Gather/Squeeze chain.
      * 1/sqrt(dh) is folded into the query rows of the qkv weight and bias (no Div per block).
      * the leading empty slot is a Pad, not zeros_like + Concat; positions are one Sub + Clip + Gather.
    """

    def __init__(self, student: Student):
        super().__init__()
        self.student = student
        self.tasks = [t for t in C.ENCODER_OUTPUTS if t in student.tasks]
        self.output_names = [C.ENCODER_OUTPUTS[t] for t in self.tasks]
        d = student.cfg.dim
        ws, bs = [], []
        for blk in student.blocks:
            scale = torch.ones(3 * d)
            scale[:d] = 1.0 / math.sqrt(blk.dh)
            ws.append((blk.qkv.weight.detach() * scale[:, None]).T.contiguous())  # [d, 3d]: x @ w
            bs.append(blk.qkv.bias.detach() * scale)
        self.qkv_w = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in ws)
        self.qkv_b = nn.ParameterList(nn.Parameter(b, requires_grad=False) for b in bs)

    def _attend(self, i: int, x: torch.Tensor, bias: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Block i's attention + residual on x [B, T, d] -> [B, T or 1, d] (Block.forward's math)."""
        blk = self.student.blocks[i]
        h, dh = blk.heads, blk.dh
        qkv = self.student.blocks[i].ln1(x) @ self.qkv_w[i] + self.qkv_b[i]  # [B, T, 3d], q pre-scaled
        qkv = qkv.unflatten(-1, (3 * h, dh)).transpose(1, 2)  # [B, 3H, T, dh]
        q, k, v = qkv.split(h, dim=1)  # [B, H, T, dh] each
        if last_only:
            q, x = q[:, :, -1:], x[:, -1:]
        att = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        y = (att @ v).transpose(1, 2).flatten(2)  # [B, T or 1, d]
        return x + blk.out(y)

    def encode_last(self, history_vectors, history_ratings, history_length) -> torch.Tensor:
        """The state after the whole history [B, d] = Student.encode_vectors(..., last_only=True)."""
        s = self.student
        item_x = history_vectors + s.rating_emb(torch.clamp(torch.round(history_ratings), 0, 5).long())
        x = nn.functional.pad(item_x, (0, 0, 1, 0))  # [B, T = L + 1, d]; slot 0 never holds an item
        t = x.shape[1]
        idx = torch.arange(t, device=x.device)
        rel = idx.unsqueeze(0) - (t - 1 - history_length).unsqueeze(1)  # [B, T]: slot - BOS slot
        x = torch.where((rel == 0).unsqueeze(-1), s.bos, x)
        x = x + s.pos_emb(torch.clamp(rel, min=0))
        key_bias = torch.where(rel < 0, NEG, 0.0).unsqueeze(1).unsqueeze(1)  # [B, 1, 1, T]
        causal = torch.where(idx.unsqueeze(0) > idx.unsqueeze(1), NEG, 0.0)  # [T, T] (query, key)
        bias = key_bias + causal  # [B, 1, T, T]
        n = len(s.blocks)
        for i, blk in enumerate(s.blocks):
            last = i == n - 1
            x = self._attend(i, x, key_bias if last else bias, last)
            x = x + blk.ffn(blk.ln2(x))
        return s.ln_f(x[:, -1])

    def forward(self, history_vectors, history_ratings, history_length):
        out = self.student.user_side(self.encode_last(history_vectors, history_ratings, history_length))
        return tuple(out[t] for t in self.tasks)


class PairScorer(nn.Module):
    """scorer.onnx: per task (rating, like) its user features [B, h] and the candidates' item features
    [B, C, h] -> [B, C] (rating includes the rating mean, like is a logit): PairTower.combine."""

    def __init__(self, student: Student):
        super().__init__()
        self.student = student
        self.tasks = [t for t in C.SCORER_OUTPUTS if t in student.tasks]
        self.input_names = [name for t in self.tasks for name in C.SCORER_INPUTS[t]]
        self.output_names = [C.SCORER_OUTPUTS[t] for t in self.tasks]

    def forward(self, *inputs):
        outs = []
        for i, t in enumerate(self.tasks):
            user, items = inputs[2 * i], inputs[2 * i + 1]
            if t == "rating":
                outs.append(self.student.rating_tower.combine(user, items) + self.student.rating_mean)
            else:
                outs.append(self.student.like_tower.combine(user, items))
        return tuple(outs)


@torch.no_grad()
def item_arrays(student: Student, popularity) -> dict[str, np.ndarray]:
    """The trained catalog's item table arrays (rows = the student's internal ids)."""
    student.freeze_item_table()
    table = student.item_table()
    out = {"vectors": table.numpy().astype(np.float32),
           "bias": student.item_bias.detach().numpy().astype(np.float32),
           "popularity": np.asarray(popularity, dtype=np.int64)}
    for task, feats in student.item_side(table).items():
        out[task] = feats.numpy().astype(np.float32)
    if student.text_vectors is not None:
        out["text"] = student.text_vectors.numpy().astype(np.float32)
    return out


@torch.no_grad()
def cold_item_arrays(student: Student, text_vectors: np.ndarray, with_text: bool = True) -> dict[str, np.ndarray]:
    """Item table arrays of items the student never saw, from their standardised teacher text vectors [M, T]:
    zero ID embedding and zero bias (the cold-start path, Student.forget_ids), tower features from the result."""
    text = torch.from_numpy(np.asarray(text_vectors, dtype=np.float32))
    vecs = student.cold_item_vectors(text)
    out = {"vectors": vecs.numpy().astype(np.float32), "bias": np.zeros(len(text), dtype=np.float32)}
    for task, feats in student.item_side(vecs).items():
        out[task] = feats.numpy().astype(np.float32)
    if with_text:
        out["text"] = text.numpy()
    return out


def _encoder_shapes() -> dict:
    from torch.export import Dim
    batch, hist = Dim("batch", min=1), Dim("history", min=1)
    return {"history_vectors": {0: batch, 1: hist}, "history_ratings": {0: batch, 1: hist},
            "history_length": {0: batch}}


def _scorer_shapes(scorer: PairScorer) -> dict:
    """{"inputs": per positional input its dynamic axes} (forward takes *inputs: one entry per graph input)."""
    from torch.export import Dim
    batch, cand = Dim("batch", min=1), Dim("candidates", min=1)
    shapes = []
    for _ in scorer.tasks:
        shapes += [{0: batch}, {0: batch, 1: cand}]
    return {"inputs": tuple(shapes)}


ENCODER_FORWARDS = {"lean": LeanUserEncoder, "student": UserEncoder}
"""Which forward encoder.onnx is exported from: "lean" (default: fewer nodes, same numbers, see LeanUserEncoder)
or "student" (Student.encode_vectors as trained: the reference the lean one is tested against)."""


def export_encoder(student: Student, path: Path, opset: int, hist: int, seed: int = 0,
                   forward: str = "lean") -> nn.Module:
    """Export encoder.onnx from an example of batch 2 (3 when hist == 2: distinct sizes keep axes symbolic)."""
    from export.onnx_export import _export_graph  # the shared dynamo export call
    if forward not in ENCODER_FORWARDS:
        raise ValueError(f"encoder forward must be one of {sorted(ENCODER_FORWARDS)}, got {forward!r}")
    enc = ENCODER_FORWARDS[forward](student).eval()
    g = torch.Generator().manual_seed(seed)
    batch = 2 if hist != 2 else 3
    vecs = torch.randn(batch, hist, student.cfg.dim, generator=g)
    rates = torch.randint(0, 6, (batch, hist), generator=g).float()
    length = torch.tensor([hist] + [max(1, hist - 1)] * (batch - 1), dtype=torch.int64)
    _export_graph(enc, (vecs, rates, length), opset, path, input_names=list(C.ENCODER_INPUT_NAMES),
                  dynamic_shapes=_encoder_shapes(), what="the user encoder")
    return enc


def export_scorer(student: Student, path: Path, opset: int, seed: int = 0) -> Optional[PairScorer]:
    from export.onnx_export import _export_graph
    scorer = PairScorer(student).eval()
    if not scorer.tasks:
        return None
    g = torch.Generator().manual_seed(seed)
    h = student.cfg.tower_hidden
    example = []
    for _ in scorer.tasks:
        example += [torch.randn(2, h, generator=g), torch.randn(2, 3, h, generator=g)]
    _export_graph(scorer, tuple(example), opset, path, input_names=scorer.input_names,
                  dynamic_shapes=_scorer_shapes(scorer), what="the pair scorer")
    return scorer


def verify_io(model, inputs: dict, outputs: list[str], what: str) -> None:
    """Names, dtypes and symbolic axes of a two-part graph; raises ExportError."""
    import onnx
    from export.onnx_export import ExportError, _elem_type_name, check_op_set
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        raise ExportError(f"onnx.checker rejected {what}: {e}") from e
    check_op_set(model)
    ins = {v.name: v for v in model.graph.input}
    outs = [v.name for v in model.graph.output]
    if list(ins) != list(inputs):
        raise ExportError(f"{what} has inputs {list(ins)}, expected {list(inputs)}")
    if outs != list(outputs):
        raise ExportError(f"{what} has outputs {outs}, expected {list(outputs)}")
    for name, (dtype, rank, symbolic) in inputs.items():
        t = ins[name].type.tensor_type
        got = _elem_type_name(t.elem_type)
        dims = [d.dim_param or None for d in t.shape.dim]
        if got != dtype or len(dims) != rank:
            raise ExportError(f"{what}: input {name} is {got} of rank {len(dims)}, expected {dtype} of rank {rank}")
        if not all(dims[i] for i in symbolic):
            raise ExportError(f"{what}: input {name} has dims {dims}; axes {symbolic} must be symbolic")
    for v in model.graph.output:
        if _elem_type_name(v.type.tensor_type.elem_type) != "float32":
            raise ExportError(f"{what}: output {v.name} must be float32")


def encoder_io() -> dict:
    """name -> (dtype, rank, symbolic axes) of encoder.onnx's inputs (dim is fixed by the model)."""
    return {"history_vectors": ("float32", 3, (0, 1)), "history_ratings": ("float32", 2, (0, 1)),
            "history_length": ("int64", 1, (0,))}


def scorer_io(scorer: PairScorer) -> dict:
    out = {}
    for t in scorer.tasks:
        user, items = C.SCORER_INPUTS[t]
        out[user] = ("float32", 2, (0,))
        out[items] = ("float32", 3, (0, 1))
    return out


def student_model_id(student_dir: Path) -> str:
    """The export a table belongs to: sha256 (16 hex) of the student's weights file. Stamped into runtime.json
    ("two_part" "model_id") and every table version's meta.json; the runtime refuses a table of another model
    (a server still holding the previous encoder after a re-export) and add-items a retrained student."""
    import hashlib
    h = hashlib.sha256()
    with open(Path(student_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def write_item_table(student: Student, onnx_dir: Path, item_ids: list[str], popularity,
                     model_id: Optional[str] = None) -> int:
    """Publish the trained catalog as a new item table version (added items of an earlier table are NOT
    carried over: a re-export serves what the student was trained on; re-run add-items for the rest)."""
    arrays = item_arrays(student, popularity)
    return write_table(C.item_table_dir(onnx_dir), item_ids, arrays, change={"kind": "export", "count": len(item_ids)},
                       trained_items=len(item_ids), model_id=model_id)


def two_part_meta(student: Student, encoder: nn.Module, scorer: Optional[PairScorer]) -> dict:
    """runtime.json "two_part": what the runtime needs to serve the encoder + item table."""
    return {"encoder_file": C.ENCODER_FILE, "scorer_file": C.SCORER_FILE if scorer is not None else None,
            "item_table": C.ITEM_TABLE_DIR, "dim": int(student.cfg.dim), "tower_hidden": int(student.cfg.tower_hidden),
            "encoder_inputs": list(C.ENCODER_INPUT_NAMES), "encoder_outputs": list(encoder.output_names),
            "scorer_inputs": list(scorer.input_names) if scorer is not None else [],
            "scorer_outputs": list(scorer.output_names) if scorer is not None else [],
            "variants": {"fp32": {"file": C.ENCODER_FILE, "precision": "fp32", "gpu_only": False}}}


def check_two_part_parity(onnx_dir: Path, references: list[dict], tol: float, single_graph: Optional[Path] = None) -> dict:
    """The two-part path as served (Recommender, two-part mode, exact scores) vs the PyTorch single-graph
    outputs on the parity requests, and vs the single ONNX graph when given. Raises ExportError over tol."""
    import onnxruntime as ort
    from export.onnx_export import ExportError
    from export.runtime import Recommender
    rec = Recommender(onnx_dir, mode="two_part", intra_op_threads=1, retrieval="exact")
    single = ort.InferenceSession(str(single_graph), providers=["CPUExecutionProvider"]) if single_graph else None
    worst = {"vs_torch": {}, "vs_single_onnx": {}}
    for ref in references:
        f = ref["feed"]
        got = rec.predict_arrays(f["history_items"], f["history_ratings"], f["history_length"], f["candidates"])
        outs = {"vs_torch": ref["out"]}
        if single is not None:
            names = [o.name for o in single.get_outputs()]
            outs["vs_single_onnx"] = dict(zip(names, single.run(names, {k: f[k] for k in C.INPUT_NAMES})))
        for key, other in outs.items():
            for name, r in other.items():
                g = got[name]
                if g.shape != r.shape:
                    raise ExportError(f"two-part {name} has shape {g.shape}, the single graph {r.shape}")
                d = float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64)))) if r.size else 0.0
                worst[key][name] = max(worst[key].get(name, 0.0), d)
    problems = [f"{key} {name}: max |diff| = {d:.3g} > {tol:g}" for key, w in worst.items()
                for name, d in w.items() if not d <= tol]
    record = {"tolerance": tol, "max_abs_diff": worst["vs_torch"], "max_abs_diff_vs_single_onnx": worst["vs_single_onnx"],
              "points": len(references), "passed": not problems, "problems": problems}
    if problems:
        err = ExportError("two-part parity check failed: " + "; ".join(problems))
        err.parity = record
        raise err
    return record


# ---------------------------------------------------------------------------------------------- encoder variants
def encoder_feed(table: np.ndarray, items: np.ndarray, ratings: np.ndarray, length: np.ndarray) -> dict:
    """encoder.onnx's feed for LEFT-padded internal ids: the runtime's gather (table rows of the history)."""
    return {"history_vectors": np.ascontiguousarray(table[items], dtype=np.float32),
            "history_ratings": np.asarray(ratings, dtype=np.float32),
            "history_length": np.asarray(length, dtype=np.int64)}


@torch.no_grad()
def encoder_references(student: Student, refs: list[dict]) -> list[dict]:
    """The parity requests of the single graph as encoder feeds, with the PyTorch student's encoder outputs
    (UserEncoder: Student.encode_vectors as trained, FP32): what every encoder variant is measured against."""
    student.freeze_item_table()
    table = student.item_table().numpy()
    enc = UserEncoder(student).eval()
    out = []
    for ref in refs:
        f = ref["feed"]
        feed = encoder_feed(table, f["history_items"], f["history_ratings"], f["history_length"])
        got = enc(*(torch.from_numpy(feed[k]) for k in C.ENCODER_INPUT_NAMES))
        out.append({"point": dict(ref["point"]), "feed": feed,
                    "out": dict(zip(enc.output_names, (t.numpy() for t in got)))})
    return out


def encoder_scores_fn(vectors: np.ndarray, bias: np.ndarray):
    """outputs -> catalog scores [B, N] = user_vector @ vectors.T + bias (how the runtime ranks): the ranking the
    int8 / qdq / fp16 variants must preserve (top-K overlap with FP32 PyTorch)."""
    vt, b = np.ascontiguousarray(np.asarray(vectors, np.float32).T), np.asarray(bias, np.float32)
    return lambda out: out[C.ENCODER_OUTPUTS["next_item"]] @ vt + b


CALIBRATION_BATCH = 16
"""Rows per calibration feed of static quantization (ranges are taken over all of them; the batch only bounds
the memory of the calibrator's per-call activations)."""
CALIBRATION_ROWS = 512
"""Histories used for calibration at most (ml-100k's 943 users: about half; MinMax ranges settle well before)."""


def calibration_feeds(table: np.ndarray, histories: list, ratings: Optional[list], max_history: int,
                      batch: int = CALIBRATION_BATCH, rows: int = CALIBRATION_ROWS, seed: int = 0) -> list[dict]:
    """Encoder feeds for static-quantization calibration from histories (lists of internal item ids in
    chronological order, e.g. the run's training split; ratings per history or None = unknown): the last
    max_history items of each, LEFT-padded like the runtime's requests, `batch` rows per feed."""
    if not histories:
        raise ValueError("calibration needs at least one history")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(histories))[:rows]
    feeds = []
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        items = np.zeros((len(idx), max_history), np.int64)
        rates = np.zeros((len(idx), max_history), np.float32)
        length = np.zeros(len(idx), np.int64)
        for r, u in enumerate(idx):
            h = np.asarray(histories[u], np.int64)[-max_history:]
            n = len(h)
            length[r] = n
            if n:
                items[r, -n:] = h
                if ratings is not None and ratings[u] is not None:
                    rates[r, -n:] = np.asarray(ratings[u], np.float32)[-max_history:]
        feeds.append(encoder_feed(table, items, rates, length))
    return feeds


def random_calibration(table: np.ndarray, max_history: int, batches: int = 8, batch: int = CALIBRATION_BATCH,
                       seed: int = 0) -> list[dict]:
    """Fallback calibration when no training histories are given: random catalog items and ratings 1..5 with
    random lengths (the full length in a quarter of the rows). Real histories give tighter activation ranges."""
    rng = np.random.default_rng([seed, 104729])
    n = len(table)
    hist = [rng.integers(0, n, size=int(rng.choice([max_history, rng.integers(1, max_history + 1)], p=[.25, .75])))
            for _ in range(batches * batch)]
    rates = [rng.integers(1, 6, size=len(h)).astype(np.float32) for h in hist]
    return calibration_feeds(table, hist, rates, max_history, batch=batch, rows=len(hist), seed=seed)


def build_encoder_variants(student: Student, onnx_dir: Path, refs: list[dict], output_names: list[str],
                           variants, parity_tol: float, max_history: int, calibration: Optional[list] = None,
                           strict: bool = False, seed: int = 0) -> dict:
    """encoder.{opt,int8,qdq,fp16}.onnx from the placed encoder.onnx, each measured against the PyTorch student's
    encoder on the parity requests (export/optimize.build_variants; a failing one is not placed).

    calibration: training histories for "qdq" as (histories, ratings or None) — internal ids, chronological —
    else random requests are used (recorded as calibration "random" in the record)."""
    from export.optimize import build_variants
    student.freeze_item_table()
    table = student.item_table().numpy()
    enc_refs = encoder_references(student, refs)
    if calibration is not None:
        hist, rates = calibration
        feeds, source = calibration_feeds(table, hist, rates, max_history, seed=seed), "training histories"
    else:
        feeds, source = random_calibration(table, max_history, seed=seed), "random requests"
    records = build_variants(Path(onnx_dir) / C.ENCODER_FILE, onnx_dir, enc_refs, output_names,
                             variants=tuple(variants), parity_tol=parity_tol, strict=strict,
                             files=C.ENCODER_VARIANT_FILES,
                             scores_fn=encoder_scores_fn(table, student.item_bias.detach().numpy()),
                             calibration=feeds if "qdq" in variants else None)
    if "qdq" in records:
        records["qdq"]["calibration"] = source
    return records
