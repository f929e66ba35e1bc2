"""Teacher stage: LoRA multi-task fine-tune on one-pass windows, protocol evaluation, save.

Writes runs/<name>/teacher/: adapter/ (peft save_pretrained), heads.safetensors, config.json,
train_log.jsonl (every unweighted task loss, the weights and the weighted total per step),
metrics.json, test_predictions.npz (the evaluated users' scores, reused by the benchmark report).

`train_teacher` reads as its steps: set up (data, model, optimizer, resume) -> plan the time budget
(what the stage must spend besides training, stated up front) -> fit (the step loop: one optimizer
step, then log / validate / checkpoint) -> finish (best checkpoint, evaluation on the test split, save).
`teacher.time_budget_s` bounds the WHOLE stage: training gets what is left after the model load, the
item-vector pass and the estimated final evaluation (distill/budget.py).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .budget import BudgetPlan, StageClock, forward_throughput
from .dist import Dist
from .common import Timer, lr_lambda, pick_device, set_seed
from .config import RunConfig
from .data import Dataset, Split, load_dataset, sample_users
from .evaluation import evaluate_predictions
from .io import make_readable, write_json
from .item_text import save_training_stats, stats_record
from .teacher import (SequenceBuilder, Teacher, TeacherHeads, add_lora, build_item_token_input, item_vectors_with_stats,
                      load_base, make_builder, param_count, resolve_model, save_heads, teacher_meta, truncate_layers)
from .teacher_eval import eval_encodings, save_test_predictions, teacher_predict, validation_ndcg  # noqa: F401
from .weighting import build_weighting
from .windows import index_pairs, micro_batch, pad_batch, window_examples

# teacher_predict / save_test_predictions live in teacher_eval.py (shipped.py and the export use them);
# they are imported here for the stage's own use, and older `from distill.teacher_stage import teacher_predict`
# keeps working.


# ----------------------------------------------------------------------------- batches and losses
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
                before=index_pairs(before_r, before_c, device), item=index_pairs(before_r, item_c, device),
                next_item=torch.tensor(tgt_item, device=device), rating=torch.tensor(tgt_rating, device=device),
                owner=owner, tokens=int(mask.sum()))


def task_losses(out: dict, batch: dict, tasks: list[str], like_threshold: float) -> dict[str, torch.Tensor]:
    losses = {"next_item": F.cross_entropy(out["next_item"], batch["next_item"])}
    if "rating" in tasks:
        losses["rating"] = F.mse_loss(out["rating"], batch["rating"])
    if "like" in tasks:
        losses["like"] = F.binary_cross_entropy_with_logits(out["like"], (batch["rating"] >= like_threshold).float())
    return losses


# ----------------------------------------------------------------------------- building the teacher
_ITEM_VECTORS: dict = {}  # per-process memo of the base LM's item vectors (deterministic, ~30 s on CPU)
_STEP_SLEEP = float(__import__("os").environ.get("DISTILLREC_STEP_SLEEP", "0"))


def _shared_params(teacher: Teacher) -> list:
    """The teacher's last shared layer (the head LayerNorm read by every task): GradNorm balances on it."""
    return list(teacher.heads.norm.parameters())


def _base_item_vectors(cfg: RunConfig, ds: Dataset, backbone, builder, device, with_item_vectors: bool):
    """(the base LM's item-text vectors, their standardisation record for distill/item_text.py), memoised per
    process; (zeros, None) when a checkpoint will overwrite them."""
    tc = cfg.teacher
    if not with_item_vectors:
        return torch.zeros(ds.n_items, backbone.config.hidden_size), None
    key = (resolve_model(tc), json.dumps(tc.tiny, sort_keys=True), tc.max_item_tokens, ds.data_hash, cfg.seed)
    if key not in _ITEM_VECTORS:  # same base LM + texts in this process (e.g. the weighting comparison) reuse it
        _ITEM_VECTORS[key] = item_vectors_with_stats(backbone, builder, tc.infer_batch_tokens, device)
    vecs, mu, sd = _ITEM_VECTORS[key]
    return vecs.clone(), stats_record(vecs, mu, sd, "base")


def _label_priors(ds: Dataset, split: Split) -> tuple[float, float]:
    """(mean training rating, logit of the training like rate): where the rating / like heads start."""
    if not ds.has_ratings:
        return 0.0, 0.0
    r = np.concatenate([split.train_ratings(u) for u in range(ds.n_users)])
    p = float(np.clip((r >= ds.like_threshold).mean(), 1e-4, 1 - 1e-4))
    return float(r.mean()), float(np.log(p / (1 - p)))


def _build(cfg: RunConfig, ds: Dataset, split: Split, device, with_item_vectors: bool = True):
    """Base LM + LoRA + heads. Item vectors are read once from the base LM (LoRA starts as the identity);
    when resuming they come from the checkpoint instead (with_item_vectors=False skips the pass)."""
    tc = cfg.teacher
    backbone, tok = load_base(tc, seed=cfg.seed)
    backbone = backbone.to(device)
    builder = SequenceBuilder(tok, ds.item_text, tc.max_item_tokens, ds.has_ratings)  # item texts (vectors)
    hidden = backbone.config.hidden_size
    item_vecs, item_stats = _base_item_vectors(cfg, ds, backbone, builder, device, with_item_vectors)
    inputs = None
    if tc.input == "item_tokens":  # item vectors above come from the FULL-depth LM; the trunk is cut after
        inputs = build_item_token_input(backbone, tok, ds.item_text, tc.max_item_tokens, item_vecs).to(device)
        builder = make_builder(tc, tok, ds.item_text, ds.has_ratings, inputs.vocab)
    backbone = truncate_layers(backbone, tc.layers)
    torch.manual_seed(cfg.seed)  # LoRA/head init independent of what ran before
    backbone = add_lora(backbone, tc)
    rating_mean, like_logit = _label_priors(ds, split)
    counts = split.train_item_counts()
    heads = TeacherHeads(hidden, tc.head_dim, item_vecs, ds.tasks,
                         torch.log1p(torch.tensor(counts, dtype=torch.float32)), rating_mean, like_logit)
    teacher = Teacher(backbone, heads, inputs).to(device)
    teacher.item_text_records = [item_stats] if item_stats is not None else []  # saved by _evaluate_and_save
    return teacher, builder


def _amp_context(tc, device: str):
    import contextlib
    mode = tc.amp
    if mode == "auto":
        mode = "bf16" if device.startswith("cuda") else "none"
    if mode == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


# ----------------------------------------------------------------------------- checkpoints
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
        vecs, mu, sd = item_vectors_with_stats(teacher.backbone, builder, tc.infer_batch_tokens, device,
                                               desc="item vectors (tuned)")
    teacher.heads.item_vectors.copy_(vecs.to(teacher.heads.item_vectors))
    lora = {k: v for k, v in teacher.backbone.named_parameters() if v.requires_grad}  # the adapter that read them
    teacher.item_text_records = getattr(teacher, "item_text_records", []) + [
        stats_record(teacher.heads.item_vectors, mu, sd, "tuned", lora)]
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


def _matching_checkpoint(path: Path, fingerprint: str, main: bool) -> Optional[dict]:
    """teacher/checkpoint/last.pt when it was written for this config and data, else None (with a message)."""
    if not path.exists():
        return None
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck.get("fingerprint") == fingerprint:
        return ck
    if main:
        print(f"teacher: ignoring {path} (written for another config/data); training from scratch")
    return None


# ----------------------------------------------------------------------------- the stage's state
@dataclass
class LoopState:
    """What the step loop changes; all of it is in last.pt, so a resumed run continues exactly."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    """Training seconds so far (validation included), summed over resumed processes."""
    best: float = -1.0
    best_step: int = 0
    val_seconds: float = 0.0
    period_losses: dict = field(default_factory=dict)
    """Per task, the step losses of the open loss-trend period (DWA)."""
    prev_epoch: int = 0
    stop_reason: str = "max_steps"

    @classmethod
    def from_checkpoint(cls, ck: dict) -> "LoopState":
        return cls(step=ck["step"], tokens_seen=ck["tokens_seen"], elapsed=ck["elapsed"], best=ck["best"],
                   best_step=ck["best_step"], val_seconds=ck.get("val_seconds", 0.0),
                   period_losses=ck.get("period_losses", {}))


@dataclass
class TeacherRun:
    """Everything the steps of `train_teacher` share."""

    cfg: RunConfig
    dist: Dist
    device: str
    clock: StageClock
    ds: Dataset
    split: Split
    teacher: Teacher
    model: Any
    """The teacher, wrapped in DDP under several ranks."""
    builder: Any
    weighting: Any
    users: np.ndarray
    examples: list
    val_users: np.ndarray
    eval_users: np.ndarray
    lora_params: list
    opt: Any
    sched: Any
    fingerprint: str
    build_seconds: float
    state: LoopState
    plan: Optional[BudgetPlan] = None
    log_f: Any = None

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.run_dir) / "teacher"

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoint"


# ----------------------------------------------------------------------------- step 1: set up
def _optimizer(teacher: Teacher, weighting, tc):
    """AdamW with one learning rate per part (LoRA, heads + weighting, item-vector projection, soft-token input)
    and linear warm-up + cosine decay over max_steps."""
    lora_params = [p for p in teacher.backbone.parameters() if p.requires_grad]
    proj_params = list(teacher.heads.item_proj.parameters())
    head_params = [p for n, p in teacher.heads.named_parameters() if not n.startswith("item_proj.")]
    groups = [{"params": lora_params, "lr": tc.lr},
              {"params": head_params + list(weighting.parameters()), "lr": tc.head_lr},
              {"params": proj_params, "lr": tc.item_proj_lr}]
    if teacher.inputs is not None:
        groups.append({"params": list(teacher.inputs.parameters()), "lr": tc.input_lr})
    opt = torch.optim.AdamW(groups, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(1, int(tc.warmup_frac * tc.max_steps)), tc.max_steps))
    return opt, sched, lora_params


def _setup(cfg: RunConfig, clock: StageClock) -> TeacherRun:
    """Data, the teacher (or its checkpoint), weighting, the training windows, the optimizer; resume state."""
    tc = cfg.teacher
    dist_ = Dist(pick_device(cfg.device))
    device = dist_.device
    out_dir = Path(cfg.run_dir) / "teacher"
    if dist_.main:
        (out_dir / "checkpoint").mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    fingerprint = _config_fingerprint(cfg, ds.data_hash)
    resume = _matching_checkpoint(out_dir / "checkpoint" / "last.pt", fingerprint, dist_.main)
    with Timer() as t_build:
        teacher, builder = _build(cfg, ds, split, device, with_item_vectors=resume is None)
    weighting = build_weighting(tc.weighting, ds.tasks, tc.loss_weights, shared=_shared_params(teacher)).to(device)
    users = sample_users(np.arange(ds.n_users), tc.train_users, cfg.seed)
    if teacher.inputs is not None and tc.refresh_item_vectors and dist_.main:
        print("teacher: input='item_tokens' reads no item text in the trunk; item vectors are not refreshed")
    opt, sched, lora_params = _optimizer(teacher, weighting, tc)
    state = LoopState()
    if resume is not None:
        load_trainable_state(teacher, weighting, resume["state"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        state = LoopState.from_checkpoint(resume)
        if dist_.main:
            print(f"teacher: resuming from step {state.step} ({out_dir / 'checkpoint' / 'last.pt'})")
    model = teacher
    if dist_.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(teacher, device_ids=[dist_.local_rank] if device.startswith("cuda") else None)
    examples = window_examples(split, users, tc.window, tc.context)
    state.prev_epoch = micro_batch(len(examples), tc.batch_size, dist_.world, dist_.rank, cfg.seed,
                                   state.step * tc.grad_accum)[0]
    return TeacherRun(cfg=cfg, dist=dist_, device=device, clock=clock, ds=ds, split=split, teacher=teacher,
                      model=model, builder=builder, weighting=weighting, users=users, examples=examples,
                      val_users=sample_users(split.eval_users, tc.val_users, cfg.seed + 1),
                      eval_users=sample_users(split.eval_users, tc.eval_users, cfg.seed), lora_params=lora_params,
                      opt=opt, sched=sched, fingerprint=fingerprint, build_seconds=t_build.seconds, state=state)


# ----------------------------------------------------------------------------- step 2: plan the budget
def _plan_budget(r: TeacherRun) -> BudgetPlan:
    """Split teacher.time_budget_s: measured so far (load, item vectors) + the final evaluation estimated from
    its exact token count and a measured throughput + what is left for training. Printed before training."""
    tc = r.cfg.teacher
    encs = eval_encodings(r.builder, r.split, r.eval_users, "test", tc.eval_history)
    tps = forward_throughput(r.teacher, [e.ids for e in encs], r.builder.pad_id, tc.infer_batch_tokens, r.device)
    plan = BudgetPlan(budget_s=float(tc.time_budget_s), spent_s=r.clock.elapsed(),
                      after_tokens=sum(len(e.ids) for e in encs), tokens_per_s=tps,
                      after_what=f"evaluation of {len(r.eval_users)} test users")
    if r.dist.main:
        print("teacher: " + plan.describe(hint="raise teacher.time_budget_s or lower teacher.eval_users"), flush=True)
    return plan


# ----------------------------------------------------------------------------- step 3: fit
def _open_log(r: TeacherRun) -> None:
    """train_log.jsonl holding exactly the lines of the steps the (resumed) state holds; rank 0 only."""
    if not r.dist.main:
        return
    log_path = r.out_dir / "train_log.jsonl"
    kept = log_path.read_text().splitlines()[:r.state.step] if r.state.step and log_path.exists() else []
    r.log_f = open(log_path, "w")
    r.log_f.writelines(line + "\n" for line in kept)


def _out_of_time(r: TeacherRun, train_elapsed: float) -> bool:
    """Past the training share of the stage budget (one step is always taken); the same answer on every rank."""
    return r.dist.any_(r.state.step >= 1 and train_elapsed > r.plan.train_s)


def _close_period(r: TeacherRun) -> None:
    """DWA re-weights from the mean task losses of the last two periods."""
    r.weighting.end_epoch({t: float(np.mean(v)) for t, v in r.state.period_losses.items()})
    r.state.period_losses = {}


def _train_step(r: TeacherRun) -> dict:
    """One optimizer step over grad_accum micro-batches; returns the step's log record."""
    tc, s = r.cfg.teacher, r.state
    r.opt.zero_grad(set_to_none=True)
    step_losses: dict[str, float] = {}
    weights: dict = {}
    for a in range(tc.grad_accum):
        epoch, idx = micro_batch(len(r.examples), tc.batch_size, r.dist.world, r.dist.rank, r.cfg.seed,
                                 s.step * tc.grad_accum + a)
        if epoch != s.prev_epoch:
            if not tc.adapt_every:  # DWA adapts from per-period mean losses; here a period = an epoch
                _close_period(r)
            s.prev_epoch = epoch
            if tc.refresh_item_vectors and r.teacher.inputs is None:
                _refresh_item_vectors(r.teacher, r.builder, tc, r.device)
        batch = collate_windows([r.examples[k] for k in idx], r.split, r.builder, r.device)
        with _amp_context(tc, r.device):
            out = r.model(batch["ids"], batch["mask"], batch["before"], batch["item"])
        out = {k: v.float() for k, v in out.items()}
        losses = task_losses(out, batch, r.ds.tasks, r.ds.like_threshold)
        total, weights = r.weighting(losses)
        (total / tc.grad_accum).backward()
        s.tokens_seen += batch["tokens"] * r.dist.world
        for t, v in losses.items():
            step_losses[t] = step_losses.get(t, 0.0) + v.item() / tc.grad_accum
    r.dist.average_([p.grad for p in r.weighting.parameters()])
    torch.nn.utils.clip_grad_norm_([p for g in r.opt.param_groups for p in g["params"]], 1.0)
    r.opt.step()
    r.sched.step()
    s.step += 1
    for t, v in step_losses.items():
        s.period_losses.setdefault(t, []).append(v)
    if tc.adapt_every and s.step % tc.adapt_every == 0:  # close a loss-trend period (DWA)
        _close_period(r)
    return {"step": s.step, "epoch": s.prev_epoch, "total": sum(weights[t] * step_losses[t] for t in step_losses),
            "lr": r.sched.get_last_lr()[0], "losses": step_losses, "weights": weights}


def _maybe_validate(r: TeacherRun, rec: dict, t0: float) -> None:
    """Every val_every steps (rank 0): validation NDCG@10 into the log, best.pt when it improves."""
    tc, s = r.cfg.teacher, r.state
    if not (tc.val_every and s.step % tc.val_every == 0):
        return
    if r.dist.main:
        t_val = time.perf_counter()
        rec["train_seconds"] = round(t_val - t0 - s.val_seconds, 2)  # training time only (learning curves)
        rec["val_ndcg@10"] = validation_ndcg(r.teacher, r.builder, r.split, r.val_users, tc.val_history,
                                             tc.infer_batch_tokens, r.device)
        s.val_seconds += time.perf_counter() - t_val
        if rec["val_ndcg@10"] > s.best:
            s.best, s.best_step = rec["val_ndcg@10"], s.step
            _save_checkpoint(r.ckpt_dir / "best.pt", {"state": trainable_state(r.teacher, r.weighting), "step": s.step})
    r.dist.barrier()


def _log_and_checkpoint(r: TeacherRun, rec: dict, t0: float) -> None:
    """Rank 0: the step's log line, and last.pt every checkpoint_every steps and at max_steps."""
    tc, s = r.cfg.teacher, r.state
    if not r.dist.main:
        return
    r.log_f.write(json.dumps(rec) + "\n")
    r.log_f.flush()
    if s.step % tc.checkpoint_every == 0 or s.step == tc.max_steps:
        _save_checkpoint(r.ckpt_dir / "last.pt", dict(
            fingerprint=r.fingerprint, state=trainable_state(r.teacher, r.weighting), optimizer=r.opt.state_dict(),
            scheduler=r.sched.state_dict(), torch_rng=torch.get_rng_state(), step=s.step, tokens_seen=s.tokens_seen,
            elapsed=time.perf_counter() - t0, best=s.best, best_step=s.best_step, period_losses=s.period_losses,
            val_seconds=s.val_seconds))


def _fit(r: TeacherRun) -> float:
    """The step loop until max_steps or the training share of the budget; returns the training seconds."""
    tc, s = r.cfg.teacher, r.state
    _open_log(r)
    t0 = time.perf_counter() - s.elapsed
    r.teacher.train()
    bar = tqdm(total=tc.max_steps, initial=s.step, desc="teacher LoRA fine-tune", disable=not r.dist.main)
    while s.step < tc.max_steps:
        if _out_of_time(r, time.perf_counter() - t0):
            s.stop_reason = "time_budget"
            break
        rec = _train_step(r)
        bar.update(1)
        bar.set_postfix({t: f"{v:.3f}" for t, v in rec["losses"].items()})
        _maybe_validate(r, rec, t0)
        if _STEP_SLEEP:  # test hook: slow steps down so a test can kill the process mid-run
            time.sleep(_STEP_SLEEP)
        _log_and_checkpoint(r, rec, t0)
    bar.close()
    if r.log_f is not None:
        r.log_f.close()
    r.teacher.eval()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- step 4: finish
def _finish(r: TeacherRun, train_seconds: float) -> dict:
    """Best checkpoint back in, test-split evaluation, artifacts and metrics.json (rank 0)."""
    tc, s = r.cfg.teacher, r.state
    digest = float(sum(p.detach().double().sum() for p in r.lora_params))
    print(f"rank {r.dist.rank} trainable-weight digest {digest:.10e}", flush=True)
    if not r.dist.main:
        r.dist.close()
        return {"rank": r.dist.rank, "digest": digest, "steps": s.step}
    if tc.val_every and s.best_step and (r.ckpt_dir / "best.pt").exists():
        load_trainable_state(r.teacher, r.weighting, torch.load(r.ckpt_dir / "best.pt", map_location="cpu",
                                                                weights_only=False)["state"])
    budget = dict(
        train_users=len(r.users), windows=len(r.examples), steps=s.step, max_steps=tc.max_steps,
        time_budget_s=tc.time_budget_s, stop_reason=s.stop_reason, batch_size=tc.batch_size, grad_accum=tc.grad_accum,
        world_size=r.dist.world, eval_history=tc.eval_history,
        # one item-vector refresh per epoch boundary crossed
        item_vector_refreshes=s.prev_epoch if tc.refresh_item_vectors and r.teacher.inputs is None else 0,
        val_every=tc.val_every, best_step=s.best_step or s.step,
        best_val_ndcg10=s.best if s.best >= 0 else None, plan=r.plan.as_dict())
    report = _evaluate_and_save(r, budget, train_seconds, extra=dict(trainable_weight_digest=digest))
    r.dist.close()
    return report


def train_teacher(cfg: RunConfig, clock=time.perf_counter) -> dict:
    """Fine-tune (resuming from teacher/checkpoint/last.pt when it matches this config), validate,
    evaluate on the protocol's test split and save, within teacher.time_budget_s for the whole stage.
    Under torchrun only rank 0 writes."""
    run = _setup(cfg, StageClock(clock))
    run.plan = _plan_budget(run)
    train_seconds = _fit(run)
    return _finish(run, train_seconds)


def _evaluate_and_save(r: TeacherRun, budget: dict, train_seconds: float, extra: dict) -> dict:
    tc, ds, split, builder, teacher = r.cfg.teacher, r.ds, r.split, r.builder, r.teacher
    out_dir = r.out_dir
    # tokens of one full epoch over the windows vs the same users' histories written once
    window_tokens = sum(len(builder.encode(ds.items[u][c:b], None if ds.ratings is None else ds.ratings[u][c:b]).ids)
                        for (u, c, a, b) in r.examples)
    dataset_tokens = sum(builder.dataset_tokens(split.train_items(u), split.train_ratings(u)) for u in r.users)
    pred = teacher_predict(teacher, builder, split, r.eval_users, "test", tc.eval_history, tc.infer_batch_tokens,
                           r.device)
    metrics = evaluate_predictions(pred, split, "test", seed=r.cfg.seed)
    teacher.backbone.save_pretrained(str(out_dir / "adapter"))
    make_readable(out_dir / "adapter")  # peft writes the weights 0600
    meta = teacher_meta(tc, ds.tasks, ds.n_items, teacher.backbone.config.hidden_size, r.cfg.seed)
    meta.update(data_hash=ds.data_hash, vocab=teacher.inputs.vocab if teacher.inputs is not None else None)
    save_heads(teacher.heads, out_dir, meta, teacher.inputs)
    save_training_stats(out_dir, getattr(teacher, "item_text_records", []), teacher.heads.item_vectors)
    save_test_predictions(out_dir, pred)
    budget["eval_users"] = len(r.eval_users)
    budget["stage_seconds"] = round(r.clock.elapsed(), 2)  # the whole stage, for comparison with time_budget_s
    s = r.state
    report = dict(
        metrics=metrics, stage="test", eval_users=len(r.eval_users), seed=r.cfg.seed, device=str(r.device),
        weighting=tc.weighting, budget=budget,
        cost=dict(build_seconds=r.build_seconds, train_seconds=train_seconds, train_tokens=s.tokens_seen,
                  train_tokens_per_s=s.tokens_seen / max(train_seconds, 1e-9),
                  llm_tokens_per_dataset_token=window_tokens / max(1, dataset_tokens),
                  eval_tokens=pred["tokens"], eval_seconds=pred["seconds"],
                  eval_users_per_s=len(r.eval_users) / max(pred["seconds"], 1e-9)),
        params=dict(total=param_count(teacher.backbone) + param_count(teacher.heads),
                    lora_trainable=sum(p.numel() for p in r.lora_params), heads=param_count(teacher.heads)),
        **extra,
    )
    write_json(out_dir / "metrics.json", report)
    return report
