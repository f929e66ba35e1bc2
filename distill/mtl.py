"""Multi-task blocks over the shared sequence state: shared-bottom, MMoE and PLE.

Each maps z [..., d] to a dict {task: [..., d]} (one input per task tower). Every block is residual
(task input = z + mixture), so a block at init does not wash out the encoder state.

- SharedBottom: one shared MLP; every task reads the same output.
- MMoE (Ma et al. 2018): n_experts shared experts, computed once; task t's gate is a softmax over
  all n_experts.
- PLE (Tang et al. 2020, "Progressive Layered Extraction"): `levels` stacked CGC (customized gate
  control) layers. In every level, each task has n_task_experts of its own and the level has
  n_shared_experts shared ones. Task t's gate is a softmax over (t's own experts + the shared experts)
  — width n_task_experts + n_shared_experts, never the other tasks' experts. Shared experts are
  computed ONCE per level and the same outputs feed every task gate. A level that feeds another
  level also has a shared gate, a softmax over ALL experts of the level (n_tasks * n_task_experts
  + n_shared_experts), whose output is the next level's shared input; the last level has no shared
  gate (nothing reads it). Task experts of level l > 1 read their own task's output of level l - 1,
  shared experts read the shared output.

`gate_weights(z)` returns the softmax gate values of the (last) level, for tests and inspection.
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

    def gate_weights(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


class MMoE(nn.Module):
    """Multi-gate mixture of experts: n_experts shared experts, one softmax gate (width n_experts) per task."""

    def __init__(self, tasks: list[str], d: int, hidden: int, dropout: float = 0.0, n_experts: int = 4, **_):
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"MMoE needs n_experts >= 1, got {n_experts}")
        self.tasks = list(tasks)
        self.experts = nn.ModuleList(_expert(d, hidden, dropout) for _ in range(n_experts))
        self.gates = nn.ModuleDict({t: nn.Linear(d, n_experts) for t in self.tasks})

    def gate_weights(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: torch.softmax(self.gates[t](z), dim=-1) for t in self.tasks}

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        e = torch.stack([ex(z) for ex in self.experts], dim=-2)  # [..., E, d], computed once for all tasks
        return {t: z + (g.unsqueeze(-1) * e).sum(-2) for t, g in self.gate_weights(z).items()}


class CGCLevel(nn.Module):
    """One PLE extraction level (customized gate control)."""

    def __init__(self, tasks: list[str], d: int, hidden: int, dropout: float, n_task_experts: int,
                 n_shared_experts: int, shared_gate: bool):
        super().__init__()
        self.tasks = list(tasks)
        self.n_task_experts, self.n_shared_experts = n_task_experts, n_shared_experts
        self.shared = nn.ModuleList(_expert(d, hidden, dropout) for _ in range(n_shared_experts))
        self.specific = nn.ModuleDict({t: nn.ModuleList(_expert(d, hidden, dropout) for _ in range(n_task_experts))
                                       for t in self.tasks})
        self.gates = nn.ModuleDict({t: nn.Linear(d, n_task_experts + n_shared_experts) for t in self.tasks})
        self.shared_gate = nn.Linear(d, len(self.tasks) * n_task_experts + n_shared_experts) if shared_gate else None

    def _gates(self, inputs: dict[str, torch.Tensor], shared_in: torch.Tensor) -> dict[str, torch.Tensor]:
        g = {t: torch.softmax(self.gates[t](inputs[t]), dim=-1) for t in self.tasks}
        if self.shared_gate is not None:
            g["_shared"] = torch.softmax(self.shared_gate(shared_in), dim=-1)
        return g

    def forward(self, inputs: dict[str, torch.Tensor], shared_in: torch.Tensor):
        gates = self._gates(inputs, shared_in)
        shared = [ex(shared_in) for ex in self.shared]  # once per level, reused by every gate below
        specific = {t: [ex(inputs[t]) for ex in self.specific[t]] for t in self.tasks}
        out = {}
        for t in self.tasks:
            e = torch.stack(specific[t] + shared, dim=-2)  # [..., n_task + n_shared, d]
            out[t] = inputs[t] + (gates[t].unsqueeze(-1) * e).sum(-2)
        shared_out = None
        if self.shared_gate is not None:
            e = torch.stack([x for t in self.tasks for x in specific[t]] + shared, dim=-2)
            shared_out = shared_in + (gates["_shared"].unsqueeze(-1) * e).sum(-2)
        return out, shared_out


class PLE(nn.Module):
    """Progressive layered extraction: `levels` CGC levels (module docstring)."""

    def __init__(self, tasks: list[str], d: int, hidden: int, dropout: float = 0.0, n_experts: int = 4,
                 n_shared_experts: int = 2, levels: int = 1, **_):
        super().__init__()
        if n_experts < 1 or n_shared_experts < 0 or levels < 1:
            raise ValueError(f"PLE needs n_experts >= 1, n_shared_experts >= 0, levels >= 1; got "
                             f"{n_experts}, {n_shared_experts}, {levels}")
        self.tasks = list(tasks)
        self.n_task_experts, self.n_shared_experts = n_experts, n_shared_experts
        self.levels = nn.ModuleList(
            CGCLevel(self.tasks, d, hidden, dropout, n_experts, n_shared_experts, shared_gate=i < levels - 1)
            for i in range(levels))

    def _run(self, z: torch.Tensor):
        inputs, shared_in = {t: z for t in self.tasks}, z
        for level in self.levels[:-1]:
            inputs, shared_in = level(inputs, shared_in)
        return inputs, shared_in

    def gate_weights(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs, shared_in = self._run(z)
        g = self.levels[-1]._gates(inputs, shared_in)
        return {t: g[t] for t in self.tasks}

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs, shared_in = self._run(z)
        return self.levels[-1](inputs, shared_in)[0]


MTL_BLOCKS = {"shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE}


def build_mtl(kind: str, tasks: list[str], d: int, hidden: int, dropout: float, n_experts: int,
              n_shared_experts: int = 2, levels: int = 1) -> nn.Module:
    if kind not in MTL_BLOCKS:
        raise ValueError(f"unknown student.mtl '{kind}'; choose one of {sorted(MTL_BLOCKS)}")
    return MTL_BLOCKS[kind](tasks, d, hidden, dropout=dropout, n_experts=n_experts,
                            n_shared_experts=n_shared_experts, levels=levels)
