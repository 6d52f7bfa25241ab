"""The optimizer and the learning-rate schedule an arm steps with (gradlab makes one parameter
group, so the learning rate is one number)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from gradlab.config.settings import Optimizer, Scheduler, Settings
from gradlab.errors import unhandled


def learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the next optimizer.step() applies (gradlab makes one group)."""
    return float(optimizer.param_groups[0]["lr"])


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

