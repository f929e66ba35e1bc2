"""Loss-weighting strategies, one interface shared by the teacher and the student.

    strategy = build_weighting(name, tasks, init_weights)
    total, weights = strategy(losses)        # losses: dict task -> scalar tensor (unweighted)
    strategy.end_epoch(epoch_mean_losses)    # strategies that adapt per epoch (DWA) use it

`weights` is a plain dict of floats for logging. A strategy with learnable parameters (uncertainty)
exposes them through `parameters()`; add them to the optimizer. GradNorm updates its own weights
(it needs the shared layer whose gradient norms it balances: pass `shared=[params]`).
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

    Tasks whose loss falls slowly get more weight; the first two epochs use the base weights. "Epoch" is
    whatever period the caller closes with end_epoch(): the student closes real epochs, the teacher every
    `teacher.adapt_every` optimizer steps (a CPU-budget teacher never finishes an epoch).
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

    def get_extra_state(self):  # saved with state_dict(): a resumed run adapts exactly as an uninterrupted one
        return {"history": [dict(h) for h in self.history], "w": dict(self.w)}

    def set_extra_state(self, state):
        self.history, self.w = [dict(h) for h in state["history"]], dict(state["w"])

    def end_epoch(self, mean_losses):
        self.history.append(dict(mean_losses))
        if len(self.history) < 2:
            return
        prev, last = self.history[-2], self.history[-1]
        ratios = {t: last[t] / max(prev[t], 1e-12) for t in self.tasks if t in last and t in prev}
        z = sum(math.exp(r / self.T) for r in ratios.values())
        k = len(ratios)
        self.w = {t: self.base[t] * k * math.exp(r / self.T) / z for t, r in ratios.items()}


class GradNorm(nn.Module):
    """Chen et al. (2018) GradNorm: learn w_t so that the gradient norms G_t = ||d(w_t L_t)/dW|| on the
    shared layer W follow G_mean * r_t^alpha, r_t = (L_t / L_t(0)) / mean_s(L_s / L_s(0)).

    The weights get their own SGD step from the L1 gap (their gradient comes only from that gap, never
    from the task losses), then are renormalised to sum to the number of tasks. The returned total
    uses the weights as constants.
    """

    def __init__(self, tasks: list[str], weights: dict | None = None, shared: list | None = None,
                 alpha: float = 1.5, lr: float = 0.025):
        super().__init__()
        if not shared:
            raise ValueError("GradNorm needs the shared layer's parameters: build_weighting('gradnorm', ..., shared=[...])")
        self.tasks, self.alpha, self.lr = list(tasks), alpha, lr
        self.shared = [p for p in shared if p.requires_grad]
        self.base = {t: float((weights or {}).get(t, 1.0)) for t in tasks}
        self.register_buffer("w", torch.ones(len(tasks)))
        self.register_buffer("initial", torch.zeros(len(tasks)))

    def forward(self, losses):
        names = [t for t in self.tasks if t in losses]
        idx = [self.tasks.index(t) for t in names]
        L = torch.stack([self.base[t] * losses[t] for t in names])
        if self.training and torch.is_grad_enabled():
            if float(self.initial[idx].min()) == 0.0:
                self.initial[idx] = L.detach().clamp_min(1e-8)
            w = self.w[idx].clone().requires_grad_(True)
            norms = []
            for k in range(len(names)):
                g = torch.autograd.grad(L[k], self.shared, retain_graph=True, allow_unused=True)
                norms.append(torch.sqrt(sum((gi ** 2).sum() for gi in g if gi is not None) + 1e-12))
            G = w * torch.stack(norms).detach()  # ||d(w L)/dW|| = w * ||dL/dW||
            ratio = L.detach() / self.initial[idx]
            target = (G.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
            gap = (G - target).abs().sum()
            (grad_w,) = torch.autograd.grad(gap, w)
            with torch.no_grad():
                new = (self.w[idx] - self.lr * grad_w).clamp_min(1e-3)
                self.w[idx] = new * len(idx) / new.sum()
        total = (self.w[idx].detach() * L).sum()
        return total, {t: float(self.w[i]) * self.base[t] for t, i in zip(names, idx)}

    def end_epoch(self, mean_losses):
        pass


WEIGHTINGS = {"fixed": FixedWeighting, "uncertainty": UncertaintyWeighting, "dwa": DynamicWeightAverage,
              "gradnorm": GradNorm}


def build_weighting(name: str, tasks: list[str], weights: dict | None = None, shared: list | None = None) -> nn.Module:
    """`shared`: parameters of the last shared layer (used by GradNorm, ignored by the others)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting '{name}'; choose one of {sorted(WEIGHTINGS)}")
    if name == "gradnorm":
        return GradNorm(tasks, weights, shared=shared)
    return WEIGHTINGS[name](tasks, weights)
