"""Loss-weighting strategies, one interface shared by the teacher and the student.

    strategy = build_weighting(name, tasks, init_weights)
    total, weights = strategy(losses)        # losses: dict task -> scalar tensor (unweighted)
    strategy.end_epoch(epoch_mean_losses)    # strategies that adapt per epoch (DWA) use it

`weights` is a plain dict of floats for logging. A strategy with learnable parameters (uncertainty)
exposes them through `parameters()`; add them to the optimizer.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class FixedWeighting(nn.Module):
    """total = sum_t w_t * L_t with hand-set weights (missing tasks get 1.0)."""

    def __init__(self, tasks: list[str], weights: dict | None = None):
        super().__init__()
        self.w = {t: float((weights or {}).get(t, 1.0)) for t in tasks}

    def forward(self, losses: dict[str, torch.Tensor]):
        total = sum(self.w[t] * loss for t, loss in losses.items())
        return total, {t: self.w[t] for t in losses}

    def end_epoch(self, mean_losses: dict[str, float]) -> None:
        pass


class UncertaintyWeighting(nn.Module):
    """Kendall, Gal & Cipolla (2018): total = sum_t exp(-s_t) * L_t + s_t, s_t = log sigma_t^2 learned.

    (The 1/2 factors of the regression form are folded into s_t; the fixed weights scale L_t first.)
    """

    def __init__(self, tasks: list[str], weights: dict | None = None):
        super().__init__()
        self.base = {t: float((weights or {}).get(t, 1.0)) for t in tasks}
        self.log_var = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in tasks})

    def forward(self, losses):
        total, w = 0.0, {}
        for t, loss in losses.items():
            s = self.log_var[t]
            total = total + torch.exp(-s) * self.base[t] * loss + s
            w[t] = float(torch.exp(-s).detach()) * self.base[t]
        return total, w

    def end_epoch(self, mean_losses):
        pass


class DynamicWeightAverage(nn.Module):
    """Liu et al. (2019) DWA: w_t = K * softmax_t(r_t / T), r_t = L_t(e-1) / L_t(e-2), from the last two epochs.

    Tasks whose loss falls slowly get more weight; the first two epochs use the base weights.
    """

    def __init__(self, tasks: list[str], weights: dict | None = None, temperature: float = 2.0):
        super().__init__()
        self.tasks, self.T = list(tasks), temperature
        self.base = {t: float((weights or {}).get(t, 1.0)) for t in tasks}
        self.history: list[dict[str, float]] = []
        self.w = dict(self.base)

    def forward(self, losses):
        total = sum(self.w[t] * loss for t, loss in losses.items())
        return total, {t: self.w[t] for t in losses}

    def end_epoch(self, mean_losses):
        self.history.append(dict(mean_losses))
        if len(self.history) < 2:
            return
        prev, last = self.history[-2], self.history[-1]
        ratios = {t: last[t] / max(prev[t], 1e-12) for t in self.tasks if t in last and t in prev}
        z = sum(math.exp(r / self.T) for r in ratios.values())
        k = len(ratios)
        self.w = {t: self.base[t] * k * math.exp(r / self.T) / z for t, r in ratios.items()}


WEIGHTINGS = {"fixed": FixedWeighting, "uncertainty": UncertaintyWeighting, "dwa": DynamicWeightAverage}


def build_weighting(name: str, tasks: list[str], weights: dict | None = None) -> nn.Module:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting '{name}'; choose one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](tasks, weights)
