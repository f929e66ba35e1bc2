"""Quality metrics of the evaluation protocol (docs/protocol.md), in pure numpy.

Conventions
- Every task contributes one test point per user; arrays are aligned by user (row u = user u).
- next_item ranks the WHOLE catalog. Items in `seen` (the user's earlier history) are excluded,
  except the target itself: a re-consumed item is a legitimate next event, so masking it would make
  the event unrankable.
- Ties are resolved in expectation: with g = non-excluded items scoring strictly higher than the
  target and t = other non-excluded items scoring equal to it, the target's rank is uniform on
  g+1 .. g+t+1 and each metric is its exact expectation under that distribution. A constant scorer
  therefore gets the value of a random ranking, never a lucky or unlucky tie-break.
- like predictions are logits; a positive prediction means probability > 0.5 (logit > 0).
- Confidence intervals are percentile bootstraps over users. A resample is represented by a row of
  multiplicities (how often each user was drawn), so a statistic is a function of a [B, n] weight
  matrix and B resamples are evaluated at once.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

TASKS = ("next_item", "rating", "like")
_MAX_WEIGHT_CELLS = 1 << 22  # bootstrap weight matrices are built in chunks of at most this many cells


# ----------------------------------------------------------------------------- input checks
def _no_nan(name: str, x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if np.isnan(a).any():
        raise ValueError(f"{name} contains {int(np.isnan(a).sum())} NaN value(s); a model produced invalid outputs")
    return a


def _labels(name: str, y) -> np.ndarray:
    """Binary labels given as bool or 0/1 numbers -> bool array."""
    a = np.asarray(y)
    if a.dtype != bool and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must be bool or 0/1, got values {np.unique(a)[:5].tolist()}")
    return a.astype(bool)


def _same_length(**arrays) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have one entry per user, got lengths {lengths}")
    return next(iter(lengths.values()))


# ----------------------------------------------------------------------------- next_item
def _excluded_mask(seen: Sequence[np.ndarray], targets: np.ndarray, n_items: int) -> np.ndarray:
    """Bool [U, N]: True = not rankable (earlier history), with every user's target forced back in."""
    mask = np.zeros((len(targets), n_items), dtype=bool)
    cols = [np.asarray(s, dtype=np.int64).ravel() for s in seen]
    flat = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n_items):
        raise ValueError(f"seen holds item ids outside [0, {n_items})")
    rows = np.repeat(np.arange(len(targets)), [c.size for c in cols])
    mask[rows, flat] = True
    mask[np.arange(len(targets)), targets] = False
    return mask


def _prefix(k: int, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """C[r] = sum of gain(rank) over ranks 1..r, for r = 0..k."""
    return np.concatenate([[0.0], np.cumsum(gain(np.arange(1, k + 1, dtype=np.float64)))])


def ranking_metrics(scores, targets, seen: Optional[Sequence[np.ndarray]] = None,
                    ks: Sequence[int] = (10, 20)) -> dict[str, np.ndarray]:
    """Per-user HR@K, NDCG@K, MRR@K for full-catalog scores [U, N] and target items [U].

    `seen[u]` lists the items excluded from user u's ranking (the target never is). Ties count in
    expectation (module docstring): the rank is uniform on g+1..g+t+1, so e.g.
    HR@K = |{g+1..g+t+1} ∩ {1..K}| / (t+1).
    """
    s = _no_nan("scores", scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be [users, items], got shape {s.shape}")
    u_count, n_items = s.shape
    tgt = np.asarray(targets, dtype=np.int64)
    if tgt.shape != (u_count,):
        raise ValueError(f"targets must have one item per user ({u_count}), got shape {tgt.shape}")
    if u_count and (tgt.min() < 0 or tgt.max() >= n_items):
        raise ValueError(f"targets hold item ids outside [0, {n_items})")
    if seen is not None and len(seen) != u_count:
        raise ValueError(f"seen must have one entry per user ({u_count}), got {len(seen)}")

    target_score = s[np.arange(u_count), tgt][:, None]
    rankable = ~_excluded_mask(seen, tgt, n_items) if seen is not None else np.ones_like(s, dtype=bool)
    higher = ((s > target_score) & rankable).sum(axis=1)
    ties = ((s == target_score) & rankable).sum(axis=1) - 1  # the target equals itself
    out = {}
    for k in ks:
        lo, hi = np.minimum(higher, k), np.minimum(higher + ties + 1, k)
        for name, gain in (("HR", np.ones_like), ("NDCG", lambda r: 1.0 / np.log2(r + 1.0)), ("MRR", np.reciprocal)):
            c = _prefix(k, gain)
            out[f"{name}@{k}"] = (c[hi] - c[lo]) / (ties + 1)
    return out


# ----------------------------------------------------------------------------- pointwise
def rmse(pred, true) -> float:
    return float(np.sqrt(np.mean((_no_nan("rating_pred", pred) - np.asarray(true, np.float64)) ** 2)))


def mae(pred, true) -> float:
    return float(np.mean(np.abs(_no_nan("rating_pred", pred) - np.asarray(true, np.float64))))


def _logloss_terms(like_logit, like_true) -> np.ndarray:
    """Per-point BCE from logits: softplus(z) - y*z, computed without overflow."""
    z = _no_nan("like_logit", like_logit)
    y = _labels("like_true", like_true)
    return np.logaddexp(0.0, z) - y * z


def logloss(like_logit, like_true) -> float:
    """Mean binary cross-entropy of logits against bool/0-1 labels."""
    return float(np.mean(_logloss_terms(like_logit, like_true)))


def _auc_weighted(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of each weight row (a resample): P(pos > neg) + 0.5 P(pos == neg) over weighted pairs.

    With unit weights this is the Mann-Whitney U / (n_pos * n_neg) with average ranks for ties.
    Rows without both classes give NaN.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # one group per distinct score
    w = weights[:, order]
    pos = np.add.reduceat(w * labels[order], starts, axis=1)
    neg = np.add.reduceat(w * ~labels[order], starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    denom = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, wins / denom, np.nan)


def auc(like_logit, like_true) -> float:
    """ROC AUC (Mann-Whitney, ties count 1/2). ValueError when only one class is present."""
    z = _no_nan("like_logit", like_logit)
    y = _labels("like_true", like_true)
    if y.all() or not y.any():
        raise ValueError("AUC needs both positive and negative labels; like_true holds only one class")
    return float(_auc_weighted(z, y, np.ones((1, len(z))))[0])


def _f1_weighted(pred: np.ndarray, true: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN) per weight row; 0 when there is nothing to find and nothing found."""
    tp = weights @ (pred & true)
    fp = weights @ (pred & ~true)
    fn = weights @ (~pred & true)
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)


def f1(like_logit, like_true) -> float:
    """F1 of the positive class, predicting 'like' when the probability exceeds 0.5 (logit > 0)."""
    z = _no_nan("like_logit", like_logit)
    return float(_f1_weighted(z > 0, _labels("like_true", like_true), np.ones((1, len(z))))[0])


# ----------------------------------------------------------------------------- bootstrap
def bootstrap_weights(n: int, n_boot: int, seed: int):
    """Yield [b, n] chunks of multiplicities: row = how often each user is drawn in one resample."""
    rng = np.random.default_rng(seed)
    step = max(1, _MAX_WEIGHT_CELLS // max(1, n))
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def mean_stat(values) -> Callable[[np.ndarray], np.ndarray]:
    """The statistic 'mean of per-user values' in the weight form that bootstrap_ci expects."""
    v = np.asarray(values, dtype=np.float64)
    return lambda w: w @ v / len(v)


def bootstrap_ci(per_user_fn: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of a statistic over users resampled with replacement.

    `per_user_fn(w)` gets a [B, n] matrix of user multiplicities (each row sums to n; all-ones rows
    give the point estimate) and returns the B statistics, e.g. `mean_stat(per_user_values)`.
    Deterministic for a given seed; resamples where the statistic is undefined (NaN) are skipped.
    """
    if n < 1:
        raise ValueError("bootstrap needs at least one user")
    stats = np.concatenate([per_user_fn(w) for w in bootstrap_weights(n, n_boot, seed)])
    if np.isnan(stats).all():
        return float("nan"), float("nan")
    lo, hi = np.nanpercentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def mean_ci(values, n_boot: int = 1000, seed: int = 0, digits: int = 4) -> dict:
    """{"mean", "ci95": [lo, hi]} of per-user (per-event) values, rounded to `digits`: a report's cell."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(mean_stat(v), len(v), n_boot, seed)
    return dict(mean=round(float(v.mean()), digits), ci95=[round(lo, digits), round(hi, digits)])


def _with_ci(fn: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int, seed: int) -> dict:
    value = float(fn(np.ones((1, n)))[0])
    return {"value": value, "ci": list(bootstrap_ci(fn, n, n_boot=n_boot, seed=seed))}


# ----------------------------------------------------------------------------- evaluate
def _next_item_block(next_scores, next_targets, seen, ks, n_boot, seed, per_user=None) -> dict:
    if per_user is None:
        per_user = ranking_metrics(next_scores, next_targets, seen=seen, ks=ks)
    return {k: _with_ci(mean_stat(v), len(v), n_boot, seed) for k, v in per_user.items()}


def _rating_block(rating_pred, rating_true, n_boot, seed) -> dict:
    err = _no_nan("rating_pred", rating_pred) - _no_nan("rating_true", rating_true)
    sq, ab = mean_stat(err ** 2), mean_stat(np.abs(err))
    n = len(err)
    return {"RMSE": _with_ci(lambda w: np.sqrt(sq(w)), n, n_boot, seed), "MAE": _with_ci(ab, n, n_boot, seed)}


def _like_block(like_logit, like_true, n_boot, seed) -> dict:
    z, y = _no_nan("like_logit", like_logit), _labels("like_true", like_true)
    auc(z, y)  # raises on a single class
    n = len(z)
    return {"AUC": _with_ci(lambda w: _auc_weighted(z, y, w), n, n_boot, seed),
            "LogLoss": _with_ci(mean_stat(_logloss_terms(z, y)), n, n_boot, seed),
            "F1": _with_ci(lambda w: _f1_weighted(z > 0, y, w), n, n_boot, seed)}


def evaluate(*, next_scores=None, next_targets=None, seen=None, rating_pred=None, rating_true=None,
             like_logit=None, like_true=None, ks: Sequence[int] = (10, 20), n_boot: int = 1000,
             seed: int = 0, next_per_user: Optional[dict] = None) -> dict:
    """Metrics with 95% bootstrap CIs for each task whose PREDICTION is given (its truth is then required;
    a truth without a prediction is ignored). All tasks must cover the same users in the same order;
    one resampling of users (seeded) is shared by every metric.

    `next_per_user` instead of next_scores: the per-user arrays ranking_metrics returns (for the same `ks`), e.g.
    computed chunk by chunk when the [users, items] scores would not fit in memory; the result is the same."""
    if next_per_user is not None:
        if next_scores is not None:
            raise ValueError("give next_scores or next_per_user, not both")
        missing = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG", "MRR") if f"{m}@{k}" not in next_per_user]
        if missing:
            raise ValueError(f"next_per_user lacks {missing}: compute ranking_metrics with ks={tuple(ks)}")
        next_scores = next(iter(next_per_user.values()))  # stands in for the length checks below
    given = {"next_item": (next_scores, next_targets), "rating": (rating_pred, rating_true),
             "like": (like_logit, like_true)}
    tasks = [t for t, (pred, _) in given.items() if pred is not None]
    for t in tasks:
        if given[t][1] is None:
            raise ValueError(f"task {t}: predictions given without the true labels")
    if not tasks:
        raise ValueError("evaluate needs at least one task's predictions")
    n = _same_length(**{t: given[t][1] for t in tasks}, **{f"{t} predictions": given[t][0] for t in tasks})
    out: dict = {}
    if "next_item" in tasks:
        out["next_item"] = _next_item_block(next_scores, next_targets, seen, ks, n_boot, seed, per_user=next_per_user)
    if "rating" in tasks:
        out["rating"] = _rating_block(rating_pred, rating_true, n_boot, seed)
    if "like" in tasks:
        out["like"] = _like_block(like_logit, like_true, n_boot, seed)
    out["n_users"] = n
    out["bootstrap"] = {"n_boot": n_boot, "seed": seed, "alpha": 0.05, "unit": "user"}
    return out


# ----------------------------------------------------------------------------- report
def _cell(entry) -> str:
    if entry is None:
        return "–"
    if not isinstance(entry, dict):
        return f"{float(entry):.4f}"
    text = f"{entry['value']:.4f}"
    if "std" in entry:  # a seed-averaged entry (distill.ablation.aggregate_seeds): mean ± std
        text += f" ± {entry['std']:.4f}"
    ci = entry.get("ci")
    if ci is not None and all(isinstance(c, (int, float)) and np.isfinite(c) for c in ci):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def format_metrics_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per system, a 'task/metric' column for every metric any row has
    (tasks in TASKS order), cells 'value [lo, hi]' ('mean ± std [lo, hi]' for seed-averaged entries), '–' where
    a system lacks the metric."""
    columns: list[tuple[str, str]] = []
    for task in TASKS:
        for metrics in rows.values():
            columns += [(task, m) for m in metrics.get(task, {}) if (task, m) not in columns]
    header = "| system | " + " | ".join(f"{t}/{m}" for t, m in columns) + " |"
    rule = "| --- |" + " --- |" * len(columns)
    lines = [header, rule]
    for name, metrics in rows.items():
        cells = [_cell(metrics.get(t, {}).get(m)) for t, m in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
