"""Teacher stage: LoRA multi-task fine-tune on one-pass windows, protocol evaluation, save.

Writes runs/<name>/teacher/: adapter/ (peft save_pretrained), heads.safetensors, config.json,
train_log.jsonl (every unweighted task loss, the weights and the weighted total per step),
metrics.json, test_predictions.npz (the evaluated users' scores, reused by the benchmark report).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import Timer, lr_lambda, pick_device, set_seed
from .config import RunConfig
from .data import Dataset, Split, load_dataset, sample_users
from .evaluation import evaluate_predictions
from .io import write_json
from .teacher import (SequenceBuilder, Teacher, TeacherHeads, add_lora, build_item_token_input, compute_item_vectors,
                      load_base, make_builder, pad_batch, param_count, resolve_model, save_heads, teacher_meta,
                      token_batches, truncate_layers, windows)
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


_ITEM_VECTORS: dict = {}  # per-process memo of the base LM's item vectors (deterministic, ~30 s on CPU)
_STEP_SLEEP = float(__import__("os").environ.get("DISTILLREC_STEP_SLEEP", "0"))


def _shared_params(teacher: Teacher) -> list:
    """The teacher's last shared layer (the head LayerNorm read by every task): GradNorm balances on it."""
    return list(teacher.heads.norm.parameters())


def _build(cfg: RunConfig, ds: Dataset, split: Split, device, with_item_vectors: bool = True):
    """Base LM + LoRA + heads. Item vectors are read once from the base LM (LoRA starts as the identity);
    when resuming they come from the checkpoint instead (with_item_vectors=False skips the pass)."""
    tc = cfg.teacher
    backbone, tok = load_base(tc, seed=cfg.seed)
    backbone = backbone.to(device)
    builder = SequenceBuilder(tok, ds.item_text, tc.max_item_tokens, ds.has_ratings)  # item texts (vectors)
    hidden = backbone.config.hidden_size
    key = (resolve_model(tc), json.dumps(tc.tiny, sort_keys=True), tc.max_item_tokens, ds.data_hash, cfg.seed)
    if not with_item_vectors:
        item_vecs = torch.zeros(ds.n_items, hidden)
    elif key in _ITEM_VECTORS:  # same base LM + texts in this process (e.g. the weighting comparison)
        item_vecs = _ITEM_VECTORS[key].clone()
    else:
        item_vecs = compute_item_vectors(backbone, builder, tc.infer_batch_tokens, device)
        _ITEM_VECTORS[key] = item_vecs.clone()
    inputs = None
    if tc.input == "item_tokens":  # item vectors above come from the FULL-depth LM; the trunk is cut after
        inputs = build_item_token_input(backbone, tok, ds.item_text, tc.max_item_tokens, item_vecs).to(device)
        builder = make_builder(tc, tok, ds.item_text, ds.has_ratings, inputs.vocab)
    backbone = truncate_layers(backbone, tc.layers)
    torch.manual_seed(cfg.seed)  # LoRA/head init independent of what ran before
    backbone = add_lora(backbone, tc)
    counts = split.train_item_counts()
    rating_mean, like_logit = 0.0, 0.0
    if ds.has_ratings:
        r = np.concatenate([split.train_ratings(u) for u in range(ds.n_users)])
        rating_mean = float(r.mean())
        p = float(np.clip((r >= ds.like_threshold).mean(), 1e-4, 1 - 1e-4))
        like_logit = float(np.log(p / (1 - p)))
    heads = TeacherHeads(hidden, tc.head_dim, item_vecs, ds.tasks,
                         torch.log1p(torch.tensor(counts, dtype=torch.float32)), rating_mean, like_logit)
    return Teacher(backbone, heads, inputs).to(device), builder


# ----------------------------------------------------------------------------- distributed helpers
class Dist:
    """torchrun / accelerate launch set WORLD_SIZE, RANK, LOCAL_RANK: DDP with nccl (CUDA) or gloo (CPU)."""

    def __init__(self, device: str):
        import os
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist
            if device.startswith("cuda"):
                torch.cuda.set_device(self.local_rank)
                self.device = f"cuda:{self.local_rank}"
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def average_(self, tensors):
        if self.world > 1:
            import torch.distributed as dist
            for t in tensors:
                if t is not None:
                    dist.all_reduce(t, op=dist.ReduceOp.SUM)
                    t /= self.world

    def close(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()


def micro_batch(examples_n: int, batch_size: int, world: int, rank: int, seed: int, m: int) -> tuple[int, np.ndarray]:
    """(epoch, example indices) of global micro-batch m for `rank`: a pure function of (seed, m), so a
    resumed run draws exactly the batches an uninterrupted run would have drawn."""
    per_epoch = max(1, -(-examples_n // (batch_size * world)))
    epoch, pos = divmod(m, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(examples_n)
    start = (pos * world + rank) * batch_size
    idx = order[start:start + batch_size]
    if len(idx) == 0:  # last micro-batch of an epoch, uneven split: wrap so every rank steps together
        idx = order[:batch_size]
    return epoch, idx


def _amp_context(tc, device: str):
    import contextlib
    mode = tc.amp
    if mode == "auto":
        mode = "bf16" if device.startswith("cuda") else "none"
    if mode == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def trainable_state(teacher: Teacher, weighting) -> dict:
    """Only what training changes: LoRA weights, heads (incl. the item-vector buffer), weighting state."""
    state = {f"model.{k}": v.detach().clone() for k, v in teacher.named_parameters() if v.requires_grad}
    state.update({f"heads.{k}": v.detach().clone() for k, v in teacher.heads.state_dict().items()})
    if teacher.inputs is not None:
        state.update({f"inputs.{k}": v.detach().clone() for k, v in teacher.inputs.state_dict().items()})
    state.update({f"weighting.{k}": v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
                  for k, v in weighting.state_dict().items()})  # DWA's loss history is a plain dict
    return state


def load_trainable_state(teacher: Teacher, weighting, state: dict) -> None:
    params = dict(teacher.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            if k.startswith("model.") and not k[6:].startswith(("heads.", "inputs.")):
                params[k[6:]].copy_(v)
    teacher.heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")})
    if teacher.inputs is not None:
        teacher.inputs.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("inputs.")})
    weighting.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("weighting.")}, strict=False)


def _refresh_item_vectors(teacher: Teacher, builder: SequenceBuilder, tc, device) -> None:
    """One catalog pass with the current (LoRA-tuned) backbone; every rank computes the same vectors."""
    was_training = teacher.training
    teacher.eval()
    with _amp_context(tc, device):
        vecs = compute_item_vectors(teacher.backbone, builder, tc.infer_batch_tokens, device, desc="item vectors (tuned)")
    teacher.heads.item_vectors.copy_(vecs.to(teacher.heads.item_vectors))
    teacher.train(was_training)


def _config_fingerprint(cfg: RunConfig, data_hash: str) -> str:
    import hashlib
    from dataclasses import asdict
    body = json.dumps(dict(teacher=asdict(cfg.teacher), seed=cfg.seed, data=data_hash), sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, payload: dict) -> None:
    from .io import atomic_path
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _validate(teacher, builder, split, users, tc, device) -> float:
    from . import metrics as M
    was_training = teacher.training
    teacher.eval()
    pred = teacher_predict(teacher, builder, split, users, "val", tc.val_history, tc.infer_batch_tokens, device,
                           desc="teacher val")
    teacher.train(was_training)
    targets, _ = split.targets(users, "val")
    return float(M.ranking_metrics(pred["scores"], targets, [split.seen(u, "val") for u in users],
                                   ks=(10,))["NDCG@10"].mean())


def train_teacher(cfg: RunConfig) -> dict:
    """Fine-tune (resuming from teacher/checkpoint/last.pt when it matches this config), validate,
    evaluate on the protocol's test split and save. Under torchrun only rank 0 writes."""
    run = Path(cfg.run_dir)
    out_dir = run / "teacher"
    ckpt_dir = out_dir / "checkpoint"
    tc = cfg.teacher
    dist_ = Dist(pick_device(cfg.device))
    device = dist_.device
    if dist_.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    fingerprint = _config_fingerprint(cfg, ds.data_hash)
    resume = None
    if (ckpt_dir / "last.pt").exists():
        ck = torch.load(ckpt_dir / "last.pt", map_location="cpu", weights_only=False)
        if ck.get("fingerprint") == fingerprint:
            resume = ck
        elif dist_.main:
            print(f"teacher: ignoring {ckpt_dir / 'last.pt'} (written for another config/data); training from scratch")
    with Timer() as t_build:
        teacher, builder = _build(cfg, ds, split, device, with_item_vectors=resume is None)
    weighting = build_weighting(tc.weighting, ds.tasks, tc.loss_weights, shared=_shared_params(teacher)).to(device)
    users = sample_users(np.arange(ds.n_users), tc.train_users, cfg.seed)
    examples = window_examples(split, users, tc.window, tc.context)
    val_users = sample_users(split.eval_users, tc.val_users, cfg.seed + 1)
    lora_params = [p for p in teacher.backbone.parameters() if p.requires_grad]
    if teacher.inputs is not None and tc.refresh_item_vectors and dist_.main:
        print("teacher: input='item_tokens' reads no item text in the trunk; item vectors are not refreshed")
    proj_params = list(teacher.heads.item_proj.parameters())
    head_params = [p for n, p in teacher.heads.named_parameters() if not n.startswith("item_proj.")]
    groups = [{"params": lora_params, "lr": tc.lr},
              {"params": head_params + list(weighting.parameters()), "lr": tc.head_lr},
              {"params": proj_params, "lr": tc.item_proj_lr}]
    if teacher.inputs is not None:
        groups.append({"params": list(teacher.inputs.parameters()), "lr": tc.input_lr})
    opt = torch.optim.AdamW(groups, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(1, int(tc.warmup_frac * tc.max_steps)), tc.max_steps))
    step, tokens_seen, elapsed, best, best_step = 0, 0, 0.0, -1.0, 0
    if resume is not None:
        load_trainable_state(teacher, weighting, resume["state"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        step, tokens_seen, elapsed = resume["step"], resume["tokens_seen"], resume["elapsed"]
        best, best_step = resume["best"], resume["best_step"]
        if dist_.main:
            print(f"teacher: resuming from step {step} ({ckpt_dir / 'last.pt'})")
    model = teacher
    if dist_.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(teacher, device_ids=[dist_.local_rank] if device.startswith("cuda") else None)
    log_path = out_dir / "train_log.jsonl"
    if dist_.main:  # keep exactly the log lines of the steps that the checkpoint holds
        kept = log_path.read_text().splitlines()[:step] if resume is not None and log_path.exists() else []
        log_f = open(log_path, "w")
        log_f.writelines(line + "\n" for line in kept)
    t0 = time.perf_counter() - elapsed
    val_seconds = 0.0 if resume is None else resume.get("val_seconds", 0.0)
    stop_reason = "max_steps"
    teacher.train()
    bar = tqdm(total=tc.max_steps, initial=step, desc="teacher LoRA fine-tune", disable=not dist_.main)
    epoch_losses: dict[str, list[float]] = {} if resume is None else resume.get("period_losses", {})
    prev_epoch = micro_batch(len(examples), tc.batch_size, dist_.world, dist_.rank, cfg.seed, step * tc.grad_accum)[0]
    while step < tc.max_steps:
        if time.perf_counter() - t0 > tc.time_budget_s:
            stop_reason = "time_budget"
            break
        opt.zero_grad(set_to_none=True)
        step_losses: dict[str, float] = {}
        for a in range(tc.grad_accum):
            epoch, idx = micro_batch(len(examples), tc.batch_size, dist_.world, dist_.rank, cfg.seed,
                                     step * tc.grad_accum + a)
            if epoch != prev_epoch:
                if not tc.adapt_every:  # DWA adapts from per-period mean losses; here a period = an epoch
                    weighting.end_epoch({t: float(np.mean(v)) for t, v in epoch_losses.items()})
                    epoch_losses = {}
                prev_epoch = epoch
                if tc.refresh_item_vectors and teacher.inputs is None:
                    _refresh_item_vectors(teacher, builder, tc, device)
            batch = collate_windows([examples[k] for k in idx], split, builder, device)
            with _amp_context(tc, device):
                out = model(batch["ids"], batch["mask"], batch["before"], batch["item"])
            out = {k: v.float() for k, v in out.items()}
            losses = task_losses(out, batch, ds.tasks, ds.like_threshold)
            total, weights = weighting(losses)
            (total / tc.grad_accum).backward()
            tokens_seen += batch["tokens"] * dist_.world
            for t, v in losses.items():
                step_losses[t] = step_losses.get(t, 0.0) + v.item() / tc.grad_accum
        dist_.average_([p.grad for p in weighting.parameters()])
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        step += 1
        total_w = sum(weights[t] * step_losses[t] for t in step_losses)
        for t, v in step_losses.items():
            epoch_losses.setdefault(t, []).append(v)
        if tc.adapt_every and step % tc.adapt_every == 0:  # close a loss-trend period (DWA)
            weighting.end_epoch({t: float(np.mean(v)) for t, v in epoch_losses.items()})
            epoch_losses = {}
        bar.update(1)
        bar.set_postfix({t: f"{v:.3f}" for t, v in step_losses.items()})
        rec = {"step": step, "epoch": prev_epoch, "total": total_w, "lr": sched.get_last_lr()[0],
               "losses": step_losses, "weights": weights}
        if tc.val_every and step % tc.val_every == 0:
            if dist_.main:
                t_val = time.perf_counter()
                rec["train_seconds"] = round(t_val - t0 - val_seconds, 2)  # training time only (learning curves)
                rec["val_ndcg@10"] = _validate(teacher, builder, split, val_users, tc, device)
                val_seconds += time.perf_counter() - t_val
                if rec["val_ndcg@10"] > best:
                    best, best_step = rec["val_ndcg@10"], step
                    _save_checkpoint(ckpt_dir / "best.pt", {"state": trainable_state(teacher, weighting), "step": step})
            dist_.barrier()
        if _STEP_SLEEP:  # test hook: slow steps down so a test can kill the process mid-run
            time.sleep(_STEP_SLEEP)
        if dist_.main:
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            if step % tc.checkpoint_every == 0 or step == tc.max_steps:
                _save_checkpoint(ckpt_dir / "last.pt", dict(
                    fingerprint=fingerprint, state=trainable_state(teacher, weighting), optimizer=opt.state_dict(),
                    scheduler=sched.state_dict(), torch_rng=torch.get_rng_state(), step=step, tokens_seen=tokens_seen,
                    elapsed=time.perf_counter() - t0, best=best, best_step=best_step, period_losses=epoch_losses,
                    val_seconds=val_seconds))
    bar.close()
    train_seconds = time.perf_counter() - t0
    teacher.eval()
    digest = float(sum(p.detach().double().sum() for p in lora_params))
    if not dist_.main:
        print(f"rank {dist_.rank} trainable-weight digest {digest:.10e}", flush=True)
        dist_.close()
        return {"rank": dist_.rank, "digest": digest, "steps": step}
    print(f"rank {dist_.rank} trainable-weight digest {digest:.10e}", flush=True)
    log_f.close()
    if tc.val_every and best_step and (ckpt_dir / "best.pt").exists():
        load_trainable_state(teacher, weighting, torch.load(ckpt_dir / "best.pt", map_location="cpu",
                                                            weights_only=False)["state"])
    report = _evaluate_and_save(cfg, ds, split, teacher, builder, examples, users, weighting, device, dict(
        train_users=len(users), windows=len(examples), steps=step, max_steps=tc.max_steps,
        time_budget_s=tc.time_budget_s, stop_reason=stop_reason, batch_size=tc.batch_size, grad_accum=tc.grad_accum,
        world_size=dist_.world, eval_history=tc.eval_history,
        item_vector_refreshes=prev_epoch if tc.refresh_item_vectors and teacher.inputs is None else 0,  # one per epoch boundary crossed
        val_every=tc.val_every, best_step=best_step or step,
        best_val_ndcg10=best if best >= 0 else None), t_build.seconds, train_seconds, tokens_seen, lora_params,
        extra=dict(trainable_weight_digest=digest))
    dist_.close()
    return report


def save_test_predictions(out_dir: Path, pred: dict) -> None:
    """teacher/test_predictions.npz (atomic): the evaluated users' scores, reused by the ablation and the bench."""
    from .io import atomic_path
    with atomic_path(Path(out_dir) / "test_predictions.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, users=pred["users"], scores=pred["scores"], rating=pred["rating"], like_logit=pred["like_logit"])


def _evaluate_and_save(cfg, ds, split, teacher, builder, examples, users, weighting, device, budget: dict,
                       build_seconds, train_seconds, tokens_seen, lora_params, extra: dict) -> dict:
    tc = cfg.teacher
    out_dir = Path(cfg.run_dir) / "teacher"
    # tokens of one full epoch over the windows vs the same users' histories written once
    window_tokens = sum(len(builder.encode(ds.items[u][c:b], None if ds.ratings is None else ds.ratings[u][c:b]).ids)
                        for (u, c, a, b) in examples)
    dataset_tokens = sum(builder.dataset_tokens(split.train_items(u), split.train_ratings(u)) for u in users)
    eval_users = sample_users(split.eval_users, tc.eval_users, cfg.seed)
    pred = teacher_predict(teacher, builder, split, eval_users, "test", tc.eval_history, tc.infer_batch_tokens, device)
    metrics = evaluate_predictions(pred, split, "test", seed=cfg.seed)
    teacher.backbone.save_pretrained(str(out_dir / "adapter"))
    meta = teacher_meta(tc, ds.tasks, ds.n_items, teacher.backbone.config.hidden_size, cfg.seed)
    meta.update(data_hash=ds.data_hash, vocab=teacher.inputs.vocab if teacher.inputs is not None else None)
    save_heads(teacher.heads, out_dir, meta, teacher.inputs)
    save_test_predictions(out_dir, pred)
    budget["eval_users"] = len(eval_users)
    report = dict(
        metrics=metrics, stage="test", eval_users=len(eval_users), seed=cfg.seed, device=str(device),
        weighting=tc.weighting, budget=budget,
        cost=dict(build_seconds=build_seconds, train_seconds=train_seconds, train_tokens=tokens_seen,
                  train_tokens_per_s=tokens_seen / max(train_seconds, 1e-9),
                  llm_tokens_per_dataset_token=window_tokens / max(1, dataset_tokens),
                  eval_tokens=pred["tokens"], eval_seconds=pred["seconds"],
                  eval_users_per_s=len(eval_users) / max(pred["seconds"], 1e-9)),
        params=dict(total=param_count(teacher.backbone) + param_count(teacher.heads),
                    lora_trainable=sum(p.numel() for p in lora_params), heads=param_count(teacher.heads)),
        **extra,
    )
    write_json(out_dir / "metrics.json", report)
    return report
