"""Protocol evaluation shared by every system: build the requests, score, compute metrics with CIs."""
from __future__ import annotations

import numpy as np

from . import metrics as M
from .data import Split


def left_pad(histories, L: int):
    """(items int64 [U, L], ratings float32 [U, L], length int64 [U]) from (items, ratings-or-None) pairs,
    right-aligned so the most recent interaction is last."""
    items = np.zeros((len(histories), L), dtype=np.int64)
    ratings = np.zeros((len(histories), L), dtype=np.float32)
    length = np.zeros(len(histories), dtype=np.int64)
    for row, (h_items, h_ratings) in enumerate(histories):
        n = len(h_items)
        length[row] = n
        if n:
            items[row, L - n:] = h_items
            if h_ratings is not None:
                ratings[row, L - n:] = h_ratings
    return items, ratings, length


def history_arrays(split: Split, users, stage: str, max_len: int):
    """Left-padded (items, ratings, length) of the last `max_len` interactions before each user's `stage`
    target, plus the targets as candidates [U, 1]."""
    users = np.asarray(users)
    hist = [split.history(u, stage, max_len) for u in users]
    items, ratings, length = left_pad(hist, max(1, max(len(h[0]) for h in hist)))
    targets, _ = split.targets(users, stage)
    return items, ratings, length, targets[:, None]


def evaluate_predictions(pred: dict, split: Split, stage: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """pred: users, scores [U, N], and (with ratings) rating [U], like_logit [U]."""
    users = pred["users"]
    targets, true_r = split.targets(users, stage)
    kw = dict(next_scores=pred["scores"], next_targets=targets, seen=[split.seen(u, stage) for u in users],
              n_boot=n_boot, seed=seed)
    if true_r is not None and "rating" in pred:
        kw.update(rating_pred=pred["rating"], rating_true=true_r, like_logit=pred["like_logit"],
                  like_true=true_r >= split.ds.like_threshold)
    return M.evaluate(**kw)


def subset(pred: dict, users) -> dict:
    """Rows of `pred` for `users` (a subset of pred['users'])."""
    pos = {int(u): i for i, u in enumerate(pred["users"])}
    missing = [int(u) for u in users if int(u) not in pos]
    if missing:
        raise ValueError(f"{len(missing)} users have no prediction (e.g. {missing[:3]})")
    rows = np.array([pos[int(u)] for u in users])
    return {k: (v[rows] if isinstance(v, np.ndarray) and v.ndim and len(v) == len(pred["users"]) else v)
            for k, v in pred.items()}
