"""One optimizer step under an arm's accumulation policy.

This is the only training loop in gradlab. Every pitfall an experiment shows
(forgetting to scale the loss, misplacing zero_grad, BatchNorm statistics) is a
value of a setting read here, never a copy of this code. Read ``train_step``
top to bottom: split, forward, scale, backward (N times), step, zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.spec import Settings

# called after each micro-batch backward with (micro_batch_index, model)
TraceHook = Callable[[int, nn.Module], None]


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean loss over the B examples, before the step
    grad_norm: float  # L2 norm of the gradient the optimizer applied (all parameters)
    update_norm: float  # L2 norm of the change in the parameters


def split(x: torch.Tensor, y: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """N micro-batches in order; when N does not divide B the sizes differ by at most one."""
    return list(zip(torch.tensor_split(x, n), torch.tensor_split(y, n), strict=True))


def loss_scale(s: Settings, micro_size: int) -> float:
    """What each micro-batch's mean loss is multiplied by before backward.

    by-size weights micro-batch i by n_i/B, so the accumulated gradient is the
    gradient of the mean over all B examples even when the micro-batches are
    uneven. by-count is the textbook loss/N, exact only when N divides B.
    """
    if s.loss_scale == "by-size":
        return micro_size / s.batch_size
    if s.loss_scale == "by-count":
        return 1.0 / s.accum_steps
    return 1.0  # "none": the bug, gradients come out N times too large


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    return loss_of(model(x), y, kind)


def loss_of(out: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean loss over the examples of predictions ``out`` against targets ``y``."""
    if kind == "cross_entropy":
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def set_train_mode(model: nn.Module, s: Settings) -> None:
    model.train()
    if s.bn_mode == "frozen":  # fixed running statistics: BN becomes a per-example affine map
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def accumulate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Settings, loss_kind: str,
               trace: TraceHook | None = None) -> float:
    """Forward and backward each micro-batch into ``.grad``; returns the mean loss over B.

    ``.grad`` is not cleared first: what it holds on entry is what the zero_grad
    policy left there. (model.zero_grad is optimizer.zero_grad here: the
    optimizer holds exactly the model's parameters.)
    """
    set_train_mode(model, s)
    total = 0.0
    for i, (xb, yb) in enumerate(split(x, y, s.accum_steps)):
        if s.zero_grad == "every-step":  # zero_grad before each batch: only the last survives
            model.zero_grad(set_to_none=s.set_to_none)
        loss = mean_loss(model, xb, yb, loss_kind)
        (loss * loss_scale(s, len(xb))).backward()
        total += loss.item() * len(xb)
        if trace is not None:
            trace(i, model)
        if s.zero_grad == "after-backward":  # the misplacement: wipes what backward computed
            model.zero_grad(set_to_none=s.set_to_none)
    return total / len(x)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, s: Settings, loss_kind: str,
               trace: TraceHook | None = None) -> StepStats:
    """One optimizer step on a batch of B examples, under the arm's policy."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss = accumulate(model, x, y, s, loss_kind, trace)
    grad_norm = global_norm([p.grad for p in params])
    optimizer.step()
    if s.zero_grad == "every-n":  # the accumulation pattern: clear once per optimizer step
        optimizer.zero_grad(set_to_none=s.set_to_none)
    update_norm = global_norm([p.detach() - b for p, b in zip(params, before, strict=True)])
    return StepStats(loss, grad_norm, update_norm)


def global_norm(tensors: list[torch.Tensor | None]) -> float:
    """L2 norm over all tensors, in float64 so low-precision arms are measured exactly."""
    squares = [t.detach().double().pow(2).sum() for t in tensors if t is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def make_optimizer(model: nn.Module, s: Settings) -> torch.optim.Optimizer:
    params = model.parameters()
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
