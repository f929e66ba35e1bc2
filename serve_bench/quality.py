"""Quality beside accuracy: what each system recommends (catalog coverage, popularity bias of its top-K) and
whether it beats the non-learned baselines.

Catalog statistics of a system's top-K lists on a set of users (history items excluded, as served):
  coverage              distinct items recommended / catalog size
  mean_pop_percentile   mean popularity percentile of the recommended items (one count per recommendation).
                        An item's percentile is its mid-rank in the catalog by training interactions:
                        100 * (items with fewer + half the other items with as many) / catalog size, so
                        the catalog's own mean is 50; 100 = only the most popular items
  mean_train_count      mean training interactions of the recommended items, beside the catalog's mean
                        (`popularity_lift` = their ratio: 1 = no bias towards popular items)
"Training interactions" = every interaction known before the test targets (the popularity baseline's counts).

The baseline check compares every system's NDCG@10 (higher is better), rating RMSE (lower) and like AUC
(higher) with the best baseline on the same users; a system worse than it is flagged in the report's
first lines.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

BASELINE_CHECKS = (("next_item", "NDCG@10", "higher"), ("rating", "RMSE", "lower"), ("like", "AUC", "higher"))
"""(task, metric, which direction is better) compared with the best baseline having that metric."""


# ---------------------------------------------------------------------------------------------- top-K lists
def top_k_lists(scores: np.ndarray, seen: Sequence[np.ndarray], k: int) -> np.ndarray:
    """[U, k] item ids of each row's k best-scored items outside `seen[u]` (ties: lower id first)."""
    s = np.array(scores, dtype=np.float32, copy=True)
    if s.ndim != 2 or len(seen) != s.shape[0]:
        raise ValueError(f"scores must be [users, items] with one seen-list per user, got {s.shape} and {len(seen)}")
    for row, items in enumerate(seen):
        s[row, np.asarray(items, dtype=np.int64)] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def popularity_percentile(counts: np.ndarray) -> np.ndarray:
    """[N] mid-rank percentile of each item by count (module docstring); the catalog's mean is exactly 50."""
    counts = np.asarray(counts)
    n = counts.size
    sorted_counts = np.sort(counts)
    below = np.searchsorted(sorted_counts, counts, side="left")
    equal = np.searchsorted(sorted_counts, counts, side="right") - below
    return 100.0 * (below + 0.5 * equal) / n


def catalog_stats(top: np.ndarray, counts: np.ndarray) -> dict:
    """Coverage and popularity bias of top-K lists `top` [U, k] over a catalog with training counts [N]."""
    top = np.asarray(top, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.float64)
    n_items = counts.size
    distinct = int(np.unique(top).size)
    pct = popularity_percentile(counts)
    rec_count = float(counts[top].mean())
    catalog_count = float(counts.mean())
    return dict(users=int(top.shape[0]), k=int(top.shape[1]), distinct_items=distinct, catalog_items=n_items,
                coverage=distinct / n_items, mean_pop_percentile=float(pct[top].mean()),
                mean_train_count=rec_count, catalog_mean_train_count=catalog_count,
                popularity_lift=rec_count / catalog_count if catalog_count else None)


def catalog_table(preds: dict, users: np.ndarray, seen_of, counts: np.ndarray, k: int, chunk: int = 1024) -> dict:
    """{system: catalog_stats} on `users` for every prediction dict (users, scores) that covers them.

    seen_of(u) = the items excluded from user u's list. A prediction missing some of `users` is skipped.
    Lists are built `chunk` users at a time (one [chunk, N] copy of the scores at once)."""
    users = np.asarray(users)
    seen = [seen_of(int(u)) for u in users]
    out = {}
    for name, pred in preds.items():
        pos = {int(u): i for i, u in enumerate(pred["users"])}
        if any(int(u) not in pos for u in users):
            continue
        rows = np.array([pos[int(u)] for u in users], dtype=np.int64)
        top = [top_k_lists(pred["scores"][rows[i:i + chunk]], seen[i:i + chunk], k)  # bounded memory
               for i in range(0, len(rows), chunk)]
        out[name] = catalog_stats(np.concatenate(top), counts)
    return out


# ---------------------------------------------------------------------------------------------- baselines
def _value(rows: dict, name: str, task: str, metric: str) -> Optional[float]:
    try:
        return float(rows[name][task][metric]["value"])
    except (KeyError, TypeError):
        return None


def baseline_check(quality: dict, baselines: Sequence[str]) -> dict:
    """Every system against the best baseline of each BASELINE_CHECKS metric, on the same users.

    quality: {"label": str, "users": int, "rows": {name: evaluate() output}} for one set of users.
    Returns {"checks": [...], "below": [...]}, one entry per (system, metric) both have; `below` = the
    systems worse than that baseline."""
    rows = quality["rows"]
    systems = [n for n in rows if n not in baselines]
    checks = []
    for task, metric, better in BASELINE_CHECKS:
        have = [(b, _value(rows, b, task, metric)) for b in baselines if b in rows]
        have = [(b, v) for b, v in have if v is not None]
        if not have:
            continue
        pick = max if better == "higher" else min
        base, base_v = pick(have, key=lambda bv: bv[1])
        for name in systems:
            v = _value(rows, name, task, metric)
            if v is None:
                continue
            worse = v < base_v if better == "higher" else v > base_v
            checks.append(dict(system=name, metric=f"{task}/{metric}", value=v, baseline=base, baseline_value=base_v,
                               better=better, below=bool(worse), users=quality["users"], on=quality["label"]))
    return dict(checks=checks, below=[c for c in checks if c["below"]])


def merge_baseline_checks(per_set: Sequence[dict]) -> dict:
    """One verdict per (system, metric): from the first user set that has it (all users before a subset)."""
    seen, checks = set(), []
    for res in per_set:
        for c in res["checks"]:
            key = (c["system"], c["metric"])
            if key not in seen:
                seen.add(key)
                checks.append(c)
    below = [c for c in checks if c["below"]]
    return dict(ok=not below, checks=checks, below=below)
