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

Layout on disk (teacher_cache/): the cached users are cut into shards of teacher.cache_shard_users consecutive users;
shard s is a folder shards/<s:05d>/ holding the per-row arrays above as .npy files (its users and local offsets, and
meta.json with the shard's fingerprint); items.npz holds item_vectors / item_table / item_bias. Every shard is
written whole under a temporary name and renamed, so a shard folder that exists is complete; manifest.json is
written last (by rank 0, after every shard exists), so a cache with a manifest is complete.
- Resuming: a killed run, started again, labels only the shards whose folder is missing or whose fingerprint
  (teacher, data, top-k, head dim, windows, the shard's users) differs.
- Sharding: under `torchrun --nproc_per_node=N -m distillrec cache RUN` (or `accelerate launch -m distillrec cache
  RUN`) rank r labels the shards s with s % N == r; rank 0 waits at a barrier (gloo) and writes the manifest. The
  shard plan never depends on N, so the merged cache holds the same rows as a one-process run: the same positions
  and top-k ids, values equal to float rounding (a shard's inference batches are packed from its own windows, so
  batch shapes, and the last bits of the logits, may differ from another packing; tests check <= 1e-5).
- Reading: `load_cache` concatenates the shards (the arrays the student indexes) when they fit in half the
  available memory, and otherwise memory-maps them (`ShardedRows`), so the student reads only the rows of each batch.
An older cache.npz (one file, no shards) is still read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .common import pick_device, set_seed, stage_dir
from .dist import Dist
from .config import RunConfig
from .data import Split, load_dataset, sample_users
from .io import atomic_path, file_mode, read_json, write_json
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


ROW_FIELDS = ("next_topk_items", "next_topk_logits", "rating", "like_logit", "user_vector")
"""Per-position arrays (one row per labelled position): what a shard holds, besides its users and offsets."""
ITEM_FIELDS = ("item_vectors", "item_table", "item_bias")
"""Per-item arrays, written once (items.npz)."""
BARRIER_TIMEOUT_S = 7 * 24 * 3600.0
"""Ranks that finish their shards wait at a barrier for the slowest one: labelling a 10^7-event log takes hours, and
gloo's 30-minute default would kill the run."""


# ----------------------------------------------------------------------------- the shard plan
@dataclass(frozen=True)
class ShardPlan:
    """Which users each shard labels: consecutive runs of `per_shard` of the (sorted) cached users. A pure function
    of the users and teacher.cache_shard_users, never of the world size."""
    users: np.ndarray
    lengths: np.ndarray
    """Training positions per cached user (its rows)."""
    per_shard: int

    @property
    def n_shards(self) -> int:
        return max(1, -(-len(self.users) // self.per_shard))

    def users_of(self, s: int) -> slice:
        return slice(s * self.per_shard, min(len(self.users), (s + 1) * self.per_shard))

    def owned(self, rank: int, world: int) -> list[int]:
        return [s for s in range(self.n_shards) if s % world == rank]

    def key(self, s: int, common: str) -> str:
        """The shard's fingerprint: the run-wide settings (`common`) and exactly which users it holds."""
        sl = self.users_of(s)
        h = hashlib.sha256(common.encode())
        h.update(np.ascontiguousarray(self.users[sl], dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.lengths[sl], dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def shard_name(s: int) -> str:
    return f"{s:05d}"


def _common_key(teacher_h: str, data_hash: str, K: int, tc) -> str:
    return json.dumps(dict(version=CACHE_VERSION, teacher=teacher_h, data=data_hash, top_k=K, head_dim=tc.head_dim,
                           window=tc.window, context=tc.context), sort_keys=True)


def _shard_done(folder: Path, key: str) -> bool:
    meta = folder / "meta.json"
    if not meta.exists():
        return False
    try:
        m = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return m.get("key") == key and all((folder / f"{f}.npy").exists() for f in ("users", "offsets", *ROW_FIELDS))


def _write_shard(folder: Path, arrays: dict, meta: dict) -> None:
    """Write the shard whole under a temporary name, then rename it into place (a folder that exists is complete)."""
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for k, v in arrays.items():
        np.save(tmp / f"{k}.npy", v)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for p in tmp.iterdir():
        os.chmod(p, file_mode())
    if folder.exists():  # a stale shard (another teacher, other users): replaced
        shutil.rmtree(folder)
    os.rename(tmp, folder)


def _clean_leftovers(shards_dir: Path, plan: ShardPlan) -> None:
    """Temporary folders of killed runs and shards beyond the plan (a former, larger plan)."""
    keep = {shard_name(s) for s in range(plan.n_shards)}
    for p in shards_dir.iterdir() if shards_dir.exists() else []:
        if p.is_dir() and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- labelling
@dataclass
class _Labeller:
    """What labelling a shard needs: the merged teacher, its sequence builder, the split, the settings."""
    teacher: object
    builder: object
    split: Split
    tc: object
    K: int
    device: str

    def encodings(self, users: np.ndarray):
        ds, tc = self.split.ds, self.tc
        examples = window_examples(self.split, users, tc.window, tc.context)
        encs = [self.builder.encode(ds.items[u][c:b], None if ds.ratings is None else ds.ratings[u][c:b])
                for (u, c, a, b) in examples]
        return examples, encs

    def label(self, users: np.ndarray, lengths: np.ndarray, desc: str) -> tuple[dict, int, float]:
        """(arrays of the users' rows, LLM tokens read, seconds)."""
        tc, K = self.tc, self.K
        examples, encs = self.encodings(users)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        row_of = {int(u): int(o) for u, o in zip(users, offsets[:-1])}
        R = int(offsets[-1])
        out_arrays = dict(users=np.asarray(users, dtype=np.int64), offsets=offsets,
                          next_topk_items=np.zeros((R, K), dtype=np.int32),
                          next_topk_logits=np.zeros((R, K), dtype=np.float16),
                          rating=np.zeros(R, dtype=np.float32), like_logit=np.zeros(R, dtype=np.float32),
                          user_vector=np.zeros((R, tc.head_dim), dtype=np.float16))
        tokens, t0 = 0, time.perf_counter()
        for batch in tqdm(token_batches([len(e.ids) for e in encs], tc.infer_batch_tokens), desc=desc, leave=False):
            ids, mask = pad_batch([encs[i].ids for i in batch], self.builder.pad_id)
            h = self.teacher.hidden(ids.to(self.device), mask.to(self.device))
            # every labelled position of the batch through the heads at once: (batch row, token before item j,
            # item j's last token) -> its cache row
            b_row, before, item_end, rows = [], [], [], []
            for row, i in enumerate(batch):
                u, c, a, b = examples[i]
                for k in range(a - c, b - c):
                    b_row.append(row)
                    before.append(encs[i].before[k])
                    item_end.append(encs[i].item_end[k])
                rows.append(row_of[u] + np.arange(a, b))
            r = torch.as_tensor(b_row, device=h.device)
            out = self.teacher.heads(h[r, torch.as_tensor(before, device=h.device)],
                                     h[r, torch.as_tensor(item_end, device=h.device)])
            rows = np.concatenate(rows)
            v, ix = torch.topk(out["next_item"].float(), K, dim=-1)
            out_arrays["next_topk_items"][rows], out_arrays["next_topk_logits"][rows] = ix.cpu().numpy(), v.cpu().numpy()
            out_arrays["user_vector"][rows] = out["user_vector"].float().cpu().numpy()
            if "rating" in out:
                out_arrays["rating"][rows] = out["rating"].float().cpu().numpy()
                out_arrays["like_logit"][rows] = out["like"].float().cpu().numpy()
            tokens += int(mask.sum())
        return out_arrays, tokens, time.perf_counter() - t0


@torch.no_grad()
def build_cache(cfg: RunConfig) -> dict:
    """Label every training position of the cached users, shard by shard (module docstring). Under torchrun /
    accelerate each rank labels its own shards and rank 0 writes the manifest; returns the manifest (rank 0) or a
    record of this rank's shards (other ranks)."""
    run = Path(cfg.run_dir)
    out_dir = stage_dir(run, "teacher_cache")
    shards_dir = out_dir / "shards"
    dist = Dist(pick_device(cfg.device), backend="gloo", timeout_s=BARRIER_TIMEOUT_S)
    device = dist.device
    # no barrier on an error path: a failing rank exits, and the launcher stops the others
    set_seed(cfg.seed)
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    teacher, tok, meta = load_teacher(run / "teacher", merge=True, device=device)
    if meta.get("data_hash") != ds.data_hash:
        raise StaleCacheError(f"the teacher in {run / 'teacher'} was trained on data {meta.get('data_hash')} but "
                              f"the config's data hashes to {ds.data_hash}; run `distillrec teacher` again")
    tc = cfg.teacher
    builder = teacher_builder(teacher, saved_teacher_config(meta), tok, ds.item_text, ds.has_ratings)
    users = sample_users(np.arange(ds.n_users), tc.cache_users, cfg.seed)
    plan = ShardPlan(users=np.asarray(users, dtype=np.int64),
                     lengths=np.asarray([int(split.n_train[u]) for u in users], dtype=np.int64),
                     per_shard=int(tc.cache_shard_users))
    K, t_hash = min(tc.cache_top_k, ds.n_items), teacher_hash(run / "teacher")
    common = _common_key(t_hash, ds.data_hash, K, tc)
    if dist.main:
        (out_dir / "manifest.json").unlink(missing_ok=True)  # the cache is incomplete until the manifest is back
    labeller = _Labeller(teacher, builder, split, tc, K, device)
    owned = plan.owned(dist.rank, dist.world)
    todo = [s for s in owned if not _shard_done(shards_dir / shard_name(s), plan.key(s, common))]
    R = int(plan.lengths.sum())
    rank_tag = f"rank {dist.rank}/{dist.world}: " if dist.world > 1 else ""
    estimate = None
    if todo:
        pending = np.concatenate([plan.users[plan.users_of(s)] for s in todo])
        _, encs = labeller.encodings(pending)
        estimate = _labelling_estimate(run, teacher, encs, builder.pad_id, tc.infer_batch_tokens, device)
        del encs
    print(f"teacher cache: {rank_tag}labelling {R:,} positions of {len(users)} users (teacher.cache_users="
          f"{tc.cache_users}) in {plan.n_shards} shard(s) of <= {plan.per_shard} users; this process: "
          f"{len(owned) - len(todo)} of its {len(owned)} shard(s) already labelled, {len(todo)} to label"
          + (f": {estimate['statement']}" if estimate else ""), flush=True)
    for s in tqdm(todo, desc=f"teacher cache shards{' rank ' + str(dist.rank) if dist.world > 1 else ''}",
                  disable=len(todo) < 2):
        sl = plan.users_of(s)
        arrays, tokens, seconds = labeller.label(plan.users[sl], plan.lengths[sl], f"shard {shard_name(s)}")
        _write_shard(shards_dir / shard_name(s), arrays,
                     dict(shard=s, key=plan.key(s, common), users=int(sl.stop - sl.start),
                          rows=int(arrays["offsets"][-1]), tokens=tokens, seconds=seconds, rank=dist.rank,
                          world_size=dist.world, device=device))
    if dist.main:
        heads = teacher.heads
        with atomic_path(out_dir / "items.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, item_vectors=heads.item_vectors.cpu().numpy().astype(np.float32),
                         item_table=heads.item_table().float().cpu().numpy(),
                         item_bias=heads.item_bias.detach().float().cpu().numpy())
    dist.barrier()  # every shard exists
    if not dist.main:
        dist.close()  # waits until rank 0 has written the manifest: the next stage may read the cache
        return dict(rank=dist.rank, world_size=dist.world, shards=owned, labelled=todo)
    manifest = _write_manifest(out_dir, plan, common, t_hash, ds, tc, K, dist.world, device, estimate, labelled=todo)
    dist.close()
    return manifest


def _write_manifest(out_dir: Path, plan: ShardPlan, common: str, t_hash: str, ds, tc, K: int, world: int,
                    device: str, estimate: Optional[dict], labelled: list) -> dict:
    shards_dir = out_dir / "shards"
    metas = []
    for s in range(plan.n_shards):
        folder = shards_dir / shard_name(s)
        if not _shard_done(folder, plan.key(s, common)):
            raise RuntimeError(f"cache shard {folder} is missing or stale after every rank finished; run "
                               f"`distillrec cache` again (it labels only the missing shards)")
        metas.append(json.loads((folder / "meta.json").read_text()))
    _clean_leftovers(shards_dir, plan)
    (out_dir / "cache.npz").unlink(missing_ok=True)  # the one-file layout of older runs, now replaced
    R = int(plan.lengths.sum())
    tokens, seconds = sum(m["tokens"] for m in metas), sum(m["seconds"] for m in metas)
    manifest = dict(version=CACHE_VERSION, layout="shards", teacher_hash=t_hash, data_hash=ds.data_hash, top_k=K,
                    rows=R, users=len(plan.users), tasks=ds.tasks, user_vector_dim=tc.head_dim,
                    shards=[dict(name=shard_name(m["shard"]), key=m["key"], users=m["users"], rows=m["rows"])
                            for m in metas],
                    shard_users=plan.per_shard, world_size=world,
                    labelling=dict(tokens=tokens, seconds=seconds, interactions=R,
                                   interactions_per_s=R / max(seconds, 1e-9), tokens_per_s=tokens / max(seconds, 1e-9),
                                   process_seconds=seconds, shards_labelled_now=len(labelled),
                                   estimated_seconds=estimate["seconds"] if estimate else None,
                                   estimate_source=estimate["source"] if estimate else None),
                    device=device)
    write_json(out_dir / "manifest.json", manifest)
    return manifest


# ----------------------------------------------------------------------------- reading
class ShardedRows:
    """The per-row array of a sharded cache, memory-mapped shard by shard: `rows[idx]` (idx an int array of any
    shape) gathers those global rows, reading only their pages. Stands in for the concatenated ndarray."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.shape = (int(self.starts[-1]),) + tuple(parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def __getitem__(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        flat = idx.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"cache row out of range [0, {self.shape[0]})")
        shard = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty((flat.size,) + self.shape[1:], dtype=self.dtype)
        for s in np.unique(shard):
            m = shard == s
            out[m] = self.parts[s][flat[m] - self.starts[s]]
        return out.reshape(idx.shape + self.shape[1:])


def available_memory_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo (Linux), else None (unknown: the cache is loaded whole)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_manifest(run_dir: Path, cdir: Path, manifest: dict, data_hash: str) -> None:
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


def load_cache(run_dir: Path, data_hash: str, in_memory: Optional[bool] = None) -> dict:
    """The cache arrays, after checking the manifest against the teacher files and the data.

    `in_memory`: True = the per-row arrays as ndarrays (shards concatenated); False = `ShardedRows` over memory maps;
    None = in memory when they take at most half the available memory."""
    run_dir = Path(run_dir)
    cdir = run_dir / "teacher_cache"
    manifest = read_json(cdir / "manifest.json", "the cache stage (`distillrec cache <run>`)")
    if manifest.get("layout") == "shards":
        _check_manifest(run_dir, cdir, manifest, data_hash)
        arrays = _load_shards(run_dir, cdir, manifest, in_memory)
        arrays["manifest"] = manifest
        return arrays
    if not (cdir / "cache.npz").exists():
        raise FileNotFoundError(f"{cdir / 'cache.npz'} is missing; run `distillrec cache {run_dir}`")
    _check_manifest(run_dir, cdir, manifest, data_hash)
    try:
        with np.load(cdir / "cache.npz") as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zip/pickle errors of a truncated file
        raise StaleCacheError(f"{cdir / 'cache.npz'} is corrupt ({e}); run `distillrec cache {run_dir}`") from e
    arrays["manifest"] = manifest
    return arrays


def _load_shards(run_dir: Path, cdir: Path, manifest: dict, in_memory: Optional[bool]) -> dict:
    fix = f"run `distillrec cache {run_dir}` (it relabels only the missing or damaged shards)"
    parts: dict[str, list] = {f: [] for f in ("users", "offsets", *ROW_FIELDS)}
    for rec in manifest["shards"]:
        folder = cdir / "shards" / rec["name"]
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("key") != rec["key"]:
                raise StaleCacheError(f"cache shard {folder} does not belong to this manifest (fingerprint "
                                      f"{meta.get('key')} != {rec['key']}); {fix}")
            for f in parts:
                a = np.load(folder / f"{f}.npy", mmap_mode="r")
                want = rec["users"] + 1 if f == "offsets" else rec["users"] if f == "users" else rec["rows"]
                if a.shape[0] != want:
                    raise StaleCacheError(f"cache shard {folder / (f + '.npy')} has {a.shape[0]} rows, its manifest "
                                          f"says {want}; {fix}")
                parts[f].append(a)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            if isinstance(e, StaleCacheError):
                raise
            raise StaleCacheError(f"cache shard {folder} is missing or corrupt ({e}); {fix}") from e
    try:
        with np.load(cdir / "items.npz") as z:
            arrays = {k: z[k] for k in ITEM_FIELDS}
    except Exception as e:
        raise StaleCacheError(f"{cdir / 'items.npz'} is missing or corrupt ({e}); {fix}") from e
    arrays["users"] = np.concatenate([np.asarray(u) for u in parts["users"]])
    starts = np.cumsum([0] + [int(o[-1]) for o in parts["offsets"]])
    arrays["offsets"] = np.concatenate([np.asarray(o[:-1]) + s for o, s in zip(parts["offsets"], starts[:-1])]
                                       + [[starts[-1]]]).astype(np.int64)
    if in_memory is None:
        avail = available_memory_bytes()
        in_memory = avail is None or sum(p.nbytes for f in ROW_FIELDS for p in parts[f]) <= avail // 2
    for f in ROW_FIELDS:
        arrays[f] = np.concatenate([np.asarray(p) for p in parts[f]]) if in_memory else ShardedRows(parts[f])
    return arrays
