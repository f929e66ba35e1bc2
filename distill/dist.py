"""The process group of a run launched by torchrun or `accelerate launch` (both set WORLD_SIZE, RANK, LOCAL_RANK).

One object per stage: the teacher's LoRA fine-tune (DDP), the sharded cache (each rank labels its shards; rank 0
writes the manifest after a barrier) and the student (DDP). A plain `distillrec` run is world size 1 and never
touches torch.distributed. The engine is PyTorch's own: nccl on CUDA, gloo on the CPU.
"""
from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch


class Dist:
    """torchrun / accelerate launch set WORLD_SIZE, RANK, LOCAL_RANK: DDP with nccl (CUDA) or gloo (CPU).

    The default process group is created once per process and kept until the process exits: `distillrec run` under a
    launcher runs teacher, cache and student in one process, and re-creating the group after destroying it is not
    reliable (gloo's second rendezvous can fail to connect). `backend` / `timeout_s` give this stage its own group
    (the cache stage: gloo barriers with a long timeout, whatever the device)."""

    def __init__(self, device: str, backend: str | None = None, timeout_s: float | None = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        self.group = None
        if self.world > 1:
            import torch.distributed as dist
            if device.startswith("cuda"):
                torch.cuda.set_device(self.local_rank)
                self.device = f"cuda:{self.local_rank}"
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
                atexit.register(_destroy)
            if backend is not None or timeout_s is not None:  # collective: every rank builds it at the same point
                kw = {} if timeout_s is None else dict(timeout=timedelta(seconds=timeout_s))
                self.group = dist.new_group(backend=backend, **kw)

    @classmethod
    def single(cls, device: str) -> "Dist":
        """World size 1 whatever the environment says (a library call inside a launched job, e.g. the ablation)."""
        d = cls.__new__(cls)
        d.world, d.rank, d.local_rank, d.device, d.group = 1, 0, 0, device, None
        return d

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier(group=self.group)

    def average_(self, tensors):
        if self.world > 1:
            import torch.distributed as dist
            for t in tensors:
                if t is not None:
                    dist.all_reduce(t, op=dist.ReduceOp.SUM)
                    t /= self.world

    def any_(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank (a stop decision all ranks must share)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_object(self, obj):
        """rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        """The stage's end: every rank waits for the others. The process group stays (see the class docstring)."""
        self.barrier()


def _destroy():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
