"""A data-parallel replica whose gradient all-reduces are counted (steps.csv allreduces)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel


class Replica(DistributedDataParallel):
    """DistributedDataParallel whose gradient all-reduces go through a communication hook
    that counts them: one call per bucket, DDP's own all-reduce (the mean over the ranks)."""

    def __init__(self, module: nn.Module):
        device = next(module.parameters()).device
        super().__init__(module, device_ids=[device.index if device.index is not None
                                             else torch.cuda.current_device()]
                         if device.type == "cuda" else None)
        self.allreduces = AllReduceCount()
        self.register_comm_hook(self.allreduces, counted_allreduce)


@dataclass
class AllReduceCount:
    calls: int = 0


# (no annotations: DDP compares them with its own types, and this module's are strings)
def counted_allreduce(count, bucket):
    count.calls += 1
    return default_hooks.allreduce_hook(None, bucket)
