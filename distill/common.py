"""Small shared helpers: seeding, device choice, timers, run-folder bookkeeping."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np

from .machine import machine_info  # noqa: F401 - re-exported (distill.ablation imports it from here)


def set_seed(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> str:
    if name == "cpu":
        return name  # no torch import needed to run on the CPU
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} requested but torch sees no CUDA device; use device: cpu or auto")
    return name


def apply_threads(threads) -> None:
    import torch
    if threads:
        torch.set_num_threads(int(threads))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def stage_dir(run_dir: Path, stage: str) -> Path:
    d = Path(run_dir) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


def lr_lambda(warmup: int, total: int):
    """LambdaLR factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (teacher and student)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f
