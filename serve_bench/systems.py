"""The systems under test, one interface: `forward(request) -> {"next_item": [B, N], "rating": [B, C], "like": [B, C]}`.

request = (history_items int64 [B, L], history_ratings float32 [B, L], history_length int64 [B],
candidates int64 [B, C]), internal item ids, left padded (serve_bench.workload).

  TeacherTorchSystem   the LLM teacher in PyTorch, LoRA merged into the base weights, inference mode
  TeacherOnnxSystem    teacher_onnx/teacher.onnx (inputs input_ids, attention_mask, before_pos, item_pos) on onnxruntime
  StudentTorchSystem   the student in PyTorch (item table frozen, inference mode)
  StudentOnnxSystem    an exported single-graph student file through the serving runtime (export.runtime.Recommender)
  TwoPartSystem        the served two-part path: encoder.onnx (or an encoder variant) + the item table, through the
                       same runtime (mode="two_part", exact retrieval: the catalog is 1,682 items); its top-K
                       workload is the served one (encoder -> retriever.search with the history excluded), its
                       forward the runtime's predict_arrays (encoder + catalog matmul + scorer: full scores)

How the teacher answers a request: it reads the history as text and then ONE candidate's text
(docs/protocol.md: the state before the candidate's text gives the full-catalog next_item scores, the state at
the end of it gives that candidate's rating / like). Scoring C candidates therefore takes C sequences
(history + candidate c), run as C rows of one batch: the cost grows linearly in C (no KV-cache sharing).
The benchmark measures the teacher on `teacher_candidates` candidates per request and says so.

This module imports neither torch nor distill at module level: the RSS probe of an onnxruntime system
runs in a process that never loads torch.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import numpy as np

SHORT_PROVIDER = {"CPUExecutionProvider": "CPU", "CUDAExecutionProvider": "CUDA",
                  "TensorrtExecutionProvider": "TensorRT"}
STUDENT_VARIANTS = {  # variant -> (model file, label)
    "fp32": ("student.onnx", "student (ONNX)"),
    "opt": ("student.opt.onnx", "student (ONNX, optimized)"),
    "int8": ("student.int8.onnx", "student (ONNX, INT8)"),
    "fp16": ("student.fp16.onnx", "student (ONNX, FP16)"),
}
TEACHER_ONNX_FILE = "teacher_onnx/teacher.onnx"  # run-relative, outside onnx/ (= export.contract.TEACHER_ONNX_RELPATH)


def short_provider(p: str) -> str:
    return SHORT_PROVIDER.get(p, p.replace("ExecutionProvider", ""))


def file_size(path: Path) -> int:
    """Bytes of a model file plus its external-data files (`<name>.data`, `<name>_data`, ...)."""
    path = Path(path)
    total = path.stat().st_size
    for extra in path.parent.glob(path.name + "*"):
        if extra != path and extra.is_file() and not extra.name.endswith(".tmp"):
            total += extra.stat().st_size
    return total


def onnx_param_count(path: Path) -> int:
    """Elements of every initializer (weights of any precision; an INT8 weight counts once)."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        total += int(np.prod(init.dims)) if len(init.dims) else 1
    return total


def _ort_session(path: Path, providers: Optional[list], intra_op_threads: Optional[int]):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if intra_op_threads is not None:
        opts.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])


class System:
    name = "system"
    kind = "student"  # teacher | student
    runtime = "pytorch"  # pytorch | onnxruntime
    variant = "fp32"
    provider = "CPUExecutionProvider"
    requested_provider = "CPUExecutionProvider"
    device = "cpu"
    params = 0
    size_bytes = 0
    model_path: Optional[str] = None
    serving: Optional[str] = None  # ONNX students: "single" (one graph) or "two_part" (encoder + item table)

    def forward(self, req: tuple) -> dict:
        raise NotImplementedError

    @contextlib.contextmanager
    def threads(self, n: Optional[int]):
        """Within the block the system computes with `n` intra-op threads (None = its default: all cores)."""
        yield

    @property
    def fallback(self) -> bool:
        return self.provider != self.requested_provider

    def meta(self) -> dict:
        return dict(kind=self.kind, runtime=self.runtime, variant=self.variant, provider=self.provider,
                    requested_provider=self.requested_provider, fallback=self.fallback, device=self.device,
                    params=int(self.params), bytes=int(self.size_bytes), model_path=self.model_path,
                    serving=self.serving)

    def close(self) -> None:
        pass


class _TorchThreads:
    @contextlib.contextmanager
    def threads(self, n: Optional[int]):
        import torch
        before = torch.get_num_threads()
        if n is not None:
            torch.set_num_threads(int(n))
        try:
            yield
        finally:
            torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ students
class StudentTorchSystem(_TorchThreads, System):
    name = "student (PyTorch)"
    runtime = "pytorch"

    def __init__(self, run: Path, device: str = "cpu"):
        import torch

        from distill.student import Student
        self.torch = torch
        self.model = Student.load(Path(run) / "student").to(device).eval()
        self.model.freeze_item_table()
        self.device = device
        self.provider = self.requested_provider = f"torch-{device}"
        self.params = sum(p.numel() for p in self.model.parameters())
        self.model_path = str(Path(run) / "student" / "model.safetensors")
        self.size_bytes = Path(self.model_path).stat().st_size

    def forward(self, req: tuple) -> dict:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(*(torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in req))
            return {k: out[k].float().cpu().numpy() for k in ("next_item", "rating", "like") if k in out}


def _ort_threads(n: Optional[int]) -> int:
    """The bench's thread setting -> Recommender's intra_op_threads: None (all threads) = 0, onnxruntime's default."""
    return 0 if n is None else int(n)


class StudentOnnxSystem(System):
    """One exported student file on one provider, through export.runtime.Recommender (the serving path)."""

    runtime = "onnxruntime"
    serving = "single"

    def __init__(self, onnx_dir: Path, variant: str = "fp32", providers: Optional[list] = None,
                 label: Optional[str] = None, model_file: Optional[str] = None,
                 intra_op_threads: Optional[int] = None):
        from export.runtime import Recommender
        self.onnx_dir = Path(onnx_dir)
        self.variant = variant
        default_file, default_label = STUDENT_VARIANTS.get(variant, (f"student.{variant}.onnx", f"student ({variant})"))
        self.model_file = model_file or default_file
        self.providers_arg = list(providers or ["CPUExecutionProvider"])
        first = self.providers_arg[0]
        self.requested_provider = first[0] if isinstance(first, (tuple, list)) else str(first)
        self._Recommender = Recommender
        # the bench's "all threads" (None) is onnxruntime's own default (0 = one thread per core), not the
        # runtime's shared-session default (min(4, cores // 2)): the report states which it measured
        self.rt = self._recommender(intra_op_threads)
        self._by_threads = {intra_op_threads: self.rt}
        self.provider = self.rt.providers[0]
        self.device = "cuda" if self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self.name = f"{label or default_label} [{short_provider(self.provider)}]"
        self.model_path = str(self.rt.model_path)
        self.size_bytes = file_size(self.rt.model_path)
        self.params = 0  # filled by the caller (onnx_param_count) where onnx is importable

    def forward(self, req: tuple) -> dict:
        out = self.rt.predict_arrays(*req)
        res = {"next_item": out["next_item_scores"]}
        if "rating" in out:
            res["rating"] = out["rating"]
        if "like_logit" in out:
            res["like"] = out["like_logit"]
        return res

    def _recommender(self, n: Optional[int]):
        """The runtime serving this system's file with `n` intra-op threads (the bench's None = all)."""
        return self._Recommender(self.onnx_dir, providers=self.providers_arg, model_file=self.model_file,
                                 intra_op_threads=_ort_threads(n))

    def session_with_threads(self, n: Optional[int]):
        if n not in self._by_threads:
            self._by_threads[n] = self._recommender(n)
        return self._by_threads[n]

    @contextlib.contextmanager
    def threads(self, n: Optional[int]):
        before = self.rt
        self.rt = self.session_with_threads(n)
        try:
            yield
        finally:
            self.rt = before

    def close(self) -> None:
        self._by_threads.clear()
        self.rt = None


def two_part_variants(onnx_dir: Path) -> dict:
    """runtime.json "two_part" "variants" of a runtime folder ({} when the export wrote no two-part model)."""
    import json
    meta = json.loads((Path(onnx_dir) / "runtime.json").read_text())
    tp = meta.get("two_part")
    return dict(tp.get("variants") or {}) if isinstance(tp, dict) else {}


class TwoPartSystem(StudentOnnxSystem):
    """The served two-part path on one encoder variant: export.runtime.Recommender(mode="two_part").

    forward(req) = the runtime's predict_arrays: encoder + the catalog matmul (numpy) + the scorer graph, the
    full [B, N] scores (so quality is computed exactly as for the single graph). topk(req, k) = what
    recommend serves, on internal ids: encoder, then retriever.search(user vectors, k, banned = each request's
    history), no full-catalog score copy. Retrieval is exact (the trained catalog is small; serve_bench.scale
    measures ANN on large synthetic catalogs)."""

    serving = "two_part"

    def __init__(self, onnx_dir: Path, variant: str = "fp32", providers: Optional[list] = None,
                 intra_op_threads: Optional[int] = None, retrieval: str = "exact"):
        variants = two_part_variants(onnx_dir)
        if variant not in variants:
            raise ValueError(f"encoder variant {variant!r} is not in {Path(onnx_dir) / 'runtime.json'} two_part "
                             f"variants (has {sorted(variants)}); re-export the run to get it")
        self.retrieval = retrieval
        super().__init__(onnx_dir, variant, providers, label=f"student two-part (encoder {variant})",
                         model_file=variants[variant]["file"], intra_op_threads=intra_op_threads)

    def _recommender(self, n: Optional[int]):
        return self._Recommender(self.onnx_dir, providers=self.providers_arg, variant=self.variant,
                                 mode="two_part", retrieval=self.retrieval, intra_op_threads=_ort_threads(n))

    def topk(self, req: tuple, k: int) -> list:
        """Top-k internal ids per request, history excluded, through the encoder and the retriever."""
        from export.contract import ENCODER_OUTPUTS
        items, ratings, length, _ = req
        rt = self.rt
        cat = rt.catalog
        items_c, rates_c, length_c, _ = rt._check_arrays(items, ratings, length, None, cat.n_items)
        user = rt._encode(cat, items_c, rates_c, length_c)[ENCODER_OUTPUTS["next_item"]]
        L = items.shape[1]
        banned = [items[r, L - int(n):] for r, n in enumerate(length)]
        return [ids for ids, _ in cat.retriever.search(user, k, banned=banned)]


# ------------------------------------------------------------------------------------------------ teacher
def teacher_feed(builder, req: tuple, n_candidates: int) -> dict:
    """Token ids of B x C sequences (history + candidate c, right padded), with the two read positions.

    Row r = b * C + c. before_pos = the last token before the candidate's text (next_item state),
    item_pos = the last token of the candidate's text (rating / like state)."""
    items, ratings, length, cand = req
    L = items.shape[1]
    C = max(1, min(n_candidates, cand.shape[1]))
    seqs, before, item_end = [], [], []
    for b in range(items.shape[0]):
        n = int(length[b])
        hist_i, hist_r = items[b, L - n:], ratings[b, L - n:]
        for c in range(C):
            enc = builder.encode(np.append(hist_i, cand[b, c]), np.append(hist_r, 0.0), open_last=True)
            seqs.append(enc.ids)
            before.append(enc.before[-1])
            item_end.append(enc.item_end[-1])
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), builder.pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return dict(input_ids=ids, attention_mask=mask, before_pos=np.asarray(before, dtype=np.int64),
                item_pos=np.asarray(item_end, dtype=np.int64), n_candidates=C)


def row_chunks(n_rows: int, seq_len: int, budget_tokens: Optional[int]) -> list[slice]:
    """Consecutive row slices with rows * seq_len <= budget (at least one row each); None = one chunk."""
    if not budget_tokens or n_rows * seq_len <= budget_tokens:
        return [slice(0, n_rows)]
    step = max(1, budget_tokens // max(1, seq_len))
    return [slice(i, min(n_rows, i + step)) for i in range(0, n_rows, step)]


def _concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _teacher_outputs(next_rows: np.ndarray, rating: Optional[np.ndarray], like: Optional[np.ndarray], C: int) -> dict:
    out = {"next_item": next_rows[::C]}
    if rating is not None:
        out["rating"] = np.asarray(rating, dtype=np.float32).reshape(-1, C)
    if like is not None:
        out["like"] = np.asarray(like, dtype=np.float32).reshape(-1, C)
    return out


def teacher_size(run: Path, cfg) -> int:
    """Adapter + heads + the base model's weights (GGUF file or safetensors folder) on disk."""
    from distill.teacher import resolve_model
    teacher_dir = Path(run) / "teacher"
    total = sum(p.stat().st_size for p in teacher_dir.rglob("*.safetensors"))
    model, gguf = resolve_model(cfg.teacher)
    base = Path(model)
    if gguf and (base / gguf).exists():
        total += (base / gguf).stat().st_size
    elif base.is_dir():
        total += sum(p.stat().st_size for p in base.glob("*.safetensors"))
    return total


def teacher_builder(run: Path, cfg, tok):
    """The teacher's sequence builder, from the teacher's own saved config (text or soft item tokens)."""
    import json
    from distill.data import load_dataset
    from distill.teacher import make_builder, saved_teacher_config
    ds = load_dataset(cfg.data)
    saved = json.loads((Path(run) / "teacher" / "config.json").read_text())
    return make_builder(saved_teacher_config(saved), tok, ds.item_text, ds.has_ratings, saved.get("vocab"))


class TeacherTorchSystem(_TorchThreads, System):
    """The teacher as served in PyTorch: LoRA merged into the base weights, eval + inference mode."""

    name = "teacher (PyTorch, LoRA merged)"
    kind = "teacher"
    runtime = "pytorch"
    variant = "merged"

    def __init__(self, run: Path, cfg, device: str = "cpu", candidates: int = 1):
        import torch
        self.budget_tokens = cfg.teacher.infer_batch_tokens

        from distill.teacher import load_teacher
        self.torch = torch
        self.model, tok, self.meta_json = load_teacher(Path(run) / "teacher", merge=True, device=device)
        self.builder = teacher_builder(run, cfg, tok)
        self.device = device
        self.provider = self.requested_provider = f"torch-{device}"
        self.candidates = candidates
        self.params = sum(p.numel() for p in self.model.parameters())
        self.size_bytes = teacher_size(run, cfg)
        self.model_path = str(Path(run) / "teacher")

    def _rows(self, feed: dict, sl: slice) -> dict:
        torch = self.torch
        dev = self.device
        ids = torch.from_numpy(feed["input_ids"][sl]).to(dev)
        mask = torch.from_numpy(feed["attention_mask"][sl]).to(dev)
        rows = torch.arange(ids.shape[0], device=dev)
        before = (rows, torch.from_numpy(feed["before_pos"][sl]).to(dev))
        item = (rows, torch.from_numpy(feed["item_pos"][sl]).to(dev))
        out = self.model(ids, mask, before, item)
        return {k: out[k].float().cpu().numpy() for k in ("next_item", "rating", "like") if k in out}

    def run_feed(self, feed: dict) -> dict:
        """One forward of the B x C sequences, in chunks of at most `budget_tokens` tokens."""
        with self.torch.inference_mode():
            n, T = feed["input_ids"].shape
            res = _concat([self._rows(feed, sl) for sl in row_chunks(n, T, self.budget_tokens)])
        return _teacher_outputs(res["next_item"], res.get("rating"), res.get("like"), feed["n_candidates"])

    def forward(self, req: tuple) -> dict:
        return self.run_feed(teacher_feed(self.builder, req, self.candidates))


class TeacherOnnxSystem(System):
    """teacher_onnx/teacher.onnx on onnxruntime; tokenization as in PyTorch (the same SequenceBuilder)."""

    kind = "teacher"
    runtime = "onnxruntime"
    variant = "merged"

    def __init__(self, path: Path, builder=None, providers: Optional[list] = None, candidates: int = 1,
                 intra_op_threads: Optional[int] = None, budget_tokens: Optional[int] = None):
        self.path = Path(path)
        self.budget_tokens = budget_tokens
        self.builder = builder
        self.candidates = candidates
        self.providers_arg = list(providers or ["CPUExecutionProvider"])
        first = self.providers_arg[0]
        self.requested_provider = first[0] if isinstance(first, (tuple, list)) else str(first)
        self.sess = _ort_session(self.path, self.providers_arg, intra_op_threads)
        self._by_threads = {intra_op_threads: self.sess}
        self.provider = self.sess.get_providers()[0]
        self.device = "cuda" if self.provider != "CPUExecutionProvider" else "cpu"
        self.name = f"teacher (ONNX, LoRA merged) [{short_provider(self.provider)}]"
        self.model_path = str(self.path)
        self.size_bytes = file_size(self.path)
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        missing = {"input_ids", "attention_mask", "before_pos", "item_pos"} - set(self.inputs)
        if missing:
            raise ValueError(f"{self.path} lacks the teacher inputs {sorted(missing)} (has {sorted(self.inputs)})")
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.params = 0

    def _pick(self, res: dict, *keys) -> Optional[np.ndarray]:
        for name in self.outputs:
            low = name.lower()
            if any(k in low for k in keys) and "vector" not in low:
                return res[name]
        return None

    def _rows(self, feed: dict, sl: slice) -> dict:
        ins = {}
        for name in ("input_ids", "attention_mask", "before_pos", "item_pos"):
            a = feed[name][sl]
            spec = self.inputs[name]
            if "int32" in spec.type:
                a = a.astype(np.int32)
            if len(spec.shape) == 2 and a.ndim == 1:
                a = a[:, None]
            ins[name] = a
        return dict(zip(self.outputs, self.sess.run(self.outputs, ins)))

    def run_feed(self, feed: dict) -> dict:
        """One onnxruntime run per chunk of at most `budget_tokens` tokens."""
        n, T = feed["input_ids"].shape
        res = _concat([self._rows(feed, sl) for sl in row_chunks(n, T, self.budget_tokens)])
        nxt = self._pick(res, "next")
        if nxt is None:
            raise ValueError(f"{self.path}: no next_item output among {self.outputs}")
        rating, like = self._pick(res, "rating"), self._pick(res, "like")
        return _teacher_outputs(np.asarray(nxt, dtype=np.float32).reshape(nxt.shape[0], -1), rating, like,
                                feed["n_candidates"])

    def forward(self, req: tuple) -> dict:
        return self.run_feed(teacher_feed(self.builder, req, self.candidates))

    @contextlib.contextmanager
    def threads(self, n: Optional[int]):
        if n not in self._by_threads:
            self._by_threads[n] = _ort_session(self.path, self.providers_arg, n)
        before = self.sess
        self.sess = self._by_threads[n]
        try:
            yield
        finally:
            self.sess = before

    def close(self) -> None:
        self._by_threads.clear()
        self.sess = None
