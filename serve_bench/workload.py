"""Benchmark requests built from the protocol's test users (their real histories).

A request = one user's history before the test event (the last <= max_history interactions, as the
protocol feeds models) + candidates. Candidates = the held-out test item first, then `n_candidates - 1`
items drawn (seeded) from the catalog minus everything in the user's history.

Two request sets:
  * "natural"  - a seeded sample of all test users, their own history lengths (a batch is padded to its
                 longest history, as the runtime pads);
  * "fixed50"  - test users with at least `fixed_len` earlier interactions, exactly the last `fixed_len`
                 (no padding): the fixed-length variant the targets are stated on.

Two workloads per request:
  * "topk"        - full-catalog next_item scores + the top-K unseen items (the post-processing is timed
                    too, identical numpy code for every system);
  * "candidates"  - rating + like for `n_candidates` candidates of each request.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.evaluation import left_pad

WORKLOADS = ("topk", "candidates")


@dataclass
class RequestSet:
    name: str
    users: np.ndarray
    items: np.ndarray  # int64 [U, L], left padded
    ratings: np.ndarray  # float32 [U, L]
    length: np.ndarray  # int64 [U]
    candidates: np.ndarray  # int64 [U, C]; column 0 = the test target

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, rows: np.ndarray, n_candidates: int) -> tuple:
        """(items, ratings, length, candidates) of `rows`, history axis cut to the batch's longest history."""
        length = self.length[rows]
        L = self.items.shape[1]
        Lb = max(1, int(length.max()) if len(rows) else 1)
        return (np.ascontiguousarray(self.items[rows, L - Lb:]), np.ascontiguousarray(self.ratings[rows, L - Lb:]),
                np.ascontiguousarray(length), np.ascontiguousarray(self.candidates[rows, :n_candidates]))

    def batches(self, batch_size: int, n_candidates: int = 1) -> list[tuple]:
        """Consecutive batches covering every request once (wrapping around to fill the last / a large batch)."""
        n = len(self)
        if n == 0:
            raise ValueError(f"request set {self.name!r} is empty")
        count = max(1, -(-n // batch_size))
        return [self.batch(np.arange(i * batch_size, (i + 1) * batch_size) % n, n_candidates) for i in range(count)]

    def subset(self, rows) -> "RequestSet":
        rows = np.asarray(rows)
        return RequestSet(self.name, self.users[rows], self.items[rows], self.ratings[rows], self.length[rows],
                          self.candidates[rows])

    def save(self, path) -> None:
        np.savez(path, users=self.users, items=self.items, ratings=self.ratings, length=self.length,
                 candidates=self.candidates, name=np.array(self.name))

    @classmethod
    def load(cls, path) -> "RequestSet":
        with np.load(path) as z:
            return cls(str(z["name"]), z["users"], z["items"], z["ratings"], z["length"], z["candidates"])


def candidates_for(split, users: np.ndarray, n_candidates: int, seed: int) -> np.ndarray:
    """[U, C]: the test target, then C-1 seeded random items outside the user's whole history."""
    n_items = split.ds.n_items
    targets, _ = split.targets(users, "test")
    rng = np.random.default_rng([seed, 4099])
    out = np.zeros((len(users), max(1, n_candidates)), dtype=np.int64)
    for row, u in enumerate(users):
        out[row, 0] = targets[row]
        if n_candidates > 1:
            banned = np.zeros(n_items, dtype=bool)
            banned[split.seen(u, "test")] = True
            banned[targets[row]] = True
            allowed = np.flatnonzero(~banned)
            k = min(n_candidates - 1, len(allowed))
            out[row, 1:1 + k] = rng.choice(allowed, size=k, replace=False)
            if k < n_candidates - 1:  # a tiny catalog: repeat the target to keep the shape
                out[row, 1 + k:] = targets[row]
    return out


def build_request_sets(split, n_requests: int, max_len: int, n_candidates: int, seed: int,
                       fixed_len: int = 50) -> dict[str, RequestSet]:
    """{'natural': ..., 'fixed50': ...} (the fixed-length set is absent when no user has that much history)."""
    pool = np.asarray(split.eval_users)
    rng = np.random.default_rng([seed, 17])
    natural = np.sort(rng.choice(pool, size=min(n_requests, len(pool)), replace=False))
    sets = {}
    hist = [split.history(int(u), "test", max_len) for u in natural]
    items, ratings, length = left_pad(hist, max(1, max(len(h[0]) for h in hist)))
    sets["natural"] = RequestSet("natural", natural, items, ratings, length,
                                 candidates_for(split, natural, n_candidates, seed))
    fixed_len = min(fixed_len, max_len)
    long_users = np.array([u for u in pool if split.target_index(int(u), "test") >= fixed_len], dtype=np.int64)
    if len(long_users):
        chosen = np.sort(rng.choice(long_users, size=min(n_requests, len(long_users)), replace=False))
        hist = [split.history(int(u), "test", fixed_len) for u in chosen]
        items, ratings, length = left_pad(hist, fixed_len)
        sets[f"fixed{fixed_len}"] = RequestSet(f"fixed{fixed_len}", chosen, items, ratings, length,
                                              candidates_for(split, chosen, n_candidates, seed))
    return sets


def top_k_unseen(scores: np.ndarray, items: np.ndarray, length: np.ndarray, k: int) -> np.ndarray:
    """[B, k] item ids, best first, with the request's (fed) history items masked out."""
    s = np.array(scores, dtype=np.float32, copy=True)
    b, L = items.shape
    valid = np.arange(L)[None, :] >= (L - length)[:, None]
    r, c = np.nonzero(valid)
    s[r, items[r, c]] = -np.inf
    k = min(k, s.shape[1])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
