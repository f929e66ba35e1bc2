"""Teacher stage: LoRA multi-task fine-tune on one-pass windows, protocol evaluation, save.

Writes runs/<name>/teacher/: adapter/ (peft save_pretrained), heads.safetensors, config.json,
train_log.jsonl (every unweighted task loss, the weights and the weighted total per step),
metrics.json, test_predictions.npz (the evaluated users' scores, reused by the benchmark report).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import Timer, pick_device, set_seed, stage_dir
from .config import RunConfig
from .data import Dataset, Split, load_dataset, sample_users
from .evaluation import evaluate_predictions
from .io import write_json
from .teacher import (SequenceBuilder, Teacher, TeacherHeads, add_lora, compute_item_vectors, load_base, lr_lambda,
                      pad_batch, param_count, save_heads, teacher_meta, token_batches, windows)
from .weighting import build_weighting


def _index_pairs(rows: list[int], cols: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(rows, device=device), torch.tensor(cols, device=device)


def window_examples(split: Split, users: np.ndarray, window: int, context: int) -> list[tuple[int, int, int, int]]:
    """(user, context start, labelled start, end) over each user's training part."""
    return [(int(u), c, a, b) for u in users for (c, a, b) in windows(int(split.n_train[u]), window, context)]


def collate_windows(examples, split: Split, builder: SequenceBuilder, device):
    """Token batch + (row, pos) of every labelled target j and its labels."""
    ds = split.ds
    seqs, before_r, before_c, item_c, tgt_item, tgt_rating, owner = [], [], [], [], [], [], []
    for row, (u, c, a, b) in enumerate(examples):
        items = ds.items[u][c:b]
        ratings = None if ds.ratings is None else ds.ratings[u][c:b]
        enc = builder.encode(items, ratings)
        seqs.append(enc.ids)
        for j in range(a, b):
            before_r.append(row)
            before_c.append(enc.before[j - c])
            item_c.append(enc.item_end[j - c])
            tgt_item.append(int(ds.items[u][j]))
            tgt_rating.append(0.0 if ds.ratings is None else float(ds.ratings[u][j]))
            owner.append((u, j))
    ids, mask = pad_batch(seqs, builder.pad_id)
    return dict(ids=ids.to(device), mask=mask.to(device),
                before=_index_pairs(before_r, before_c, device), item=_index_pairs(before_r, item_c, device),
                next_item=torch.tensor(tgt_item, device=device), rating=torch.tensor(tgt_rating, device=device),
                owner=owner, tokens=int(mask.sum()))


def task_losses(out: dict, batch: dict, tasks: list[str], like_threshold: float) -> dict[str, torch.Tensor]:
    losses = {"next_item": F.cross_entropy(out["next_item"], batch["next_item"])}
    if "rating" in tasks:
        losses["rating"] = F.mse_loss(out["rating"], batch["rating"])
    if "like" in tasks:
        losses["like"] = F.binary_cross_entropy_with_logits(out["like"], (batch["rating"] >= like_threshold).float())
    return losses


@torch.no_grad()
def teacher_predict(teacher: Teacher, builder: SequenceBuilder, split: Split, users: np.ndarray, stage: str,
                    history_len: int, budget: int, device, desc="teacher eval") -> dict:
    """One pass per user over [last `history_len` history + the target item's text]: next_item scores
    (read before the target), rating and like logit (read at the end of the target's text)."""
    ds = split.ds
    encs = []
    for u in users:
        h_items, h_ratings = split.history(u, stage, history_len)
        tgt, _ = split.target(u, stage)
        items = np.append(h_items, tgt)
        ratings = None if h_ratings is None else np.append(h_ratings, 0.0)
        encs.append(builder.encode(items, ratings, open_last=True))
    n = len(users)
    scores = np.zeros((n, ds.n_items), dtype=np.float32)
    rating = np.zeros(n, dtype=np.float32)
    like = np.zeros(n, dtype=np.float32)
    tokens = 0
    t0 = time.perf_counter()
    for batch in tqdm(token_batches([len(e.ids) for e in encs], budget), desc=desc, leave=False):
        ids, mask = pad_batch([encs[i].ids for i in batch], builder.pad_id)
        rows = list(range(len(batch)))
        before = _index_pairs(rows, [encs[i].before[-1] for i in batch], device)
        item = _index_pairs(rows, [encs[i].item_end[-1] for i in batch], device)
        out = teacher(ids.to(device), mask.to(device), before, item)
        scores[batch] = out["next_item"].float().cpu().numpy()
        if "rating" in out:
            rating[batch] = out["rating"].float().cpu().numpy()
            like[batch] = out["like"].float().cpu().numpy()
        tokens += int(mask.sum())
    seconds = time.perf_counter() - t0
    return dict(users=np.asarray(users), scores=scores, rating=rating, like_logit=like, tokens=tokens, seconds=seconds)


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless (epoch, indices) stream: a fresh permutation per epoch."""
    epoch = 0
    while True:
        order = rng.permutation(n)
        for i in range(0, n, batch_size):
            yield epoch, order[i:i + batch_size]
        epoch += 1


def _build(cfg: RunConfig, ds: Dataset, split: Split, device):
    tc = cfg.teacher
    backbone, tok = load_base(tc, seed=cfg.seed)
    backbone = backbone.to(device)
    builder = SequenceBuilder(tok, ds.item_text, tc.max_item_tokens, ds.has_ratings)
    item_vecs = compute_item_vectors(backbone, builder, tc.infer_batch_tokens, device)
    backbone = add_lora(backbone, tc)
    counts = split.train_item_counts()
    rating_mean = float(np.mean(np.concatenate([split.train_ratings(u) for u in range(ds.n_users)]))) \
        if ds.has_ratings else 0.0
    heads = TeacherHeads(backbone.config.hidden_size, tc.head_dim, item_vecs, ds.tasks,
                         torch.log1p(torch.tensor(counts, dtype=torch.float32)), rating_mean)
    return Teacher(backbone, heads).to(device), builder


def train_teacher(cfg: RunConfig, log_path: Optional[Path] = None) -> dict:
    run = Path(cfg.run_dir)
    out_dir = stage_dir(run, "teacher")
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    tc = cfg.teacher
    with Timer() as t_build:
        teacher, builder = _build(cfg, ds, split, device)
    users = sample_users(np.arange(ds.n_users), tc.train_users, cfg.seed)
    examples = window_examples(split, users, tc.window, tc.context)
    dataset_tokens = sum(builder.dataset_tokens(split.train_items(u), split.train_ratings(u)) for u in users)
    weighting = build_weighting(tc.weighting, ds.tasks, tc.loss_weights).to(device)
    lora_params = [p for p in teacher.backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": lora_params, "lr": tc.lr},
        {"params": list(teacher.heads.parameters()) + list(weighting.parameters()), "lr": tc.head_lr},
    ], weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(1, tc.max_steps // 10), tc.max_steps))
    rng = np.random.default_rng(cfg.seed)
    log_path = log_path or out_dir / "train_log.jsonl"
    log_f = open(log_path, "w")
    teacher.train()
    step, tokens_seen, t0, stop_reason = 0, 0, time.perf_counter(), "max_steps"
    bar = tqdm(total=tc.max_steps, desc="teacher LoRA fine-tune")
    epoch_losses: dict[str, list[float]] = {}
    prev_epoch = 0
    for epoch, idx in epoch_batches(len(examples), tc.batch_size, rng):
        if step >= tc.max_steps:
            break
        if time.perf_counter() - t0 > tc.time_budget_s:
            stop_reason = "time_budget"
            break
        if epoch != prev_epoch:  # DWA adapts from per-epoch mean losses
            weighting.end_epoch({t: float(np.mean(v)) for t, v in epoch_losses.items()})
            epoch_losses, prev_epoch = {}, epoch
        batch = collate_windows([examples[k] for k in idx], split, builder, device)
        out = teacher(batch["ids"], batch["mask"], batch["before"], batch["item"])
        losses = task_losses(out, batch, ds.tasks, ds.like_threshold)
        total, weights = weighting(losses)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        step += 1
        tokens_seen += batch["tokens"]
        rec = {"step": step, "epoch": epoch, "total": total.item(), "lr": sched.get_last_lr()[0],
               "tokens": batch["tokens"], "losses": {t: float(v) for t, v in losses.items()}, "weights": weights}
        log_f.write(json.dumps(rec) + "\n")
        for t, v in losses.items():
            epoch_losses.setdefault(t, []).append(float(v))
        bar.update(1)
        bar.set_postfix({t: f"{float(v):.3f}" for t, v in losses.items()})
    bar.close()
    log_f.close()
    train_seconds = time.perf_counter() - t0
    teacher.eval()

    # the window token count of one full epoch, measured without running the LLM
    window_tokens = sum(len(builder.encode(ds.items[u][c:b], None if ds.ratings is None else ds.ratings[u][c:b]).ids)
                        for (u, c, a, b) in examples)
    eval_users = sample_users(split.eval_users, tc.eval_users, cfg.seed)
    pred = teacher_predict(teacher, builder, split, eval_users, "test", tc.eval_history, tc.infer_batch_tokens, device)
    metrics = evaluate_predictions(pred, split, "test", seed=cfg.seed)

    teacher.backbone.save_pretrained(str(out_dir / "adapter"))
    meta = teacher_meta(tc, ds.tasks, ds.n_items, teacher.backbone.config.hidden_size, cfg.seed)
    meta.update(data_hash=ds.data_hash)
    save_heads(teacher.heads, out_dir, meta)
    np.savez(out_dir / "test_predictions.npz", users=pred["users"], scores=pred["scores"], rating=pred["rating"],
             like_logit=pred["like_logit"])
    lora_trainable = sum(p.numel() for p in lora_params)
    report = dict(
        metrics=metrics, stage="test", eval_users=len(eval_users), seed=cfg.seed, device=device,
        budget=dict(train_users=len(users), windows=len(examples), steps=step, max_steps=tc.max_steps,
                    time_budget_s=tc.time_budget_s, stop_reason=stop_reason, batch_size=tc.batch_size,
                    eval_history=tc.eval_history, eval_users=len(eval_users)),
        cost=dict(build_seconds=t_build.seconds, train_seconds=train_seconds, train_tokens=tokens_seen,
                  train_tokens_per_s=tokens_seen / max(train_seconds, 1e-9),
                  llm_tokens_per_dataset_token=window_tokens / max(1, dataset_tokens),
                  eval_tokens=pred["tokens"], eval_seconds=pred["seconds"],
                  eval_users_per_s=len(eval_users) / max(pred["seconds"], 1e-9)),
        params=dict(total=param_count(teacher.backbone) + param_count(teacher.heads), lora_trainable=lora_trainable,
                    heads=param_count(teacher.heads)),
    )
    write_json(out_dir / "metrics.json", report)
    return report
