"""Reading a teacher on the protocol: one pass per user over its history + the target, and what is saved of it.

Used by the teacher stage (validation, the final evaluation), by `init_from` (shipped.py, which evaluates an
adopted teacher in this run) and by the export's reference check. Nothing here trains.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Split
from .windows import index_pairs, pad_batch, token_batches


def eval_encodings(builder, split: Split, users: np.ndarray, stage: str, history_len: int) -> list:
    """Per user: [last `history_len` history + the stage's target item] encoded with the target left open."""
    encs = []
    for u in users:
        h_items, h_ratings = split.history(u, stage, history_len)
        tgt, _ = split.target(u, stage)
        items = np.append(h_items, tgt)
        ratings = None if h_ratings is None else np.append(h_ratings, 0.0)
        encs.append(builder.encode(items, ratings, open_last=True))
    return encs


def eval_tokens(builder, split: Split, users: np.ndarray, stage: str, history_len: int) -> int:
    """LLM tokens `teacher_predict` will process for these users (the cost estimate of an evaluation)."""
    return sum(len(e.ids) for e in eval_encodings(builder, split, users, stage, history_len))


@torch.no_grad()
def teacher_predict(teacher, builder, split: Split, users: np.ndarray, stage: str,
                    history_len: int, budget: int, device, desc="teacher eval") -> dict:
    """One pass per user over [last `history_len` history + the target item's text]: next_item scores
    (read before the target), rating and like logit (read at the end of the target's text)."""
    encs = eval_encodings(builder, split, users, stage, history_len)
    n = len(users)
    scores = np.zeros((n, split.ds.n_items), dtype=np.float32)
    rating = np.zeros(n, dtype=np.float32)
    like = np.zeros(n, dtype=np.float32)
    tokens = 0
    t0 = time.perf_counter()
    for batch in tqdm(token_batches([len(e.ids) for e in encs], budget), desc=desc, leave=False):
        ids, mask = pad_batch([encs[i].ids for i in batch], builder.pad_id)
        rows = list(range(len(batch)))
        before = index_pairs(rows, [encs[i].before[-1] for i in batch], device)
        item = index_pairs(rows, [encs[i].item_end[-1] for i in batch], device)
        out = teacher(ids.to(device), mask.to(device), before, item)
        scores[batch] = out["next_item"].float().cpu().numpy()
        if "rating" in out:
            rating[batch] = out["rating"].float().cpu().numpy()
            like[batch] = out["like"].float().cpu().numpy()
        tokens += int(mask.sum())
    seconds = time.perf_counter() - t0
    return dict(users=np.asarray(users), scores=scores, rating=rating, like_logit=like, tokens=tokens, seconds=seconds)


def validation_ndcg(teacher, builder, split: Split, users: np.ndarray, history_len: int, budget: int,
                    device) -> float:
    """Mean NDCG@10 on the protocol's validation targets (the test split is never read)."""
    from . import metrics as M
    was_training = teacher.training
    teacher.eval()
    pred = teacher_predict(teacher, builder, split, users, "val", history_len, budget, device, desc="teacher val")
    teacher.train(was_training)
    targets, _ = split.targets(users, "val")
    return float(M.ranking_metrics(pred["scores"], targets, [split.seen(u, "val") for u in users],
                                   ks=(10,))["NDCG@10"].mean())


def save_test_predictions(out_dir: Path, pred: dict) -> None:
    """teacher/test_predictions.npz (atomic): the evaluated users' scores, reused by the ablation and the bench."""
    from .io import atomic_path
    with atomic_path(Path(out_dir) / "test_predictions.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, users=pred["users"], scores=pred["scores"], rating=pred["rating"], like_logit=pred["like_logit"])
