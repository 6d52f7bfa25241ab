"""One optimizer step under an arm's accumulation policy.

This is the only training loop in gradlab. Every pitfall an experiment shows
(forgetting to normalise the loss, misplacing zero_grad, BatchNorm statistics,
dividing by the wrong token count) is a value of a setting read here, never a
copy of this code. Read ``train_step`` top to bottom: ``window_gradient`` (split
the window, then forward, normalise and backward each micro-batch, zero_grad
where the policy puts it), then step and zero.

The probe calls ``window_gradient`` as well, so a verdict sees everything the
step does to the gradient before the optimizer applies it.

A data-parallel arm (world_size W > 1) trains a DistributedDataParallel replica
(gradlab.distributed) on each of W ranks: ``window_gradient`` gives each rank its
own slice of the window, and the arm's sync policy decides which backward passes
all-reduce, in the same one path.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradlab.distributed import Replica
from gradlab.errors import unhandled
from gradlab.setup import Examples, Setup, split
from gradlab.spec import BnMode, LossScale, Optimizer, Settings, Sync, ZeroGrad


class Watch(Protocol):
    """What the runner's observers see of a step while it happens."""

    def micro_batch(self, index: int) -> None:
        """After micro-batch ``index``'s backward: .grad holds the sum so far."""

    def gradient(self) -> None:
        """.grad now holds what optimizer.step() is about to apply."""


@dataclass(frozen=True)
class StepStats:
    loss: float  # summed loss of the window / its units, before the step
    units: int  # loss units in the window: examples, or non-padding tokens
    grad_norm: float  # L2 norm of the gradient the optimizer applied (all parameters)
    update_norm: float  # L2 norm of the change in the parameters
    allreduces: int = 0  # gradient all-reduces across ranks (buckets), as DDP's hook counted
    seconds: float = math.nan  # wall time of the forward/backward passes and the step


def normalised(loss: torch.Tensor, units, window_units, s: Settings,
               ranks: int = 1) -> torch.Tensor:
    """A micro-batch's summed loss, divided as the arm's loss_scale says.

    by-size divides by the units of the whole window, so the N backward passes add
    up to the gradient of the window's mean loss per unit even when micro-batches
    hold different numbers of examples or tokens (transformers' num_items_in_batch).
    by-count takes each micro-batch's own mean and divides by N: exact only when
    every micro-batch holds the same number of units.

    With W ranks, DDP's all-reduce takes the mean of the ranks' gradients, so by-size
    counts each rank's share W times (as transformers does under DDP), while by-count's
    mean of micro-batch means is what DDP's mean over ranks completes (nanoGPT's loss/N).
    """
    match s.loss_scale:
        case LossScale.BY_SIZE:
            return (loss * ranks if ranks > 1 else loss) / window_units
        case LossScale.BY_COUNT:
            return loss / (units * s.accum_steps)
        case LossScale.NONE:  # the bug: N means added up, gradients N times too large
            return loss / units
    unhandled(s.loss_scale)


def set_train_mode(model: nn.Module, s: Settings) -> None:
    model.train()
    match s.bn_mode:
        case BnMode.TRAIN:
            pass
        case BnMode.FROZEN:  # fixed running statistics: BN becomes a per-example affine map
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        case _:
            unhandled(s.bn_mode)


def window_gradient(model: nn.Module, window: Examples, s: Settings, setup: Setup,
                    watch: Watch | None = None) -> tuple[torch.Tensor, torch.Tensor | int]:
    """Backward each micro-batch of a window into ``.grad``; returns (summed loss, units).

    ``.grad`` is not cleared first: what it holds on entry is what the zero_grad
    policy left there. Both returned values stay on the device (no host sync).
    (model.zero_grad is optimizer.zero_grad here: the optimizer holds exactly the
    model's parameters.)
    """
    set_train_mode(model, s)
    rank, ranks = data_parallel_rank(model)
    every_rank = rank_micro_batches(window, s.accum_steps, ranks)
    # the units of the whole window, every rank's slice, before any backward
    window_units = sum(setup.count_units(mb) for part in every_rank for mb in part)
    micro_batches = every_rank[rank]
    window_loss = 0.0
    for i, micro_batch in enumerate(micro_batches):
        if s.zero_grad == ZeroGrad.EVERY_STEP:  # zero_grad before each backward: last one wins
            model.zero_grad(set_to_none=s.set_to_none)
        # DDP decides at forward time whether the backward all-reduces: both go inside
        with synced(model, s, last=i == len(micro_batches) - 1):
            loss, units = setup.loss(model, micro_batch)
            normalised(loss, units, window_units, s, ranks).backward()
        window_loss = window_loss + loss.detach()
        if watch is not None:
            watch.micro_batch(i)
        if s.zero_grad == ZeroGrad.AFTER_BACKWARD:  # the misplacement: wipes what backward did
            model.zero_grad(set_to_none=s.set_to_none)
    return window_loss, window_units


def rank_micro_batches(window: Examples, n: int, ranks: int) -> list[list[Examples]]:
    """The window's micro-batches, rank by rank: each of the W ranks takes its own slice of
    the window, in order, and splits it into N, so the ranks together see every example of
    the window once (W = 1: the window's N micro-batches)."""
    return [split(part, n) for part in split(window, ranks)]


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


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, window: Examples,
               s: Settings, setup: Setup, watch: Watch | None = None) -> StepStats:
    """One optimizer step on a window of B examples, under the arm's policy."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    allreduces = allreduce_calls(model)
    stopwatch = Stopwatch(params, s.time_steps)
    with stopwatch:
        loss, units = window_gradient(model, window, s, setup, watch)
    if watch is not None:  # what the watch does is not the step's cost
        watch.gradient()
    grad_norm = global_norm(p.grad for p in params)
    with stopwatch:
        optimizer.step()
        if s.zero_grad == ZeroGrad.EVERY_N:  # the accumulation pattern: clear once per step
            optimizer.zero_grad(set_to_none=s.set_to_none)
    update_norm = global_norm(p.detach() - b for p, b in zip(params, before, strict=True))
    units = int(units)
    return StepStats(float(summed_over_ranks(loss, model)) / units, units, grad_norm,
                     update_norm, allreduce_calls(model) - allreduces, stopwatch.seconds)


def allreduce_calls(model: nn.Module) -> int:
    """The gradient all-reduces a replica's communication hook has counted so far."""
    return model.allreduces.calls if isinstance(model, Replica) else 0


def summed_over_ranks(loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The whole window's summed loss, for the record: each rank holds its own slice's.
    (Not a gradient, so not through DDP's hook, and not counted.)"""
    if not isinstance(model, DistributedDataParallel):
        return loss
    total = loss.detach().double()  # float64: every backend sums it, whatever the arm's dtype
    dist.all_reduce(total, group=model.process_group)
    return total


class Stopwatch:
    """Wall time of the parts of a step it is held around, when the arm asks for it
    (time_steps): CUDA runs ahead of Python, so each reading waits for the device."""

    def __init__(self, params: list[torch.Tensor], on: bool):
        self.device = params[0].device if params else torch.device("cpu")
        self.on = on
        self.seconds = 0.0 if on else math.nan

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __enter__(self) -> None:
        if self.on:
            self.started = self._now()

    def __exit__(self, *exc) -> None:
        if self.on:
            self.seconds += self._now() - self.started


def global_norm(tensors: Iterable[torch.Tensor | None]) -> float:
    """L2 norm over all tensors, in float64 so low-precision arms are measured exactly."""
    squares = [t.detach().double().pow(2).sum() for t in tensors if t is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def make_optimizer(model: nn.Module, s: Settings) -> torch.optim.Optimizer:
    params = model.parameters()
    match s.optimizer:
        case Optimizer.SGD:
            return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum,
                                   weight_decay=s.weight_decay)
        case Optimizer.ADAM:
            return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
        case Optimizer.ADAMW:
            return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    unhandled(s.optimizer)
