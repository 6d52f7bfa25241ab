"""What the engine needs of the ranks: a DDP replica whose gradient all-reduces are counted
(steps.csv allreduces), this rank's place, and which backward passes all-reduce (sync)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from gradlab.config.settings import Settings, Sync
from gradlab.errors import unhandled


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
    bytes: int = 0  # of the gradient buckets all-reduced (what each rank sends, before the
    #                 backend's own algorithm multiplies it)


# (no annotations: DDP compares them with its own types, and this module's are strings)
def counted_allreduce(count, bucket):
    count.calls += 1
    buffer = bucket.buffer()
    count.bytes += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)


def data_parallel_rank(model: nn.Module) -> tuple[int, int]:
    """(this rank, number of ranks) of a DDP replica; (0, 1) for a model of one process."""
    if isinstance(model, DistributedDataParallel):
        return dist.get_rank(model.process_group), dist.get_world_size(model.process_group)
    return 0, 1


def synced(model: nn.Module, s: Settings, last: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's forward and backward: no_sync() where the arm's sync policy
    says this backward must not all-reduce across the ranks."""
    if not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()  # one process: nothing to all-reduce
    match s.sync:
        case Sync.NO_SYNC:  # accumulate locally; all-reduce once, with the last micro-batch
            all_reduce = last
        case Sync.EVERY_MICRO_BATCH:  # right too: each all-reduce averages the sum so far
            all_reduce = True
        case Sync.NEVER:  # the bug: each rank steps on its own slice's gradient
            all_reduce = False
        case _:
            unhandled(s.sync)
    return contextlib.nullcontext() if all_reduce else model.no_sync()


def module_of(model: nn.Module) -> nn.Module:
    """The model inside a DDP replica (its state_dict and parameter names), or the model."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def allreduce_calls(model: nn.Module) -> tuple[int, int]:
    """The gradient all-reduces a replica's communication hook has counted so far, and the
    bytes of the buckets they reduced."""
    if isinstance(model, Replica):
        return model.allreduces.calls, model.allreduces.bytes
    return 0, 0


def summed_over_ranks(loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The whole window's summed loss, for the record: each rank holds its own slice's.
    (Not a gradient, so not through DDP's hook, and not counted.)"""
    if not isinstance(model, DistributedDataParallel):
        return loss
    total = loss.detach().double()  # float64: every backend sums it, whatever the arm's dtype
    dist.all_reduce(total, group=model.process_group)
    return total

