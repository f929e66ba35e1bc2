"""Student stage: train the multi-head student on hard labels + the cached teacher outputs.

The objective is distill.losses.DistillationObjective (conventions in its module docstring and in
docs/distillation.md): per labelled position and task (1 - alpha*h) * hard + alpha*h * KD, h = the
position has teacher labels; KD_next_item = T^2-scaled KL (top-K or full catalog) + ListMLE on the
teacher's top-k order; rating/like KD = MSE / BCE to the teacher; plus representation alignment.
Task losses go through the shared loss-weighting strategy (distill.weighting). Every component is
logged unweighted per step in train_log.jsonl, next to the task weights and the weighted total.
The budget scales with the data (`training_budget`): an epoch is max(one pass over the training windows,
student.min_steps_per_epoch optimizer steps); early stopping on validation NDCG@10 restores the best epoch after
`patience` epochs without improvement, and never fewer than student.min_patience_steps optimizer steps, so a
small log (a few steps per epoch) is not stopped at a noisy early validation peak; the wall-clock budget
(student.time_budget_s) is the outer bound.

Writes runs/<name>/student/ (or student_nokd/): model.safetensors, config.json, metrics.json,
train_log.jsonl, test_predictions.npz.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import metrics as M
from .cache import load_cache
from .common import lr_lambda, pick_device, set_seed, stage_dir
from .config import RunConfig, StudentConfig
from .data import Split, load_dataset
from .dist import Dist
from .evaluation import evaluate_predictions, history_arrays
from .io import write_json
from .losses import DistillationObjective
from .student import Student
from .windows import epoch_batches
from .weighting import build_weighting


# ----------------------------------------------------------------------------- training data
def cold_item_slice(n_items: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded, sorted slice of round(fraction * n_items) item ids (the cold-start hold-out)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"student.cold_item_fraction must be in [0, 1), got {fraction}")
    n = int(round(fraction * n_items))
    return np.sort(np.random.default_rng(seed).choice(n_items, size=n, replace=False)) if n else np.zeros(0, np.int64)


def student_windows(lengths, max_len: int, stride: int):
    """Windows over every user's (training) sequence: (user, start, end, first labelled), each position
    labelled exactly once and, after a user's first window, with >= max_len - stride positions of context."""
    out = []
    for u, n in enumerate(lengths):
        n = int(n)
        if n == 0:
            continue
        end = min(n, max_len)
        out.append((u, 0, end, 0))
        while end < n:
            new_end = min(n, end + stride)
            out.append((u, max(0, new_end - max_len), new_end, end))
            end = new_end
    return out


def build_training_arrays(split: Split, max_len: int, cache: dict | None, exclude_items=None):
    """Left-padded window arrays over the training parts + a per-position label mask + the teacher
    cache row of every position (-1 = no teacher labels).

    `exclude_items`: events on these items are dropped from the training sequences (as inputs AND as
    labels); the remaining events keep their own cache rows (the cache is indexed by original position).
    """
    ds = split.ds
    drop = np.zeros(ds.n_items, dtype=bool)
    if exclude_items is not None and len(exclude_items):
        drop[np.asarray(exclude_items, dtype=np.int64)] = True
    keep = [np.flatnonzero(~drop[split.train_items(u)]) for u in range(ds.n_users)]
    wins = student_windows([len(k) for k in keep], max_len, max(1, max_len // 2))
    W = len(wins)
    items = np.zeros((W, max_len), dtype=np.int64)
    ratings = np.zeros((W, max_len), dtype=np.float32)
    length = np.zeros(W, dtype=np.int64)
    labelled = np.zeros((W, max_len), dtype=bool)
    rows = np.full((W, max_len), -1, dtype=np.int64)
    row_of = {}
    if cache is not None:
        row_of = {int(u): int(o) for u, o in zip(cache["users"], cache["offsets"][:-1])}
    for w, (u, s, e, first) in enumerate(wins):
        pos = keep[u][s:e]  # original positions in u's training part
        n = e - s
        off = max_len - n
        items[w, off:] = ds.items[u][pos]
        if ds.ratings is not None:
            ratings[w, off:] = ds.ratings[u][pos]
        length[w] = n
        labelled[w, off + (first - s):] = True
        if u in row_of:
            rows[w, off:] = row_of[u] + pos
    return dict(items=items, ratings=ratings, length=length, labelled=labelled, rows=rows)


def _to_batch(arrays: dict, idx, cache, device, user_vectors: bool) -> dict:
    b = {k: torch.from_numpy(v[idx]).to(device) for k, v in arrays.items() if k != "rows"}
    rows = arrays["rows"][idx]
    b["has_teacher"] = torch.from_numpy(rows >= 0).to(device)
    if cache is not None:
        r = np.maximum(rows, 0)
        b["t_items"] = torch.from_numpy(cache["next_topk_items"][r].astype(np.int64)).to(device)
        b["t_logits"] = torch.from_numpy(cache["next_topk_logits"][r].astype(np.float32)).to(device)
        b["t_rating"] = torch.from_numpy(cache["rating"][r]).to(device)
        b["t_like"] = torch.from_numpy(cache["like_logit"][r]).to(device)
        if user_vectors:
            b["t_user"] = torch.from_numpy(cache["user_vector"][r].astype(np.float32)).to(device)
    return b


# ----------------------------------------------------------------------------- prediction
@torch.no_grad()
def student_predict(student: Student, split: Split, users, stage: str, batch_size: int = 256, device="cpu") -> dict:
    student.eval()
    items, ratings, length, cand = history_arrays(split, users, stage, student.cfg.max_len)
    n = len(users)
    scores = np.zeros((n, student.n_items), dtype=np.float32)
    rating = np.zeros(n, dtype=np.float32)
    like = np.zeros(n, dtype=np.float32)
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        out = student(*(torch.from_numpy(a[sl]).to(device) for a in (items, ratings, length, cand)))
        scores[sl] = out["next_item"].cpu().numpy()
        if "rating" in out:
            rating[sl] = out["rating"][:, 0].cpu().numpy()
            like[sl] = out["like"][:, 0].cpu().numpy()
    return dict(users=np.asarray(users), scores=scores, rating=rating, like_logit=like)


def val_ndcg10(student: Student, split: Split, device="cpu", chunk: int = 2048) -> float:
    """Mean validation NDCG@10 over the eval users, `chunk` users at a time: the [users, N] scores of a 10^5-user log
    over 2*10^4 items would take 8 GB at once; per chunk they take chunk * N * 4 bytes (the metric is per user)."""
    users = split.eval_users
    total = 0.0
    for i in range(0, len(users), chunk):
        part = users[i:i + chunk]
        val = student_predict(student, split, part, "val", device=device)
        total += float(M.ranking_metrics(val["scores"], split.targets(part, "val")[0],
                                         [split.seen(u, "val") for u in part], ks=(10,))["NDCG@10"].sum())
    return total / max(1, len(users))


SCORES_MAX_BYTES = 2 * 2**30
"""Above this size the [users, items] float32 test scores are neither held at once nor saved: the metrics are computed
chunk by chunk and test_predictions.npz keeps each user's top TOP_SAVED items instead (2 GB = e.g. 27,000 users x
20,000 items; a 10^7-interaction log of 2*10^5 users over 2*10^4 items would need 16 GB)."""
TOP_SAVED = 100
"""Items per user kept in test_predictions.npz when the full scores are not (ranked, earlier history excluded)."""


def evaluate_student(student: Student, split: Split, stage: str, seed: int, device: str = "cpu",
                     chunk: int = 2048, keep_scores: Optional[bool] = None) -> tuple[dict, dict]:
    """(metrics, predictions to save) of the eval users at `stage`. With keep_scores (default: when the scores take
    at most SCORES_MAX_BYTES) the predictions hold the full scores [U, N]; otherwise the users are scored `chunk`
    at a time, the per-user metrics are gathered (the same numbers: each user's metrics depend on its own row only)
    and the predictions hold topk_items / topk_scores [U, TOP_SAVED] instead of scores."""
    users = split.eval_users
    if keep_scores is None:
        keep_scores = len(users) * student.n_items * 4 <= SCORES_MAX_BYTES
    if keep_scores:
        pred = student_predict(student, split, users, stage, device=device)
        return evaluate_predictions(pred, split, stage, seed=seed), pred
    ks = (10, 20)
    per_user: dict[str, list] = {}
    k = min(TOP_SAVED, student.n_items)
    top_items = np.zeros((len(users), k), dtype=np.int32)
    top_scores = np.zeros((len(users), k), dtype=np.float32)
    rating = np.zeros(len(users), dtype=np.float32)
    like = np.zeros(len(users), dtype=np.float32)
    for i in tqdm(range(0, len(users), chunk), desc=f"student {stage} evaluation", leave=False):
        part = users[i:i + chunk]
        p = student_predict(student, split, part, stage, device=device)
        seen = [split.seen(u, stage) for u in part]
        for name, v in M.ranking_metrics(p["scores"], split.targets(part, stage)[0], seen, ks=ks).items():
            per_user.setdefault(name, []).append(v)
        s = p["scores"]
        for row, h in enumerate(seen):
            s[row, h] = -np.inf  # what a recommender would show: the user's earlier items are not listed
        idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
        val = np.take_along_axis(s, idx, axis=1)
        order = np.argsort(-val, axis=1, kind="stable")
        top_items[i:i + len(part)] = np.take_along_axis(idx, order, axis=1)
        top_scores[i:i + len(part)] = np.take_along_axis(val, order, axis=1)
        rating[i:i + len(part)], like[i:i + len(part)] = p["rating"], p["like_logit"]
    targets, true_r = split.targets(users, stage)
    kw = dict(next_per_user={n: np.concatenate(v) for n, v in per_user.items()}, next_targets=targets, ks=ks,
              seed=seed)
    if true_r is not None and "rating" in student.tasks:
        kw.update(rating_pred=rating, rating_true=true_r, like_logit=like, like_true=true_r >= split.ds.like_threshold)
    pred = dict(users=np.asarray(users), topk_items=top_items, topk_scores=top_scores, rating=rating, like_logit=like)
    return M.evaluate(**kw), pred


# ----------------------------------------------------------------------------- training budget
@dataclass(frozen=True)
class TrainingBudget:
    """How long one student trains, derived from its number of training windows (the budget rule of
    StudentConfig.min_steps_per_epoch): `epochs` epochs of `steps_per_epoch` optimizer steps each, early stopping
    after `patience` epochs without a better validation NDCG@10 (at least min_patience_steps steps), and
    `time_budget_s` as the outer bound."""
    windows: int
    """Training windows (sequences of <= max_len items) over every user's training part."""
    batch_size: int
    steps_per_pass: int
    """ceil(windows / batch_size): one pass over the training windows."""
    steps_per_epoch: int
    """max(steps_per_pass, min_steps_per_epoch), capped by max_steps_per_epoch."""
    epochs: int
    patience: int
    """Early-stopping patience in epochs: max(StudentConfig.patience, ceil(min_patience_steps / steps_per_epoch))."""
    time_budget_s: float

    @property
    def max_steps(self) -> int:
        """The step budget: the cosine schedule decays to 0 here."""
        return self.epochs * self.steps_per_epoch

    @property
    def passes_per_epoch(self) -> float:
        return self.steps_per_epoch / self.steps_per_pass

    def as_dict(self) -> dict:
        return dict(asdict(self), max_steps=self.max_steps, passes_per_epoch=round(self.passes_per_epoch, 3))


def training_budget(sc: StudentConfig, n_windows: int) -> TrainingBudget:
    """The budget rule: steps per epoch from the data (#windows / batch size), at least `min_steps_per_epoch`; the
    early-stopping patience in epochs, at least `min_patience_steps` optimizer steps (ML-100K at batch 128: 29 steps
    per epoch, patience 5 epochs either way; a 250-user log: 8 steps per epoch, patience 19 epochs)."""
    if n_windows < 1:
        raise ValueError("the student has no training windows: every user's training part is empty (each user "
                         "needs >= 3 interactions: training, validation, test)")
    if int(sc.min_steps_per_epoch) < 0:
        raise ValueError(f"student.min_steps_per_epoch must be >= 0 (0 = one pass per epoch), got {sc.min_steps_per_epoch}")
    per_pass = int(np.ceil(n_windows / sc.batch_size))
    per_epoch = max(per_pass, int(sc.min_steps_per_epoch))
    if sc.max_steps_per_epoch:
        per_epoch = min(per_epoch, int(sc.max_steps_per_epoch))
    patience = max(int(sc.patience), -(-int(sc.min_patience_steps) // per_epoch))
    return TrainingBudget(windows=int(n_windows), batch_size=int(sc.batch_size), steps_per_pass=per_pass,
                          steps_per_epoch=per_epoch, epochs=int(sc.epochs), patience=patience,
                          time_budget_s=float(sc.time_budget_s))


# ----------------------------------------------------------------------------- training
@dataclass
class FitResult:
    student: Student
    best_epoch: int
    best_val_ndcg10: float
    stop_reason: str
    train_seconds: float
    teacher_coverage: float
    windows: int
    components: dict
    budget: TrainingBudget
    steps: int
    """Optimizer steps actually taken (<= budget.max_steps; fewer after early stopping or the time budget)."""
    history: list = field(default_factory=list)


def items_seen(arrays: dict, n_items: int) -> np.ndarray:
    """bool [n_items]: items with at least one event in the training windows (padding excluded)."""
    max_len = arrays["items"].shape[1]
    valid = np.arange(max_len)[None, :] >= max_len - arrays["length"][:, None]
    seen = np.zeros(n_items, dtype=bool)
    seen[arrays["items"][valid]] = True
    return seen


@dataclass
class _Training:
    """What one fit works on: the model, its objective and loss weighting, the optimizer and schedule, the
    training arrays, the teacher labels (None without KD) and the budget."""
    student: Student
    objective: DistillationObjective
    weighting: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Optional[torch.optim.lr_scheduler.LambdaLR]
    arrays: dict
    teacher: Optional[dict]
    budget: TrainingBudget
    device: str
    dist: Dist
    step_module: torch.nn.Module
    """What computes a step's losses: `_StepLosses` over the three modules, wrapped in DistributedDataParallel when
    the world size is > 1 (DDP all-reduces the gradients of every parameter during backward)."""


class _StepLosses(torch.nn.Module):
    """student + objective + loss weighting as ONE module whose forward is a training step's losses, so that
    DistributedDataParallel sees (and synchronises) every trained parameter: the student's, the alignment projector's
    and a learned weighting's."""

    def __init__(self, student: Student, objective: DistillationObjective, weighting: torch.nn.Module,
                 every_parameter: bool = False):
        super().__init__()
        self.student, self.objective, self.weighting = student, objective, weighting
        self.every_parameter = every_parameter

    def forward(self, batch: dict):
        out = self.student.forward_positions(batch["items"], batch["ratings"], batch["length"],
                                             select=batch["labelled"],
                                             catalog=not self.objective.sampled)  # sampled softmax: no [P, N] logits
        losses, align, logged = self.objective(out, batch)
        total, weights = self.weighting(losses)
        if self.every_parameter and align is None and self.objective.align is not None:
            # DDP: no teacher-labelled position in this share, so the projector takes part at 0 and DDP's reducer
            # sees every parameter every step (no find_unused_parameters graph walk). Not at world size 1, where a
            # zero gradient instead of none would let AdamW decay the projector on such steps.
            total = total + 0.0 * sum(p.sum() for p in self.objective.align.parameters())
        return total, losses, align, logged, weights


def _setup(sc: StudentConfig, split: Split, cache: dict | None, use_teacher: bool, device: str,
           exclude_items, dist: Optional[Dist] = None) -> _Training:
    """Build the student, the objective, the training windows, the budget, the optimizer and the schedule."""
    ds = split.ds
    if sc.use_text_vectors and cache is None:
        raise ValueError("student.use_text_vectors needs the teacher cache's item_vectors")
    if sc.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"student.lr_schedule={sc.lr_schedule!r}: use 'cosine' or 'constant'")
    text = torch.from_numpy(cache["item_vectors"]) if sc.use_text_vectors else None
    rating_mean = float(np.mean(np.concatenate([split.train_ratings(u) for u in range(ds.n_users)]))) \
        if ds.has_ratings else 0.0
    student = Student(sc, ds.n_items, ds.tasks, text_vectors=text, rating_mean=rating_mean).to(device)
    teacher = cache if use_teacher and (sc.kd_alpha > 0 or sc.kd_align > 0) else None
    exclude = None
    if exclude_items is not None and len(exclude_items):
        exclude = torch.zeros(ds.n_items, dtype=torch.bool)
        exclude[torch.as_tensor(np.asarray(exclude_items, dtype=np.int64))] = True
    has_uv = teacher is not None and all(k in teacher for k in ("user_vector", "item_table", "item_bias"))
    objective = DistillationObjective(
        sc, ds.tasks, sc.dim, like_threshold=ds.like_threshold, use_teacher=teacher is not None,
        teacher_dim=int(teacher["user_vector"].shape[1]) if has_uv else None,
        item_table=torch.from_numpy(teacher["item_table"]) if has_uv else None,
        item_bias=torch.from_numpy(teacher["item_bias"]) if has_uv else None,
        exclude_items=exclude, n_items=ds.n_items,
        item_counts=torch.from_numpy(split.train_item_counts()) if sc.next_item_loss == "sampled" else None).to(device)
    arrays = build_training_arrays(split, sc.max_len, teacher, exclude_items=exclude_items)
    budget = training_budget(sc, len(arrays["items"]))
    weighting = build_weighting(sc.weighting, ds.tasks, sc.loss_weights).to(device)
    opt = torch.optim.AdamW(list(student.parameters()) + list(objective.parameters()) + list(weighting.parameters()),
                            lr=sc.lr, weight_decay=sc.weight_decay)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(budget.steps_per_epoch, budget.max_steps))
             if sc.lr_schedule == "cosine" else None)
    dist = dist or Dist.single(device)
    step_module = _StepLosses(student, objective, weighting, every_parameter=dist.world > 1)
    if dist.world > 1:
        if sc.weighting == "gradnorm":
            raise ValueError("student.weighting=gradnorm is not supported under torchrun/accelerate (it takes gradients "
                             "of each task on one process's shard); use fixed, uncertainty or dwa, or one process")
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP
        # the buffers (teacher item table, masks) are built identically on every rank: not re-sent every forward
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else "broadcast_buffers")
        step_module = DDP(step_module, device_ids=[dist.local_rank] if device.startswith("cuda") else None,
                          **{no_sync: False})
    return _Training(student, objective, weighting, opt, sched, arrays, teacher, budget, device, dist, step_module)


def rank_share(arrays: dict, idx: np.ndarray, world: int, rank: int, teacher: bool) -> tuple[np.ndarray, float, float]:
    """This rank's windows of the global batch `idx` (contiguous chunks) and the factors that make the ranks' averaged
    gradients the gradient of the global batch's loss: the task losses are means over the batch's labelled positions
    (P) and alignment a mean over its teacher-labelled ones (P_t), so rank r's are weighted world * P_r / P and
    world * P_t,r / P_t (DDP averages over ranks). Every rank computes the same chunks from the same `idx`, no
    communication. A rank whose chunk is empty (a last batch smaller than the world) repeats one window at weight 0."""
    chunks = np.array_split(np.asarray(idx), world)
    lab = [arrays["labelled"][c] for c in chunks]
    P = [int(m.sum()) for m in lab]
    Pt = [int(((arrays["rows"][c] >= 0) & m).sum()) for c, m in zip(chunks, lab)] if teacher else [0] * world
    mine = chunks[rank]
    if len(mine) == 0:
        return np.asarray(idx)[:1], 0.0, 0.0
    return mine, world * P[rank] / max(1, sum(P)), world * Pt[rank] / max(1, sum(Pt))


def _train_step(t: _Training, idx) -> tuple[torch.Tensor, dict, dict, dict, Optional[torch.Tensor]]:
    """One optimizer step on the global batch of windows `idx`: (total, task losses, logged terms, task weights,
    alignment). Under DDP each rank computes its share (`rank_share`) and DDP averages the gradients; the returned
    values are this rank's share's."""
    local, scale, align_scale = rank_share(t.arrays, idx, t.dist.world, t.dist.rank, t.teacher is not None) \
        if t.dist.world > 1 else (idx, 1.0, 1.0)
    batch = _to_batch(t.arrays, local, t.teacher, t.device, t.objective.needs_user_vectors)
    weighted, losses, align, logged, weights = t.step_module(batch)
    total = weighted if align is None else weighted + align
    loss = total if t.dist.world == 1 else weighted * scale + (0.0 if align is None else align * align_scale)
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(t.student.parameters(), 1.0)
    t.opt.step()
    if t.sched is not None:
        t.sched.step()
    return total, losses, logged, weights, align


def _train_epoch(t: _Training, batches, epoch: int, step: int, log_f) -> tuple[dict, int]:
    """budget.steps_per_epoch steps (one or more passes over the windows); ({loss name: per-step values}, step)."""
    t.student.train()
    sums: dict[str, list[float]] = {}
    for _ in range(t.budget.steps_per_epoch):
        _, idx = next(batches)
        total, losses, logged, weights, align = _train_step(t, idx)
        step += 1
        task_vals = {k: v.item() for k, v in losses.items()}
        for k, v in {**task_vals, **logged}.items():
            sums.setdefault(k, []).append(v)
        if log_f:
            log_f.write(json.dumps({"epoch": epoch, "step": step, "total": total.item(), "losses": task_vals,
                                    "terms": logged, "weights": weights,
                                    "align_weight": t.objective.w["align"] if align is not None else 0.0}) + "\n")
    means = torch.tensor([float(np.mean(sums[k])) for k in t.student.tasks], dtype=torch.float64)
    t.dist.average_([means])  # every rank's weighting adapts to the same (all-rank) epoch means
    t.weighting.end_epoch(dict(zip(t.student.tasks, means.tolist())))
    return sums, step


def fit_student(sc: StudentConfig, split: Split, cache: dict | None, *, use_teacher: bool, seed: int,
                device: str = "cpu", exclude_items=None, log_path: Optional[Path] = None,
                desc: str = "student", dist: Optional[Dist] = None) -> Optional[FitResult]:
    """Train one student (best validation state restored): setup -> epochs of training steps, each followed by
    validation NDCG@10 -> stop at the epoch budget, after `patience` epochs without improvement, or past the
    time budget. `cache` supplies the frozen text vectors (when sc.use_text_vectors) and, with use_teacher,
    the soft labels; `exclude_items` are held out of training entirely (cold-start measurement).

    `dist` (world size > 1, from torchrun / accelerate): every rank draws the same global batches and trains on its
    share under DDP; only rank 0 validates, decides when to stop (broadcast to the others), logs and keeps the best
    state. Returns None on the other ranks."""
    set_seed(seed)
    dist = dist or Dist.single(device)
    t = _setup(sc, split, cache, use_teacher, device, exclude_items, dist)
    b = t.budget
    coverage = float((t.arrays["rows"][t.arrays["labelled"]] >= 0).mean())
    batches = epoch_batches(b.windows, sc.batch_size, np.random.default_rng(seed))
    best, best_state, best_epoch, bad, history, step = -1.0, None, -1, 0, [], 0
    stop_reason, t0 = "epochs", time.perf_counter()
    log_f = open(log_path, "w") if log_path and dist.main else None
    try:
        bar = tqdm(range(b.epochs), desc=f"{desc} epochs", disable=not dist.main)
        for epoch in bar:
            sums, step = _train_epoch(t, batches, epoch, step, log_f)
            stop = None
            if dist.main:
                ndcg = val_ndcg10(t.student, split, device=device)
                history.append({"epoch": epoch, "val_ndcg@10": ndcg, **{k: float(np.mean(v)) for k, v in sums.items()},
                                "seconds": time.perf_counter() - t0})
                bar.set_postfix(val_ndcg=f"{ndcg:.4f}", loss=f"{np.mean(sums['next_item']):.3f}")
                if ndcg > best:
                    best, best_epoch, bad = ndcg, epoch, 0
                    best_state = {k: v.detach().clone() for k, v in t.student.state_dict().items()}
                else:
                    bad += 1
                    if bad >= b.patience:
                        stop = "early_stopping"
                if stop is None and time.perf_counter() - t0 > b.time_budget_s:
                    stop = "time_budget"
            stop = dist.broadcast_object(stop)  # rank 0 decides for every rank
            if stop is not None:
                stop_reason = stop
                break
    finally:
        if log_f:
            log_f.close()
    train_seconds = time.perf_counter() - t0
    if not dist.main:
        return None
    student = _restore_best(t, best_state, split.ds.n_items, sc)
    return FitResult(student=student, best_epoch=best_epoch, best_val_ndcg10=best, stop_reason=stop_reason,
                     train_seconds=train_seconds, teacher_coverage=coverage, windows=b.windows,
                     components=t.objective.components(), budget=b, steps=step, history=history)


def _restore_best(t: _Training, best_state: dict, n_items: int, sc: StudentConfig) -> Student:
    """The best validation state; with ID dropout, items never seen in training lose their (random) ID embedding."""
    t.student.load_state_dict(best_state)
    if sc.id_dropout > 0 and t.student.text_proj is not None:
        t.student.forget_ids(torch.from_numpy(~items_seen(t.arrays, n_items)).to(t.device))
    return t.student.eval()


def train_student(cfg: RunConfig, kd: bool = True) -> dict:
    """Train one student; kd=False trains the no-KD baseline (same architecture, hard labels only)."""
    run = Path(cfg.run_dir)
    name = "student" if kd else "student_nokd"
    out_dir = stage_dir(run, name)
    dist = Dist(pick_device(cfg.device))  # torchrun / accelerate: DDP over the ranks (world size 1 otherwise)
    device = dist.device
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    sc = cfg.student if kd else replace(cfg.student, kd_alpha=0.0, kd_align=0.0)
    cache = load_cache(run, ds.data_hash)  # text vectors come from the teacher in both cases
    fit = fit_student(sc, split, cache, use_teacher=kd, seed=cfg.seed, device=device,
                      log_path=out_dir / "train_log.jsonl", desc=name, dist=dist)
    if fit is None:  # not rank 0: rank 0 evaluates and writes
        dist.barrier()
        return dict(rank=dist.rank, world_size=dist.world)
    student = fit.student
    guard = None
    if kd and sc.kd_guard:
        student, guard = _kd_guard(run, fit, cfg.seed, device)
    metrics, pred = evaluate_student(student, split, "test", cfg.seed, device=device)
    extra = dict(item_ids=[str(i) for i in ds.item_ids], like_threshold=ds.like_threshold,
                 max_history=sc.max_len, item_popularity=split.train_item_counts(include_val=True).tolist(),
                 data_hash=ds.data_hash, kd=kd)
    student.cpu().save(out_dir, extra=extra)
    np.savez(out_dir / "test_predictions.npz", **{k: v for k, v in pred.items()})
    counts = student.param_counts()
    report = dict(metrics=metrics, stage="test", eval_users=len(split.eval_users), seed=cfg.seed, device=device,
                  torch_threads=torch.get_num_threads(),
                  kd=kd, kd_alpha=sc.kd_alpha, temperature=sc.temperature, kd_components=fit.components,
                  teacher_coverage=fit.teacher_coverage, best_epoch=fit.best_epoch,
                  best_val_ndcg10=fit.best_val_ndcg10, stop_reason=fit.stop_reason, epochs_run=len(fit.history),
                  train_seconds=fit.train_seconds, windows=fit.windows, budget=fit.budget.as_dict(), steps=fit.steps,
                  params=counts["params"], buffers=counts["buffers"], student_config=asdict(sc),
                  history=fit.history, kd_guard=guard, world_size=dist.world)
    write_json(out_dir / "metrics.json", report)
    dist.barrier()  # the next stage (or the KD student's guard) may read what rank 0 wrote
    return report


def _kd_guard(run: Path, fit: FitResult, seed: int, device: str):
    """student.kd_guard: keep the KD student only if its best validation NDCG@10 >= the no-KD student's (same
    seed, trained first by the student stage); otherwise serve the no-KD weights. Returns (student, record)."""
    ref_path = run / "student_nokd" / "metrics.json"
    if not ref_path.exists():
        print(f"student: kd_guard needs {ref_path} (the no-KD student, trained first by `distillrec student`); "
              "guard not applied")
        return fit.student, dict(applied=False, reason="no no-KD student")
    ref = json.loads(ref_path.read_text())
    if ref.get("seed") != seed:
        return fit.student, dict(applied=False, reason=f"no-KD student has seed {ref.get('seed')}, not {seed}")
    kd_val, nokd_val = float(fit.best_val_ndcg10), float(ref["best_val_ndcg10"])
    rec = dict(applied=True, kd_val_ndcg10=kd_val, no_kd_val_ndcg10=nokd_val, kept="kd" if kd_val >= nokd_val else "no_kd")
    if rec["kept"] == "kd":
        return fit.student, rec
    print(f"student: kd_guard: the KD student's validation NDCG@10 {kd_val:.4f} < the no-KD student's {nokd_val:.4f}; "
          "serving the no-KD weights (the teacher is weaker than the student on this data)")
    return Student.load(run / "student_nokd").to(device).eval(), rec
