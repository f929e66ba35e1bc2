"""Non-learned baselines of the evaluation protocol: popularity (next_item) and global / user / item
means (rating and like), reported in the same table as the teacher and the students.

Every baseline for a stage is estimated only from interactions strictly before that stage's targets:
all users' training parts, plus every user's validation event when stage == "test". The user mean
uses that user's history before the target (split.history), which is the same data restricted to
the user. An item or user without data falls back to the global value.
"""
from __future__ import annotations

import numpy as np

from .data import Split
from .metrics import evaluate

BASELINES = ("popularity", "global_mean", "user_mean", "item_mean")
LIKE_CLIP = 1e-4
"""Like rates are clipped to [1e-4, 1 - 1e-4] before the logit, so 0% / 100% items stay finite."""


def _check(split: Split, stage: str, users) -> np.ndarray:
    if stage not in ("val", "test"):
        raise ValueError(f"stage must be 'val' or 'test', got {stage!r}")
    users = np.asarray(users, dtype=np.int64)
    missing = np.setdiff1d(users, split.eval_users)
    if missing.size:
        raise ValueError(f"users {missing[:5].tolist()} have no {stage} event (fewer than 3 interactions)")
    return users


def _known_end(split: Split, u: int, stage: str) -> int:
    """How many of user u's interactions lie before the stage's targets: the training part, plus the
    validation event for test (users without eval events only have a training part)."""
    has_val = stage == "test" and split.n_train[u] < len(split.ds.items[u])
    return int(split.n_train[u]) + int(has_val)


def _known_events(split: Split, stage: str):
    """(items, ratings) of every interaction strictly before the stage's targets, all users together."""
    ends = [_known_end(split, u, stage) for u in range(split.ds.n_users)]
    items = np.concatenate([split.ds.items[u][:e] for u, e in enumerate(ends)])
    ratings = np.concatenate([split.ds.ratings[u][:e] for u, e in enumerate(ends)]).astype(np.float64)
    return items, ratings


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), LIKE_CLIP, 1 - LIKE_CLIP)
    return np.log(p) - np.log1p(-p)


def _means(values: np.ndarray, items: np.ndarray, n_items: int, fallback: float) -> np.ndarray:
    """Per-item mean of `values`; items without data get `fallback`."""
    count = np.bincount(items, minlength=n_items)
    total = np.bincount(items, weights=values, minlength=n_items)
    return np.where(count > 0, total / np.maximum(count, 1), fallback)


def popularity_scores(split: Split, stage: str) -> np.ndarray:
    """[N] interaction counts over the data known before the stage's targets."""
    return split.train_item_counts(include_val=stage == "test").astype(np.float64)


def _mean_predictions(split: Split, stage: str, users: np.ndarray, target_items: np.ndarray) -> dict:
    """rating_pred / like_logit of global_mean, user_mean and item_mean for the users' targets."""
    items, ratings = _known_events(split, stage)
    liked = (ratings >= split.ds.like_threshold).astype(np.float64)
    g_rating, g_like = float(ratings.mean()), float(liked.mean())
    item_rating = _means(ratings, items, split.ds.n_items, g_rating)[target_items]
    item_like = _means(liked, items, split.ds.n_items, g_like)[target_items]
    user_rating, user_like = np.empty(len(users)), np.empty(len(users))
    for row, u in enumerate(users):
        r = split.history(int(u), stage)[1].astype(np.float64)
        user_rating[row] = r.mean() if r.size else g_rating
        user_like[row] = (r >= split.ds.like_threshold).mean() if r.size else g_like
    n = len(users)
    return {"global_mean": (np.full(n, g_rating), np.full(n, g_like)),
            "user_mean": (user_rating, user_like),
            "item_mean": (item_rating, item_like)}


def baseline_predictions(split: Split, stage: str, users) -> dict[str, dict]:
    """{name: dict(next_scores, rating_pred, like_logit)} for `users` (rows in that order); a task a
    baseline does not predict is None. Without ratings only popularity is returned."""
    users = _check(split, stage, users)
    pop = popularity_scores(split, stage)
    out = {"popularity": dict(next_scores=np.tile(pop, (len(users), 1)), rating_pred=None, like_logit=None)}
    if split.ds.has_ratings:
        target_items, _ = split.targets(users, stage)
        for name, (rating, like) in _mean_predictions(split, stage, users, target_items).items():
            out[name] = dict(next_scores=None, rating_pred=rating, like_logit=_logit(like))
    return out


def evaluate_baselines(split: Split, stage: str, users, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """{name: metrics.evaluate(...) result} under the protocol's masking (split.seen) and targets."""
    users = _check(split, stage, users)
    target_items, target_ratings = split.targets(users, stage)
    truth = dict(next_targets=target_items, seen=[split.seen(int(u), stage) for u in users])
    if target_ratings is not None:
        truth.update(rating_true=target_ratings, like_true=target_ratings >= split.ds.like_threshold)
    return {name: evaluate(**preds, **truth, n_boot=n_boot, seed=seed)
            for name, preds in baseline_predictions(split, stage, users).items()}
