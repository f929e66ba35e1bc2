"""Student stage: train the multi-head student on hard labels + the cached teacher outputs.

Conventions (logged per step, unweighted, plus the weighted total):
  next_item  hard = softmax CE over the whole catalog;
             kd   = T^2 * KL(softmax(teacher top-K logits / T) || softmax(student logits on the same K / T)).
             The T^2 factor (Hinton et al. 2015) keeps the soft-target gradients on the scale of the hard
             ones when T changes.
  rating     hard = MSE to the true rating;   kd = MSE to the teacher's rating.
  like       hard = BCE to rating >= 4;       kd = BCE to sigmoid(teacher like logit).
  Per position: task loss = (1 - alpha) * hard + alpha * kd where the teacher labelled the position,
  hard alone elsewhere (teacher coverage is reported). alpha = 0 is the no-KD baseline.
Writes runs/<name>/student/ (or student_nokd/): model.safetensors, config.json, metrics.json,
train_log.jsonl, test_predictions.npz.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics as M
from .cache import load_cache
from .common import pick_device, set_seed, stage_dir
from .config import RunConfig, StudentConfig
from .data import Split, load_dataset
from .evaluation import evaluate_predictions, history_arrays
from .io import write_json
from .student import Student
from .teacher_stage import epoch_batches
from .weighting import build_weighting


def student_windows(split: Split, max_len: int, stride: int):
    """Windows over every user's training part: (user, start, end, first labelled) with each position
    labelled exactly once and, after the first window, at least max_len - stride positions of context."""
    out = []
    for u in range(split.ds.n_users):
        n = int(split.n_train[u])
        if n == 0:
            continue
        end = min(n, max_len)
        out.append((u, 0, end, 0))
        while end < n:
            new_end = min(n, end + stride)
            out.append((u, max(0, new_end - max_len), new_end, end))
            end = new_end
    return out


def build_training_arrays(split: Split, max_len: int, cache: dict | None):
    """Left-padded window arrays + per-position label mask + per-position teacher cache row (-1 = none)."""
    ds = split.ds
    wins = student_windows(split, max_len, max(1, max_len // 2))
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
        n = e - s
        off = max_len - n
        items[w, off:] = ds.items[u][s:e]
        if ds.ratings is not None:
            ratings[w, off:] = ds.ratings[u][s:e]
        length[w] = n
        labelled[w, off + (first - s):] = True
        if u in row_of:
            rows[w, off:] = row_of[u] + np.arange(s, e)
    return dict(items=items, ratings=ratings, length=length, labelled=labelled, rows=rows)


def kd_next_item(student_logits, t_items, t_logits, T: float):
    """T^2 * KL(p_teacher || p_student) over the teacher's top-K items, per position."""
    s = torch.gather(student_logits, -1, t_items) / T
    p_t = torch.softmax(t_logits / T, dim=-1)
    return (T * T) * (p_t * (torch.log(p_t.clamp_min(1e-12)) - torch.log_softmax(s, dim=-1))).sum(-1)


def position_losses(out: dict, batch: dict, tasks, cfg: StudentConfig, like_threshold: float):
    """Unweighted per-task losses (mixed hard/KD) and each hard/KD term for the log."""
    m = batch["labelled"]
    has_t = batch["has_teacher"][m].float()
    alpha = cfg.kd_alpha
    target = batch["items"][m]
    logits = out["next_item"][m]
    terms = {"next_item/hard": F.cross_entropy(logits, target, reduction="none")}
    if has_t.sum() > 0:
        terms["next_item/kd"] = kd_next_item(logits, batch["t_items"][m], batch["t_logits"][m], cfg.temperature)
    if "rating" in tasks:
        r_pred, r_true = out["rating"][..., 0][m], batch["ratings"][m]
        l_pred = out["like"][..., 0][m]
        terms["rating/hard"] = (r_pred - r_true) ** 2
        terms["like/hard"] = F.binary_cross_entropy_with_logits(l_pred, (r_true >= like_threshold).float(), reduction="none")
        if has_t.sum() > 0:
            terms["rating/kd"] = (r_pred - batch["t_rating"][m]) ** 2
            terms["like/kd"] = F.binary_cross_entropy_with_logits(l_pred, torch.sigmoid(batch["t_like"][m]), reduction="none")
    losses, logged = {}, {}
    for t in tasks:
        hard = terms[f"{t}/hard"]
        kd = terms.get(f"{t}/kd")
        mix = hard if kd is None or alpha == 0 else hard * (1 - alpha * has_t) + alpha * has_t * kd
        losses[t] = mix.mean()
        logged[f"{t}/hard"] = hard.detach().mean().item()
        if kd is not None and has_t.sum() > 0:
            logged[f"{t}/kd"] = ((kd * has_t).sum() / has_t.sum()).item()
    return losses, logged


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


def _to_batch(arrays: dict, idx, cache, device) -> dict:
    b = {k: torch.from_numpy(v[idx]).to(device) for k, v in arrays.items() if k != "rows"}
    rows = arrays["rows"][idx]
    b["has_teacher"] = torch.from_numpy(rows >= 0).to(device)
    if cache is not None:
        r = np.maximum(rows, 0)
        b["t_items"] = torch.from_numpy(cache["next_topk_items"][r].astype(np.int64)).to(device)
        b["t_logits"] = torch.from_numpy(cache["next_topk_logits"][r].astype(np.float32)).to(device)
        b["t_rating"] = torch.from_numpy(cache["rating"][r]).to(device)
        b["t_like"] = torch.from_numpy(cache["like_logit"][r]).to(device)
    return b


def train_student(cfg: RunConfig, kd: bool = True) -> dict:
    """Train one student; kd=False trains the no-KD baseline (same architecture, hard labels only)."""
    run = Path(cfg.run_dir)
    name = "student" if kd else "student_nokd"
    out_dir = stage_dir(run, name)
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    sc = cfg.student if kd else replace(cfg.student, kd_alpha=0.0)
    cache = load_cache(run, ds.data_hash)  # text vectors come from the teacher in both cases
    text = torch.from_numpy(cache["item_vectors"]) if sc.use_text_vectors else None
    rating_mean = float(np.mean(np.concatenate([split.train_ratings(u) for u in range(ds.n_users)]))) \
        if ds.has_ratings else 0.0
    student = Student(sc, ds.n_items, ds.tasks, text_vectors=text, rating_mean=rating_mean).to(device)
    arrays = build_training_arrays(split, sc.max_len, cache if kd else None)
    coverage = float((arrays["rows"][arrays["labelled"]] >= 0).mean())
    weighting = build_weighting(sc.weighting, ds.tasks, sc.loss_weights).to(device)
    opt = torch.optim.AdamW(list(student.parameters()) + list(weighting.parameters()), lr=sc.lr,
                            weight_decay=sc.weight_decay)
    val_users = split.eval_users
    steps_per_epoch = int(np.ceil(len(arrays["items"]) / sc.batch_size))
    rng = np.random.default_rng(cfg.seed)
    log_f = open(out_dir / "train_log.jsonl", "w")
    best, best_state, best_epoch, bad, history = -1.0, None, -1, 0, []
    t0 = time.perf_counter()
    stop_reason = "epochs"
    batches = epoch_batches(len(arrays["items"]), sc.batch_size, rng)
    bar = tqdm(range(sc.epochs), desc=f"{name} epochs")
    for epoch in bar:
        student.train()
        sums: dict[str, list[float]] = {}
        for _ in range(steps_per_epoch):
            _, idx = next(batches)
            batch = _to_batch(arrays, idx, cache if kd else None, device)
            out = student.forward_positions(batch["items"], batch["ratings"], batch["length"])
            losses, logged = position_losses(out, batch, ds.tasks, sc, ds.like_threshold)
            total, weights = weighting(losses)
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            for k, v in {**{t: v.item() for t, v in losses.items()}, **logged}.items():
                sums.setdefault(k, []).append(v)
            log_f.write(json.dumps({"epoch": epoch, "total": total.item(), "terms": logged, "weights": weights}) + "\n")
        weighting.end_epoch({t: float(np.mean(sums[t])) for t in ds.tasks})
        val = student_predict(student, split, val_users, "val", device=device)
        ndcg = float(M.ranking_metrics(val["scores"], split.targets(val_users, "val")[0],
                                       [split.seen(u, "val") for u in val_users], ks=(10,))["NDCG@10"].mean())
        history.append({"epoch": epoch, "val_ndcg@10": ndcg, **{k: float(np.mean(v)) for k, v in sums.items()},
                        "seconds": time.perf_counter() - t0})
        bar.set_postfix(val_ndcg=f"{ndcg:.4f}", loss=f"{np.mean(sums['next_item']):.3f}")
        if ndcg > best:
            best, best_epoch, bad = ndcg, epoch, 0
            best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        else:
            bad += 1
            if bad >= sc.patience:
                stop_reason = "early_stopping"
                break
        if time.perf_counter() - t0 > sc.time_budget_s:
            stop_reason = "time_budget"
            break
    log_f.close()
    train_seconds = time.perf_counter() - t0
    student.load_state_dict(best_state)
    student.eval()
    pred = student_predict(student, split, split.eval_users, "test", device=device)
    metrics = evaluate_predictions(pred, split, "test", seed=cfg.seed)
    extra = dict(item_ids=[str(i) for i in ds.item_ids], like_threshold=ds.like_threshold,
                 max_history=sc.max_len, item_popularity=split.train_item_counts(include_val=True).tolist(),
                 data_hash=ds.data_hash, kd=kd)
    student.cpu().save(out_dir, extra=extra)
    np.savez(out_dir / "test_predictions.npz", **{k: v for k, v in pred.items()})
    report = dict(metrics=metrics, stage="test", eval_users=len(split.eval_users), seed=cfg.seed, device=device,
                  kd=kd, kd_alpha=sc.kd_alpha, temperature=sc.temperature, teacher_coverage=coverage,
                  best_epoch=best_epoch, best_val_ndcg10=best, stop_reason=stop_reason, epochs_run=len(history),
                  train_seconds=train_seconds, windows=int(len(arrays["items"])),
                  params=sum(p.numel() for p in student.parameters()),
                  buffers=sum(b.numel() for b in student.buffers()), history=history)
    write_json(out_dir / "metrics.json", report)
    return report
