"""Windows and batches shared by the teacher stage, the cache and the student stage.

A user's training history is cut into windows of `window` labelled interactions, each preceded by up to
`context` unlabelled ones, so every training position is labelled exactly once. Token sequences of
different lengths are grouped into batches under a token budget and right-padded. Nothing here knows
about models: these are pure functions of lengths, seeds and indices.
"""
from __future__ import annotations

import numpy as np
import torch


def windows(n: int, window: int, context: int) -> list[tuple[int, int, int]]:
    """(context start c, labelled start a, end b): [a, b) partition [0, n); c = max(0, a - context)."""
    return [(max(0, a - context), a, min(n, a + window)) for a in range(0, n, window)]


def window_examples(split, users: np.ndarray, window: int, context: int) -> list[tuple[int, int, int, int]]:
    """(user, context start, labelled start, end) over each user's training part (`split.n_train`)."""
    return [(int(u), c, a, b) for u in users for (c, a, b) in windows(int(split.n_train[u]), window, context)]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both [len(seqs), longest]: right-padded with pad_id, mask 1 on real tokens."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def token_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped (longest first) so that batch_size * max_len <= budget tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, cur_max = [], [], 0
    for i in order:
        m = max(cur_max, lengths[i])
        if cur and m * (len(cur) + 1) > budget:
            batches.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        cur_max = m
    if cur:
        batches.append(cur)
    return batches


def index_pairs(rows: list[int], cols: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) index tensors that pick one hidden state per labelled interaction out of a batch."""
    return torch.tensor(rows, device=device), torch.tensor(cols, device=device)


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless (epoch, indices) stream: a fresh permutation per epoch."""
    epoch = 0
    while True:
        order = rng.permutation(n)
        for i in range(0, n, batch_size):
            yield epoch, order[i:i + batch_size]
        epoch += 1


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
