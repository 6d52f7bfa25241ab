"""One optimizer step under an arm's accumulation policy.

This is the only training loop in gradlab. Every pitfall an experiment shows
(forgetting to normalise the loss, misplacing zero_grad, BatchNorm statistics,
dividing by the wrong token count, clipping each micro-batch, stepping the LR
scheduler per micro-batch, the short window at an epoch's end, dropout masks) is a
value of a setting read here, never a copy of this code. Read ``train_step`` top
to bottom: ``window_gradient`` (split the window, then forward, normalise and
backward each micro-batch, zero_grad and clipping where the policy puts them),
then step, zero and the scheduler.

The probe calls ``window_gradient`` as well, so a verdict sees everything the
step does to the gradient before the optimizer applies it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from gradlab.dropout import example_keys
from gradlab.errors import unhandled
from gradlab.setup import Examples, Setup, num_examples, split, split_at
from gradlab.spec import (
    BnMode,
    ClipAt,
    DropoutMasks,
    DropoutMode,
    EpochEnd,
    LossScale,
    Optimizer,
    Scheduler,
    SchedulerStep,
    Settings,
    ZeroGrad,
)


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
    update_norm: float  # L2 norm of the change in the parameters; NaN unless s.update_norm
    lr: float  # the learning rate the step applied
    examples: int  # examples in the window: B, fewer at an epoch's short end


def normalised(loss: torch.Tensor, units, window_units, s: Settings) -> torch.Tensor:
    """A micro-batch's summed loss, divided as the arm's loss_scale says.

    by-size divides by the units of the whole window, so the N backward passes add
    up to the gradient of the window's mean loss per unit even when micro-batches
    hold different numbers of examples or tokens (transformers' num_items_in_batch).
    by-count takes each micro-batch's own mean and divides by N: exact only when
    every micro-batch holds the same number of units.
    """
    match s.loss_scale:
        case LossScale.BY_SIZE:
            return loss / window_units
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
    match s.dropout_mode:
        case DropoutMode.TRAIN:
            pass
        case DropoutMode.EVAL:  # no masks: dropout is the identity
            for module in model.modules():
                if isinstance(module, nn.modules.dropout._DropoutNd):
                    module.eval()
        case _:
            unhandled(s.dropout_mode)


def step_windows(window: Examples, s: Settings) -> list[Examples]:
    """The windows whose gradients one optimizer step applies, each normalised on its own.

    One, except under epoch_end = carry-over: there a window longer than B starts with
    the last n mod B examples of the epoch before, which the loop backwarded but never
    stepped on (the window stream puts them in front of the next epoch's first window).
    """
    match s.epoch_end:
        case EpochEnd.RUN_ON | EpochEnd.SHORT_WINDOW:
            return [window]
        case EpochEnd.CARRY_OVER:
            held = num_examples(window) - s.batch_size
            return list(split_at(window, held)) if held > 0 else [window]
    unhandled(s.epoch_end)


def micro_batch_count(examples: int, s: Settings) -> int:
    """N for a window of B examples. A short window (an epoch's last n mod B examples) holds
    as many micro-batches of B/N as it fills, as a loader of micro-batches hands them out."""
    return s.accum_steps if examples >= s.batch_size else -(-examples // s.micro_batch)


def mask_keys(window: Examples, s: Settings) -> torch.Tensor | None:
    """Each example's dropout key: one draw from the arm's random stream per window, plus the
    example's place in the window. None: masks come from the stream as nn.Dropout draws them."""
    match s.dropout_masks:
        case DropoutMasks.STREAM:
            return None
        case DropoutMasks.PER_EXAMPLE:
            first = int(torch.randint(2**62, ()))
            return first + torch.arange(num_examples(window))
    unhandled(s.dropout_masks)


def clips_each_micro_batch(s: Settings) -> bool:
    match s.clip_at:
        case ClipAt.AFTER_ACCUMULATION:
            return False
        case ClipAt.PER_MICRO_BATCH:  # the bug: .grad holds a partial sum, and it gets clipped
            return True
    unhandled(s.clip_at)


def clip(model: nn.Module, s: Settings) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_norm)


def window_gradient(model: nn.Module, window: Examples, s: Settings, setup: Setup,
                    watch: Watch | None = None) -> tuple[torch.Tensor, torch.Tensor | int]:
    """Backward each micro-batch of a window into ``.grad``; returns (summed loss, units).

    ``.grad`` is not cleared first: what it holds on entry is what the zero_grad
    policy left there. Both returned values stay on the device (no host sync).
    (model.zero_grad is optimizer.zero_grad here: the optimizer holds exactly the
    model's parameters.)
    """
    set_train_mode(model, s)
    keys = mask_keys(window, s)
    per_micro_batch_clip = s.clip_norm > 0 and clips_each_micro_batch(s)
    window_loss, total_units, index, offset = 0.0, 0, 0, 0
    for part in step_windows(window, s):
        micro_batches = split(part, micro_batch_count(num_examples(part), s))
        window_units = sum(setup.count_units(mb) for mb in micro_batches)  # before any backward
        for micro_batch in micro_batches:
            if s.zero_grad == ZeroGrad.EVERY_STEP:  # zero_grad before each backward: last wins
                model.zero_grad(set_to_none=s.set_to_none)
            size = num_examples(micro_batch)
            with example_keys(model, None if keys is None else keys[offset:offset + size]):
                loss, units = setup.loss(model, micro_batch)
            normalised(loss, units, window_units, s).backward()
            if per_micro_batch_clip:
                clip(model, s)
            window_loss = window_loss + loss.detach()
            if watch is not None:
                watch.micro_batch(index)
            if s.zero_grad == ZeroGrad.AFTER_BACKWARD:  # the misplacement: wipes what backward did
                model.zero_grad(set_to_none=s.set_to_none)
            index, offset = index + 1, offset + size
        total_units = total_units + window_units
    if s.clip_norm > 0 and not per_micro_batch_clip:  # once, on what the step will apply
        clip(model, s)
    return window_loss, total_units


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, window: Examples,
               s: Settings, setup: Setup, watch: Watch | None = None,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> StepStats:
    """One optimizer step on a window of B examples, under the arm's policy.

    What it measures costs next to nothing: the loss is summed on the device and the
    gradient norm taken in one pass over .grad, then both come to the host once per
    step. Only the update norm needs a copy of every parameter, so it is taken only
    where the arm asks for it (s.update_norm).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params] if s.update_norm else None
    loss, units = window_gradient(model, window, s, setup, watch)
    if watch is not None:
        watch.gradient()
    grad_norm = global_norm(p.grad for p in params)
    lr = learning_rate(optimizer)
    optimizer.step()
    if s.zero_grad == ZeroGrad.EVERY_N:  # the accumulation pattern: clear once per step
        optimizer.zero_grad(set_to_none=s.set_to_none)
    if scheduler is not None:
        for _ in range(scheduler_steps(window, s)):
            scheduler.step()
    update_norm = math.nan
    if before is not None:
        torch._foreach_sub_(before, [p.detach() for p in params])  # before - after, in place
        update_norm = global_norm(before)
    loss, units, grad_norm, update_norm = to_host(loss, units, grad_norm, update_norm)
    return StepStats(loss / units, int(units), grad_norm, update_norm, lr,
                     num_examples(window))


def scheduler_steps(window: Examples, s: Settings) -> int:
    """How many times scheduler.step() runs for one optimizer step."""
    match s.scheduler_step:
        case SchedulerStep.PER_STEP:
            return 1
        case SchedulerStep.PER_MICRO_BATCH:  # the bug: called next to backward(), not step()
            return sum(micro_batch_count(num_examples(part), s)
                       for part in step_windows(window, s))
    unhandled(s.scheduler_step)


def learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the next optimizer.step() applies (gradlab makes one group)."""
    return float(optimizer.param_groups[0]["lr"])


def to_host(*values: torch.Tensor | float) -> list[float]:
    """Scalars (tensors on any device, or numbers) as floats, with at most one host sync:
    the ones on an accelerator come over together."""
    remote = [v for v in values if isinstance(v, torch.Tensor) and v.device.type != "cpu"]
    if remote:
        fetched = iter(torch.stack([v.detach().reshape(()).double() for v in remote]).cpu())
        values = tuple(next(fetched) if any(v is r for r in remote) else v for v in values)
    return [float(v) for v in values]


def global_norm(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """L2 norm over all tensors, as a float64 tensor (no host sync): one pass over each,
    summed in float32 (float64 for float64 tensors), one kernel per dtype and device."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
        group, 2.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)))
        for (_, dtype), group in groups.items()]
    if len(norms) == 1:
        return norms[0].double()
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.double().to(device) for n in norms]))


def make_scheduler(optimizer: torch.optim.Optimizer,
                   s: Settings) -> torch.optim.lr_scheduler.LRScheduler | None:
    match s.scheduler:
        case Scheduler.NONE:
            return None
        case Scheduler.WARMUP_COSINE:
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, functools.partial(warmup_cosine, s.warmup_steps, s.steps))
    unhandled(s.scheduler)


def warmup_cosine(warmup: int, total: int, k: int) -> float:
    """The factor on lr after k scheduler steps: 1/warmup, 2/warmup ... up to 1, then half a
    cosine that reaches 0 at step ``total``, and 0 after it (a schedule run past its end)."""
    if k < warmup:
        return (k + 1) / warmup
    progress = min(1.0, (k - warmup) / (total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


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
