"""Stage time budgets that bound the whole stage, and up-front cost statements.

A stage's `time_budget_s` covers everything the stage does: loading the model, one-off passes (item
vectors), training, and the work after training (the final evaluation). Training is what can be cut, so
it gets what is left once the measured work before it and the ESTIMATED work after it are paid for:

    train_s = budget_s - spent_s - after_tokens / tokens_per_s

`after_tokens` is counted exactly (the evaluation's sequences are known before training); `tokens_per_s`
is measured on this machine by a probe. When the fixed work alone exceeds the budget the stage says so
before it starts training, with the numbers, and how to fit.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .windows import pad_batch, token_batches


class StageClock:
    """Seconds since the stage started; the clock is injectable so tests need no wall time."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.t0 = clock()

    def elapsed(self) -> float:
        return self.clock() - self.t0


@dataclass
class BudgetPlan:
    """How one stage's time budget is split between the work it must do and the training it can cut."""

    budget_s: float
    """The stage's whole budget (teacher.time_budget_s)."""
    spent_s: float
    """Measured before training: loading the LM, the item-vector pass, the throughput probe."""
    after_tokens: int
    """LLM tokens of the work after training (the final evaluation), counted from its sequences."""
    tokens_per_s: float
    """Measured inference throughput of this teacher on this device (the probe)."""
    after_what: str = "evaluation"
    """What the work after training is, for the message."""

    @property
    def after_s(self) -> float:
        """Estimated seconds of the work after training."""
        return self.after_tokens / max(self.tokens_per_s, 1e-9)

    @property
    def train_s(self) -> float:
        """Seconds left for training (validation and item-vector refreshes run inside it)."""
        return max(0.0, self.budget_s - self.spent_s - self.after_s)

    @property
    def over_s(self) -> float:
        """How far the fixed work alone exceeds the budget (0 when it fits)."""
        return max(0.0, self.spent_s + self.after_s - self.budget_s)

    def describe(self, hint: str = "") -> str:
        """The statement printed before training starts."""
        head = (f"time budget {self.budget_s:.0f} s = {self.spent_s:.1f} s spent (model + item vectors) + "
                f"~{self.after_s:.1f} s {self.after_what} ({self.after_tokens:,} tokens at {self.tokens_per_s:,.0f} "
                f"tokens/s) + {self.train_s:.1f} s training")
        if self.over_s > 0:
            head += (f"; the fixed work alone exceeds the budget by ~{self.over_s:.0f} s, so training is cut to "
                     f"one step{': ' + hint if hint else ''}")
        return head

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(after_s=round(self.after_s, 2), train_s=round(self.train_s, 2), over_s=round(self.over_s, 2))
        return d


def cost_statement(what: str, tokens: int, tokens_per_s: float, source: str) -> str:
    """'labelling ... = N tokens; at T tokens/s (source) ~ S s' for work a stage must do whatever it costs."""
    return (f"{what} = {tokens:,} LLM tokens; at {tokens_per_s:,.0f} tokens/s ({source}) that is "
            f"~{tokens / max(tokens_per_s, 1e-9):.0f} s")


@torch.no_grad()
def forward_throughput(teacher, seqs: list[list[int]], pad_id: int, budget_tokens: int, device,
                       clock: Callable[[], float] = time.perf_counter, repeats: int = 2) -> float:
    """Real (unpadded) tokens per second of `teacher.hidden` on the first inference batch of `seqs`
    (the longest sequences, as an evaluation starts); the fastest of `repeats` runs (the first warms up)."""
    batch = token_batches([len(s) for s in seqs], budget_tokens)[0]
    ids, mask = pad_batch([seqs[i] for i in batch], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    was_training = teacher.training
    teacher.eval()
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        teacher.hidden(ids, mask)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, clock() - t)
    teacher.train(was_training)
    return int(mask.sum()) / max(best, 1e-9)
