"""Teacher cache: the teacher's soft labels for every training position, computed ONCE.

Rows are TARGET-aligned: row (user u, position j) holds what the teacher says about item j of u's
training part, which is exactly what the student predicts from its state before item j:
  next_topk_items / next_topk_logits  [R, K]  teacher's top-K next_item logits read before item j
  rating, like_logit                  [R]     teacher's rating / like logit for item j
  user_vector                         [R, d]  (fp16) projected teacher user state before item j; with
                                              item_table [N, d] + item_bias [N] it rebuilds the teacher's
                                              full-catalog logits: user_vector @ item_table.T + item_bias
Plus item_vectors [N, H] (the LLM's standardised item-text vectors, the student's frozen text table).
`offsets[i]` is the first row of users[i]; users not in `users` have no soft labels.
manifest.json records the teacher hash and the data hash; a mismatch makes the cache stale.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .common import pick_device, set_seed, stage_dir
from .config import RunConfig
from .data import Split, load_dataset, sample_users
from .io import atomic_path, read_json, write_json
from .budget import cost_statement, forward_throughput
from .teacher import load_teacher, saved_teacher_config, teacher_builder
from .windows import pad_batch, token_batches, window_examples

CACHE_VERSION = 1


class StaleCacheError(RuntimeError):
    pass


def teacher_hash(teacher_dir: Path) -> str:
    h = hashlib.sha256()
    for f in ("heads.safetensors", "inputs.safetensors", "adapter/adapter_model.safetensors"):
        p = Path(teacher_dir) / f
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _labelling_estimate(run: Path, teacher, encs, pad_id: int, budget_tokens: int, device) -> dict:
    """What labelling will cost, stated before it starts: its exact token count at the teacher's measured
    inference throughput (the teacher stage's evaluation in teacher/metrics.json, else a probe batch here).
    The cache has no time budget: every position of the cached users must be labelled, so it says what that
    costs (lower teacher.cache_users to pay less)."""
    tokens = sum(len(e.ids) for e in encs)
    cost = {}
    if (run / "teacher" / "metrics.json").exists():
        cost = read_json(run / "teacher" / "metrics.json", "the teacher stage").get("cost", {})
    if cost.get("eval_tokens") and cost.get("eval_seconds"):
        tps, source = cost["eval_tokens"] / cost["eval_seconds"], "the teacher's evaluation throughput"
    else:
        tps, source = forward_throughput(teacher, [e.ids for e in encs], pad_id, budget_tokens, device), "probe batch"
    return dict(tokens=tokens, tokens_per_s=tps, seconds=round(tokens / max(tps, 1e-9), 1), source=source,
                statement=cost_statement("labelling", tokens, tps, source))


@torch.no_grad()
def build_cache(cfg: RunConfig) -> dict:
    run = Path(cfg.run_dir)
    out_dir = stage_dir(run, "teacher_cache")
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    teacher, tok, meta = load_teacher(run / "teacher", merge=True, device=device)
    if meta.get("data_hash") != ds.data_hash:
        raise StaleCacheError(f"the teacher in {run / 'teacher'} was trained on data {meta.get('data_hash')} but the "
                              f"config's data hashes to {ds.data_hash}; run `distillrec teacher` again")
    tc = cfg.teacher
    builder = teacher_builder(teacher, saved_teacher_config(meta), tok, ds.item_text, ds.has_ratings)
    users = sample_users(np.arange(ds.n_users), tc.cache_users, cfg.seed)
    examples = window_examples(split, users, tc.window, tc.context)
    lengths = [int(split.n_train[u]) for u in users]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    row_of = {int(u): int(o) for u, o in zip(users, offsets[:-1])}
    R, K = int(offsets[-1]), min(tc.cache_top_k, ds.n_items)
    top_items = np.zeros((R, K), dtype=np.int32)
    top_logits = np.zeros((R, K), dtype=np.float16)
    rating = np.zeros(R, dtype=np.float32)
    like = np.zeros(R, dtype=np.float32)
    user_vec = np.zeros((R, tc.head_dim), dtype=np.float16)
    encs = [builder.encode(ds.items[u][c:b], None if ds.ratings is None else ds.ratings[u][c:b])
            for (u, c, a, b) in examples]
    estimate = _labelling_estimate(run, teacher, encs, builder.pad_id, tc.infer_batch_tokens, device)
    print(f"teacher cache: labelling {R:,} positions of {len(users)} users (teacher.cache_users="
          f"{tc.cache_users}): {estimate['statement']}", flush=True)
    tokens, t0 = 0, time.perf_counter()
    for batch in tqdm(token_batches([len(e.ids) for e in encs], tc.infer_batch_tokens), desc="teacher cache"):
        ids, mask = pad_batch([encs[i].ids for i in batch], builder.pad_id)
        h = teacher.hidden(ids.to(device), mask.to(device))
        for row, i in enumerate(batch):
            u, c, a, b = examples[i]
            loc = np.arange(a, b) - c
            out = teacher.heads(h[row, [encs[i].before[k] for k in loc]], h[row, [encs[i].item_end[k] for k in loc]])
            rows = row_of[u] + np.arange(a, b)
            v, ix = torch.topk(out["next_item"].float(), K, dim=-1)
            top_items[rows], top_logits[rows] = ix.cpu().numpy(), v.cpu().numpy()
            user_vec[rows] = out["user_vector"].float().cpu().numpy()
            if "rating" in out:
                rating[rows] = out["rating"].float().cpu().numpy()
                like[rows] = out["like"].float().cpu().numpy()
        tokens += int(mask.sum())
    seconds = time.perf_counter() - t0
    heads = teacher.heads
    arrays = dict(users=np.asarray(users, dtype=np.int64), offsets=offsets, next_topk_items=top_items,
                  next_topk_logits=top_logits, rating=rating, like_logit=like, user_vector=user_vec,
                  item_vectors=heads.item_vectors.cpu().numpy().astype(np.float32),
                  item_table=heads.item_table().float().cpu().numpy(),
                  item_bias=heads.item_bias.detach().float().cpu().numpy())
    with atomic_path(out_dir / "cache.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    manifest = dict(version=CACHE_VERSION, teacher_hash=teacher_hash(run / "teacher"), data_hash=ds.data_hash,
                    top_k=K, rows=R, users=len(users), tasks=ds.tasks, user_vector_dim=tc.head_dim,
                    labelling=dict(tokens=tokens, seconds=seconds, interactions=R,
                                   interactions_per_s=R / max(seconds, 1e-9), tokens_per_s=tokens / max(seconds, 1e-9),
                                   estimated_seconds=estimate["seconds"], estimate_source=estimate["source"]),
                    device=device)
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def load_cache(run_dir: Path, data_hash: str) -> dict:
    """The cache arrays, after checking the manifest against the teacher files and the data."""
    run_dir = Path(run_dir)
    cdir = run_dir / "teacher_cache"
    manifest = read_json(cdir / "manifest.json", "the cache stage (`distillrec cache <run>`)")
    if not (cdir / "cache.npz").exists():
        raise FileNotFoundError(f"{cdir / 'cache.npz'} is missing; run `distillrec cache {run_dir}`")
    if manifest.get("version") != CACHE_VERSION:
        raise StaleCacheError(f"{cdir} has cache version {manifest.get('version')}, expected {CACHE_VERSION}; "
                              f"run `distillrec cache {run_dir}`")
    if manifest["data_hash"] != data_hash:
        raise StaleCacheError(f"teacher cache in {cdir} was built on data {manifest['data_hash']}, the config's data is "
                              f"{data_hash}; run `distillrec teacher {run_dir}` then `distillrec cache {run_dir}`")
    current = teacher_hash(run_dir / "teacher")
    if manifest["teacher_hash"] != current:
        raise StaleCacheError(f"teacher cache in {cdir} is stale: the teacher changed since it was built "
                              f"({manifest['teacher_hash']} != {current}); run `distillrec cache {run_dir}`")
    try:
        with np.load(cdir / "cache.npz") as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zip/pickle errors of a truncated file
        raise StaleCacheError(f"{cdir / 'cache.npz'} is corrupt ({e}); run `distillrec cache {run_dir}`") from e
    arrays["manifest"] = manifest
    return arrays
