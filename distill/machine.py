"""Facts about the machine a number was measured on, for reports (training, ablation, benchmark).

`host_info()` never imports torch: the benchmark of an onnxruntime-only system and the torch-free serving
environment can describe their machine. `torch_info()` imports torch and is called only where torch runs.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpu_model() -> str | None:
    """The CPU's marketing name from /proc/cpuinfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def host_info() -> dict:
    """Platform, Python, CPU model and counts, memory: everything that needs no torch.

    physical_cores / memory_gb need psutil and are left out without it; affinity_cpus (the CPUs this
    process may run on) is left out where the OS has no sched_getaffinity."""
    info = dict(platform=platform.platform(), python=platform.python_version(), processor=platform.processor(),
                machine=platform.machine(), cpu_count=os.cpu_count())
    model = _cpu_model()
    if model:
        info["cpu_model"] = model
    try:
        import psutil
        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except ImportError:
        pass
    if hasattr(os, "sched_getaffinity"):
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    return info


def torch_info() -> dict:
    """torch's version, thread settings and GPU (imports torch: call it only where torch runs)."""
    import torch
    info = dict(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                torch_interop_threads=torch.get_num_interop_threads())
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def machine_info() -> dict:
    """host_info() + torch_info(): the machine of a training run (which always runs torch)."""
    return {**host_info(), **torch_info()}
