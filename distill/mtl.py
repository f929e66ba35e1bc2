"""Multi-task blocks over the shared sequence state: shared-bottom, MMoE and PLE.

Each maps z [..., d] to a dict {task: [..., d]} (one input per task tower).
PLE (Tang et al. 2020, single extraction level): every task has its own experts plus a pool of
shared experts; task t's gate is a softmax over (its own experts + the shared experts), so its gate
width is n_task_experts + n_shared_experts. Shared experts are computed once and reused by all gates.
"""
from __future__ import annotations

import torch
from torch import nn


def _expert(d: int, hidden: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d))


class SharedBottom(nn.Module):
    def __init__(self, tasks: list[str], d: int, hidden: int, dropout: float = 0.0, **_):
        super().__init__()
        self.tasks = list(tasks)
        self.bottom = _expert(d, hidden, dropout)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = z + self.bottom(z)
        return {t: shared for t in self.tasks}


class MMoE(nn.Module):
    """Multi-gate mixture of experts (Ma et al. 2018): n_experts shared experts, one softmax gate per task."""

    def __init__(self, tasks: list[str], d: int, hidden: int, dropout: float = 0.0, n_experts: int = 4, **_):
        super().__init__()
        self.tasks = list(tasks)
        self.experts = nn.ModuleList(_expert(d, hidden, dropout) for _ in range(n_experts))
        self.gates = nn.ModuleDict({t: nn.Linear(d, n_experts) for t in self.tasks})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        e = torch.stack([ex(z) for ex in self.experts], dim=-2)  # [..., E, d]
        out = {}
        for t in self.tasks:
            g = torch.softmax(self.gates[t](z), dim=-1).unsqueeze(-1)  # [..., E, 1]
            out[t] = z + (g * e).sum(-2)
        return out


class PLE(nn.Module):
    """Progressive layered extraction, one level: task-specific + shared experts, per-task gates."""

    def __init__(self, tasks: list[str], d: int, hidden: int, dropout: float = 0.0, n_experts: int = 4,
                 n_shared_experts: int | None = None, **_):
        super().__init__()
        self.tasks = list(tasks)
        n_shared = n_experts if n_shared_experts is None else n_shared_experts
        self.n_task_experts = n_experts
        self.shared = nn.ModuleList(_expert(d, hidden, dropout) for _ in range(n_shared))
        self.specific = nn.ModuleDict({t: nn.ModuleList(_expert(d, hidden, dropout) for _ in range(n_experts))
                                       for t in self.tasks})
        self.gates = nn.ModuleDict({t: nn.Linear(d, n_experts + n_shared) for t in self.tasks})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = [ex(z) for ex in self.shared]
        out = {}
        for t in self.tasks:
            e = torch.stack([ex(z) for ex in self.specific[t]] + shared, dim=-2)
            g = torch.softmax(self.gates[t](z), dim=-1).unsqueeze(-1)
            out[t] = z + (g * e).sum(-2)
        return out


MTL_BLOCKS = {"shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE}


def build_mtl(kind: str, tasks: list[str], d: int, hidden: int, dropout: float, n_experts: int) -> nn.Module:
    if kind not in MTL_BLOCKS:
        raise ValueError(f"unknown student.mtl '{kind}'; choose one of {sorted(MTL_BLOCKS)}")
    return MTL_BLOCKS[kind](tasks, d, hidden, dropout=dropout, n_experts=n_experts)
