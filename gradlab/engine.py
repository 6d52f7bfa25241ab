"""One optimizer step under an arm's accumulation policy.

This is the only training loop in gradlab. Every pitfall an experiment shows
(forgetting to normalise the loss, misplacing zero_grad, BatchNorm statistics,
dividing by the wrong token count, a contrastive loss computed per micro-batch) is
a value of a setting read here, never a copy of this code. Read ``train_step`` top
to bottom: ``window_gradient`` (split the window, then forward, normalise and
backward each micro-batch, zero_grad where the policy puts it; or, for a loss that
couples the batch, GradCache's two passes), then step and zero.

The probe calls ``window_gradient`` as well, so a verdict sees everything the
step does to the gradient before the optimizer applies it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from gradlab.errors import unhandled
from gradlab.memory import SavedTensors
from gradlab.setup import Embeddings, Examples, Setup, num_examples, split
from gradlab.spec import Accumulation, BnMode, LossScale, Optimizer, Settings, ZeroGrad


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
    saved_bytes: float  # the most activation bytes autograd held at once (NaN: not measured)
    negatives: float  # coupled loss: other examples each example was scored against (else NaN)


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


def accumulation(s: Settings, setup: Setup) -> Accumulation:
    """The arm's accumulation, with auto resolved: GradCache only where it changes something
    (a loss that couples the batch, split into more than one micro-batch)."""
    match s.accumulation:
        case Accumulation.AUTO:
            return Accumulation.GRADCACHE if setup.coupled and s.accum_steps > 1 \
                else Accumulation.PLAIN
        case Accumulation.PLAIN | Accumulation.GRADCACHE:
            return s.accumulation
    unhandled(s.accumulation)


def window_gradient(model: nn.Module, window: Examples, s: Settings, setup: Setup,
                    watch: Watch | None = None) -> tuple[torch.Tensor, torch.Tensor | int]:
    """Backward each micro-batch of a window into ``.grad``; returns (summed loss, units).

    ``.grad`` is not cleared first: what it holds on entry is what the zero_grad
    policy left there. Both returned values stay on the device (no host sync).
    (model.zero_grad is optimizer.zero_grad here: the optimizer holds exactly the
    model's parameters.)
    """
    set_train_mode(model, s)
    micro_batches = split(window, s.accum_steps)
    window_units = sum(setup.count_units(mb) for mb in micro_batches)  # before any backward
    match accumulation(s, setup):
        case Accumulation.PLAIN:
            window_loss = plain(model, micro_batches, window_units, s, setup, watch)
        case Accumulation.GRADCACHE:
            window_loss = gradcache(model, micro_batches, window_units, s, setup, watch)
        case other:
            unhandled(other)
    return window_loss, window_units


def plain(model: nn.Module, micro_batches: list[Examples], window_units, s: Settings,
          setup: Setup, watch: Watch | None) -> torch.Tensor:
    """Forward, loss and backward one micro-batch at a time; returns the summed loss.

    A loss that couples the batch is computed inside each micro-batch here, so each
    example is scored against the B/N - 1 others of its micro-batch only.
    """
    window_loss = 0.0
    for i, micro_batch in enumerate(micro_batches):
        with zero_grad_around_backward(model, s, watch, i):
            loss, units = setup.batch_loss(model, micro_batch)
            normalised(loss, units, window_units, s).backward()
            window_loss = window_loss + loss.detach()
    return window_loss


def gradcache(model: nn.Module, micro_batches: list[Examples], window_units, s: Settings,
              setup: Setup, watch: Watch | None) -> torch.Tensor:
    """Exact accumulation of a loss that couples the batch (GradCache, Gao et al. 2021);
    returns the window's loss.

    1. Embed every micro-batch without a graph, noting the random state each forward
       starts from.
    2. The coupled loss of the whole window on those cached embeddings, and its
       gradient with respect to them (a graph only as large as the embeddings).
    3. Embed each micro-batch again, with a graph and from the same random state (so
       dropout draws the same masks and the embeddings are the cached ones), and
       backpropagate its slice of that gradient into the parameters.

    The parameters get the big batch's gradient while autograd holds the activations
    of one micro-batch at a time; the price is a second forward of every micro-batch.
    """
    device = next(model.parameters()).device
    states, cached = [], []
    with torch.no_grad():
        for micro_batch in micro_batches:
            states.append(rng_state(device))
            embeddings = setup.embed(model, micro_batch)
            cached.append(as_tuple(embeddings))
    window_embeddings = tuple(torch.cat(parts).requires_grad_()
                              for parts in zip(*cached, strict=True))
    one_tensor = isinstance(embeddings, torch.Tensor)  # as embed gave them: one, or a tuple
    loss, units = setup.coupled_loss(window_embeddings[0] if one_tensor else window_embeddings)
    (loss / window_units).backward()  # reaches the cached embeddings only: no parameter
    sizes = [num_examples(mb) for mb in micro_batches]
    slices = [e.grad.split(sizes) if e.grad is not None else [None] * len(sizes)
              for e in window_embeddings]  # None: the loss does not use that output
    for i, micro_batch in enumerate(micro_batches):
        with zero_grad_around_backward(model, s, watch, i):
            with replayed(states[i], device):
                embeddings = as_tuple(setup.embed(model, micro_batch))
            used = [(e, g[i]) for e, g in zip(embeddings, slices, strict=True)
                    if g[i] is not None]
            torch.autograd.backward([e for e, _ in used], [g for _, g in used])
    return loss.detach()


@contextlib.contextmanager
def zero_grad_around_backward(model: nn.Module, s: Settings, watch: Watch | None,
                              index: int) -> Iterator[None]:
    """One micro-batch's backward, with zero_grad where the policy puts it around it."""
    if s.zero_grad == ZeroGrad.EVERY_STEP:  # zero_grad before each backward: last one wins
        model.zero_grad(set_to_none=s.set_to_none)
    yield
    if watch is not None:
        watch.micro_batch(index)
    if s.zero_grad == ZeroGrad.AFTER_BACKWARD:  # the misplacement: wipes what backward did
        model.zero_grad(set_to_none=s.set_to_none)


def as_tuple(embeddings: Embeddings) -> tuple[torch.Tensor, ...]:
    return (embeddings,) if isinstance(embeddings, torch.Tensor) else tuple(embeddings)


def rng_state(device: torch.device) -> tuple:
    """The random state a forward starts from (the device's too on CUDA)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replayed(state: tuple, device: torch.device) -> Iterator[None]:
    """Draw random numbers as from ``state``; afterwards the streams are where they were."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1], device)
        yield


def micro_batch_sizes(batch_size: int, accum_steps: int) -> list[int]:
    """How split() cuts B examples into N: the first B mod N micro-batches hold one more."""
    size, extra = divmod(batch_size, accum_steps)
    return [size + (i < extra) for i in range(accum_steps)]


def negatives(s: Settings, setup: Setup) -> float:
    """For a loss that couples the batch: the other examples each example was scored
    against, averaged over the window's examples (B - 1 for the whole window, B/N - 1
    inside micro-batches); NaN for a loss computed per example."""
    if not setup.coupled:
        return math.nan
    match accumulation(s, setup):
        case Accumulation.PLAIN:
            sizes = micro_batch_sizes(s.batch_size, s.accum_steps)
            return sum(n * (n - 1) for n in sizes) / s.batch_size
        case Accumulation.GRADCACHE:
            return float(s.batch_size - 1)
    unhandled(s.accumulation)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, window: Examples,
               s: Settings, setup: Setup, watch: Watch | None = None,
               measure_memory: bool = True) -> StepStats:
    """One optimizer step on a window of B examples, under the arm's policy.

    ``measure_memory`` meters the activations autograd saves (gradlab.memory): a Python
    call per saved tensor, which slows a small model's step by about a fifth, so the
    runner asks for it only on the steps it probes.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    # activations only (parameters left out), and only this step's: observers that compute
    # gradients of their own (the probe) do it in watch.gradient(), after this
    meter = SavedTensors(exclude=params) if measure_memory else contextlib.nullcontext()
    with meter:
        loss, units = window_gradient(model, window, s, setup, watch)
    if watch is not None:
        watch.gradient()
    grad_norm = global_norm(p.grad for p in params)
    optimizer.step()
    if s.zero_grad == ZeroGrad.EVERY_N:  # the accumulation pattern: clear once per step
        optimizer.zero_grad(set_to_none=s.set_to_none)
    update_norm = global_norm(p.detach() - b for p, b in zip(params, before, strict=True))
    units = int(units)
    return StepStats(float(loss) / units, units, grad_norm, update_norm,
                     meter.peak if measure_memory else math.nan, negatives(s, setup))


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
