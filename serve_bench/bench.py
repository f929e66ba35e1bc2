"""Teacher and students side by side: the same test-user requests, one process, one run.

Request = one test user's real history (the last <= 50 interactions before the test event, as the
protocol feeds it) + one candidate (the held-out item): every system returns full-catalog next_item
scores and the candidate's rating and like logit. Warm-up calls are excluded; each (system, batch)
point is repeated until it has `min_samples` calls AND `min_seconds` of wall time (the teacher is
capped at `teacher_max_samples` / `teacher_max_seconds`, stated in the report). Speed-ups are ratios
of p50 latencies measured in this run on this machine.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from distill.common import machine_info
from distill.config import RunConfig
from distill.data import Split, load_dataset, sample_users
from distill.evaluation import evaluate_predictions, history_arrays, subset
from distill.io import write_json

from .report import write_report


def time_calls(fn, batches: list, warmup: int, min_samples: int, min_seconds: float,
               max_samples: int | None = None, max_seconds: float | None = None) -> dict:
    """Call fn(batch) round-robin over `batches`; per-call latencies in ms after `warmup` calls."""
    for i in range(warmup):
        fn(batches[i % len(batches)])
    lat, t_start, i = [], time.perf_counter(), 0
    while True:
        t0 = time.perf_counter()
        fn(batches[i % len(batches)])
        lat.append((time.perf_counter() - t0) * 1e3)
        i += 1
        elapsed = time.perf_counter() - t_start
        if max_samples is not None and (len(lat) >= max_samples or elapsed >= (max_seconds or float("inf"))):
            break
        if max_samples is None and len(lat) >= min_samples and elapsed >= min_seconds:
            break
    a = np.array(lat)
    return dict(samples=len(a), p50_ms=float(np.percentile(a, 50)), p90_ms=float(np.percentile(a, 90)),
                p99_ms=float(np.percentile(a, 99)), mean_ms=float(a.mean()), wall_s=float(elapsed))


def _slices(n: int, b: int) -> list[slice]:
    return [slice(i, i + b) for i in range(0, n - b + 1, b)] or [slice(0, min(n, b))]


class TeacherSystem:
    """The teacher as served in PyTorch: LoRA merged into the base weights, inference mode."""

    name = "teacher (PyTorch, LoRA merged)"

    def __init__(self, run: Path, cfg: RunConfig, device: str):
        from distill.teacher import SequenceBuilder, load_teacher, pad_batch
        self.model, tok, meta = load_teacher(run / "teacher", merge=True, device=device)
        ds = load_dataset(cfg.data)
        self.builder = SequenceBuilder(tok, ds.item_text, cfg.teacher.max_item_tokens, ds.has_ratings)
        self.pad_batch, self.device = pad_batch, device
        self.params = sum(p.numel() for p in self.model.parameters())
        self.size_bytes = _teacher_size(run / "teacher", cfg)

    @torch.inference_mode()
    def __call__(self, req: tuple) -> dict:
        items, ratings, length, cand = req
        encs = []
        for i in range(len(items)):
            n = int(length[i])
            seq = np.append(items[i, items.shape[1] - n:], cand[i, 0])
            r = np.append(ratings[i, items.shape[1] - n:], 0.0)
            encs.append(self.builder.encode(seq, r, open_last=True))
        ids, mask = self.pad_batch([e.ids for e in encs], self.builder.pad_id)
        rows = torch.arange(len(encs), device=self.device)
        before = (rows, torch.tensor([e.before[-1] for e in encs], device=self.device))
        item = (rows, torch.tensor([e.item_end[-1] for e in encs], device=self.device))
        out = self.model(ids.to(self.device), mask.to(self.device), before, item)
        return {k: v.float().cpu().numpy() for k, v in out.items()}


class StudentTorchSystem:
    name = "student (PyTorch)"

    def __init__(self, run: Path, device: str):
        from distill.student import Student
        self.model = Student.load(run / "student").to(device)
        self.model.freeze_item_table()
        self.device = device
        self.params = sum(p.numel() for p in self.model.parameters())
        self.size_bytes = (run / "student" / "model.safetensors").stat().st_size

    @torch.inference_mode()
    def __call__(self, req: tuple) -> dict:
        out = self.model(*(torch.from_numpy(a).to(self.device) for a in req))
        return {k: v.cpu().numpy() for k, v in out.items()}


class OnnxSystem:
    """The exported student through the numpy + onnxruntime runtime; the provider that ran is in the name."""

    def __init__(self, onnx_dir: Path, providers: list[str], label: str, params: int):
        from export.runtime import Recommender
        self.rt = Recommender(onnx_dir, providers=providers)
        self.name = f"{label} [{self.rt.providers[0]}]"
        self.params = params
        self.size_bytes = (onnx_dir / "student.onnx").stat().st_size

    def __call__(self, req: tuple) -> dict:
        return self.rt.predict_arrays(*req)


def _teacher_size(teacher_dir: Path, cfg: RunConfig) -> int:
    from distill.teacher import resolve_model
    total = sum(p.stat().st_size for p in teacher_dir.rglob("*.safetensors"))
    model, gguf = resolve_model(cfg.teacher)
    base = Path(model)
    if gguf and (base / gguf).exists():
        total += (base / gguf).stat().st_size
    elif base.is_dir():
        total += sum(p.stat().st_size for p in base.glob("*.safetensors"))
    return total


def _predictions(system, split: Split, users, max_len: int, batch: int = 256) -> dict:
    """The protocol's test predictions of a system (used for the ONNX rows' quality)."""
    items, ratings, length, cand = history_arrays(split, users, "test", max_len)
    outs = [system((items[s], ratings[s], length[s], cand[s])) for s in _slices(len(users), batch)]
    rest = len(users) % batch
    if rest and len(users) > batch:
        s = slice(len(users) - rest, len(users))
        outs.append(system((items[s], ratings[s], length[s], cand[s])))
    cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    pred = dict(users=np.asarray(users), scores=cat.get("next_item_scores", cat.get("next_item")))
    if "rating" in cat:
        pred["rating"] = cat["rating"][:, 0]
        pred["like_logit"] = cat.get("like_logit", cat.get("like"))[:, 0]
    return pred


def _load_pred(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def run_bench(cfg: RunConfig) -> dict:
    from distill.baselines import evaluate_baselines
    from distill.common import pick_device
    from distill.io import read_json
    run = Path(cfg.run_dir)
    bc = cfg.bench
    device = pick_device(cfg.device)
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    max_len = cfg.data.max_history
    req_users = sample_users(split.eval_users, bc.n_requests, cfg.seed)
    items, ratings, length, cand = history_arrays(split, req_users, "test", max_len)

    t_meta = read_json(run / "teacher" / "metrics.json", "the teacher stage (`distillrec teacher <run>`)")
    s_meta = read_json(run / "student" / "metrics.json", "the student stage (`distillrec student <run>`)")
    systems = [TeacherSystem(run, cfg, device), StudentTorchSystem(run, device)]
    student_params = systems[1].params
    onnx_dir = run / "onnx"
    if not (onnx_dir / "student.onnx").exists():
        raise FileNotFoundError(f"{onnx_dir / 'student.onnx'} is missing; run `distillrec export {run}`")
    systems.append(OnnxSystem(onnx_dir, list(cfg.export.providers), "student (ONNX)", student_params))

    latency = {}
    for sysm in systems:
        is_teacher = isinstance(sysm, TeacherSystem)
        for b in bc.batch_sizes:
            reqs = [(items[s], ratings[s], length[s], cand[s]) for s in _slices(len(req_users), b)]
            kw = dict(max_samples=bc.teacher_max_samples, max_seconds=bc.teacher_max_seconds) if is_teacher else {}
            warm = 1 if is_teacher else bc.warmup
            stats = time_calls(sysm, reqs, warm, bc.min_samples, bc.min_seconds, **kw)
            stats["throughput_rps"] = b * stats["samples"] / max(1e-9, stats["mean_ms"] * stats["samples"] / 1e3)
            latency.setdefault(sysm.name, {})[str(b)] = stats
            print(f"  {sysm.name:<40} batch {b:>4}: p50 {stats['p50_ms']:9.2f} ms  p99 {stats['p99_ms']:9.2f} ms "
                  f"({stats['samples']} calls)", flush=True)
    teacher_name = systems[0].name
    for name, rows in latency.items():
        for b, st in rows.items():
            st["speedup_p50_vs_teacher"] = latency[teacher_name][b]["p50_ms"] / st["p50_ms"]

    # quality: every system on the same users; the teacher was evaluated on a subset (its budget)
    t_pred = _load_pred(run / "teacher" / "test_predictions.npz")
    t_users = t_pred["users"]
    preds_all = {"student": _load_pred(run / "student" / "test_predictions.npz")}
    if (run / "student_nokd" / "test_predictions.npz").exists():
        preds_all["student (no KD)"] = _load_pred(run / "student_nokd" / "test_predictions.npz")
    preds_all[systems[2].name] = _predictions(systems[2], split, split.eval_users, max_len)
    quality_all = {k: evaluate_predictions(v, split, "test", seed=cfg.seed) for k, v in preds_all.items()}
    quality_all.update(evaluate_baselines(split, "test", split.eval_users, seed=cfg.seed))
    quality_sub = {"teacher": evaluate_predictions(t_pred, split, "test", seed=cfg.seed)}
    quality_sub.update({k: evaluate_predictions(subset(v, t_users), split, "test", seed=cfg.seed)
                        for k, v in preds_all.items()})
    quality_sub.update(evaluate_baselines(split, "test", t_users, seed=cfg.seed))
    parity = read_json(onnx_dir / "parity.json", "the export stage")

    report = dict(
        machine=machine_info(), device=device, seed=cfg.seed,
        workload=dict(requests=len(req_users), history="last <= 50 interactions before each test event",
                      candidates=1, batch_sizes=bc.batch_sizes, warmup=bc.warmup, min_samples=bc.min_samples,
                      min_seconds=bc.min_seconds, teacher_max_samples=bc.teacher_max_samples,
                      teacher_max_seconds=bc.teacher_max_seconds, mean_history=float(length.mean())),
        latency=latency,
        sizes={s.name: dict(params=int(s.params), bytes=int(s.size_bytes)) for s in systems},
        quality_teacher_subset=dict(users=len(t_users), rows=quality_sub),
        quality_all_users=dict(users=len(split.eval_users), rows=quality_all),
        teacher=dict(budget=t_meta["budget"], cost=t_meta["cost"], params=t_meta["params"]),
        student=dict(params=s_meta["params"], train_seconds=s_meta["train_seconds"], best_epoch=s_meta["best_epoch"],
                     stop_reason=s_meta["stop_reason"], teacher_coverage=s_meta["teacher_coverage"]),
        parity=dict(max_abs_diff=parity.get("max_abs_diff"), passed=parity.get("passed")),
    )
    out = run / "bench"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    write_report(report, out)
    return report
