"""One optimizer step under an arm's accumulation policy.

This is the only training loop in gradlab. Every pitfall an experiment shows
(forgetting to normalise the loss, misplacing zero_grad, BatchNorm statistics,
dividing by the wrong token count, summing in bfloat16, clipping a scaled or a
partial gradient, stepping the LR scheduler per micro-batch, the short window at
an epoch's end, dropout masks, a contrastive loss computed per micro-batch) is a
value of a setting read here, never a copy of this code. Read ``train_step`` top
to bottom: ``window_gradient`` (split the window, then forward, normalise, scale
and backward each micro-batch, summing the partial gradients where the policy
says, zero_grad and clipping where the policy puts them, then unscale and clip
once; or, for a loss that couples the batch, GradCache's two passes), then step,
zero and the scheduler.

The probe calls ``window_gradient`` as well, so a verdict sees everything the
step does to the gradient before the optimizer applies it.

A data-parallel arm (world_size W > 1) trains a DistributedDataParallel replica
(gradlab.lab.distributed) on each of W ranks: ``window_gradient`` gives each rank its
own slice of the window, and the arm's sync policy decides which backward passes
all-reduce, in the same one path.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradlab.config.spec import (
    Accumulation,
    Autocast,
    BnMode,
    ClipAt,
    DropoutMasks,
    DropoutMode,
    EpochEnd,
    GradAccumDtype,
    GradScaling,
    LossScale,
    Optimizer,
    Scheduler,
    SchedulerStep,
    Settings,
    Sync,
    ZeroGrad,
)
from gradlab.errors import GradlabError, unhandled
from gradlab.setup import Embeddings, Examples, Setup, num_examples, split, split_at
from gradlab.train.dropout import example_keys
from gradlab.train.memory import SavedTensors
from gradlab.train.replica import Replica


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
    saved_bytes: float = math.nan  # the most activation bytes autograd held at once (NaN: not
    #                                measured)
    negatives: float = math.nan  # coupled loss: other examples each was scored against
    skipped: bool = False  # the GradScaler found inf/NaN and skipped optimizer.step()
    grad_scale: float = float("nan")  # what the GradScaler multiplied this window's losses by
    allreduces: int = 0  # gradient all-reduces across ranks (buckets), as DDP's hook counted
    seconds: float = math.nan  # wall time of the forward/backward passes and the step


class WindowGradient(NamedTuple):
    loss: torch.Tensor  # summed loss of the window, on the device
    units: torch.Tensor | int  # loss units in the window
    skip: bool  # the GradScaler found inf/NaN in .grad: the optimizer step will be skipped


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
    # a module in eval mode (a held-out evaluation, a policy below) turns every one back:
    # model.train() sets each module's flag through nn.Module.__setattr__, 6 times the cost
    # of reading the flags (44 µs against 7 µs for the mlp, in a step of 2.3 ms)
    if not all(module.training for module in model.modules()):
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
        case ClipAt.AFTER_ACCUMULATION | ClipAt.BEFORE_UNSCALE:
            return False
        case ClipAt.PER_MICRO_BATCH:  # the bug: .grad holds a partial sum, and it gets clipped
            return True
    unhandled(s.clip_at)


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


def check_gradcache(s: Settings, setup: Setup, where: str) -> None:
    """GradCache's two passes stand beside the plain loop, not inside it: they take the
    window as it is, in one process, in the parameters' own precision."""
    if accumulation(s, setup) != Accumulation.GRADCACHE:
        return
    plain = {"world_size": 1, "grad_scaler": GradScaling.OFF, "autocast": Autocast.NONE,
             "grad_accum_dtype": GradAccumDtype.PARAM, "epoch_end": EpochEnd.RUN_ON,
             "dropout_masks": DropoutMasks.STREAM}
    for key, value in plain.items():
        if getattr(s, key) != value:
            raise GradlabError(f"{where}: accumulation=gradcache with {key}={getattr(s, key)}: "
                               f"GradCache runs here with {key}={value} only; set it, or "
                               f"accumulation=plain")
    if s.clip_at == ClipAt.PER_MICRO_BATCH:
        raise GradlabError(f"{where}: accumulation=gradcache has no partial sums to clip "
                           f"(clip_at=per-micro-batch); use clip_at=after-accumulation")


def window_gradient(model: nn.Module, window: Examples, s: Settings, setup: Setup,
                    watch: Watch | None = None, *, optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> WindowGradient:
    """Backward each micro-batch of a window into ``.grad``, then unscale and clip: ``.grad``
    ends up holding what ``optimizer.step()`` will apply. Returns the summed loss, the units
    and whether the step will be skipped.

    ``.grad`` is not cleared first: what it holds on entry is what the zero_grad
    policy left there. The loss and units stay on the device (no host sync); with a
    GradScaler, deciding the skip reads one flag from it. (model.zero_grad is
    optimizer.zero_grad here: the optimizer holds exactly the model's parameters.)
    ``optimizer`` and ``scaler`` are needed with grad_scaler=on only: unscale_ works per
    optimizer, and every micro-batch of the window is scaled by the scaler's one scale.
    """
    if s.grad_scaler == GradScaling.ON and (scaler is None or optimizer is None):
        raise AssertionError("grad_scaler=on: window_gradient needs the arm's GradScaler "
                             "and optimizer")
    set_train_mode(model, s)
    if accumulation(s, setup) == Accumulation.GRADCACHE:  # a loss that couples the batch
        micro_batches = split(window, micro_batch_count(num_examples(window), s))
        window_units = sum(setup.count_units(mb) for mb in micro_batches)
        loss = gradcache(model, micro_batches, window_units, s, setup, watch)
        return WindowGradient(loss, window_units, unscale_and_clip(model, s, optimizer, scaler))
    rank, ranks = data_parallel_rank(model)
    keys = mask_keys(window, s)
    per_micro_batch_clip = clips_each_micro_batch(s)
    sums = PartialSums(model, s)
    parts = step_windows(window, s)
    losses, total_units, index, start = [], 0, 0, 0
    for p, part in enumerate(parts):
        every_rank = rank_micro_batches(part, micro_batch_count(num_examples(part), s), ranks)
        # the units of the whole window, every rank's slice, before any backward
        window_units = sum(setup.count_units(mb) for mine in every_rank for mb in mine)
        micro_batches = every_rank[rank]
        # where this rank's examples start in the window: each example's dropout key
        offset = start + sum(num_examples(mb) for mine in every_rank[:rank] for mb in mine)
        for i, micro_batch in enumerate(micro_batches):
            if s.zero_grad == ZeroGrad.EVERY_STEP:  # zero_grad before each backward: last wins
                sums.zero()
            size = num_examples(micro_batch)
            last = p == len(parts) - 1 and i == len(micro_batches) - 1
            # DDP decides at forward time whether the backward all-reduces: both go inside
            with synced(model, s, last):
                with example_keys(model, None if keys is None else keys[offset:offset + size]), \
                        forward_precision(s, setup):
                    # a coupled loss: each example scored against its micro-batch's only
                    loss, units = setup.batch_loss(model, micro_batch)
                sums.before_backward()
                scaled(normalised(loss, units, window_units, s, ranks), s, scaler).backward()
            sums.after_backward()
            if per_micro_batch_clip:
                clip(model, s)
            losses.append(loss.detach())
            if watch is not None:
                watch.micro_batch(index)
            if s.zero_grad == ZeroGrad.AFTER_BACKWARD:  # the misplacement: wipes what backward did
                sums.zero()
            index, offset = index + 1, offset + size
        total_units = total_units + window_units
        start += num_examples(part)
    skip = unscale_and_clip(model, s, optimizer, scaler)
    # summed once, on the device; a float16 loss under autocast in float32, float64 as it is
    summed_in = torch.promote_types(losses[0].dtype, torch.float32)
    window_loss = losses[0].to(summed_in) if len(losses) == 1 \
        else torch.stack(losses).sum(dtype=summed_in)
    return WindowGradient(window_loss, total_units, skip)


def forward_precision(s: Settings, setup: Setup) -> contextlib.AbstractContextManager:
    """What a micro-batch's forward runs under: torch.autocast (on the model's device), or
    nothing."""
    match s.autocast:
        case Autocast.NONE:
            return contextlib.nullcontext()
        case Autocast.BFLOAT16:
            return torch.autocast(setup.device.type, dtype=torch.bfloat16)
        case Autocast.FLOAT16:
            return torch.autocast(setup.device.type, dtype=torch.float16)
    unhandled(s.autocast)


def scaled(loss: torch.Tensor, s: Settings, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """The loss to backward: multiplied by the GradScaler's scale (the same for every
    micro-batch of a window: the scale changes only in update(), once per window)."""
    match s.grad_scaler:
        case GradScaling.OFF:
            return loss
        case GradScaling.ON:
            return scaler.scale(loss)
    unhandled(s.grad_scaler)


class PartialSums:
    """Where the partial gradients of a window add up, under grad_accum_dtype.

    param: backward adds into .grad itself, so each of the N additions rounds in the
    parameters' dtype (u = 2^-8 in bfloat16). float32: each partial gradient is moved
    out of .grad into a float32 buffer right after its backward, and .grad gets the
    buffer rounded to the parameters' dtype: the sum rounds at 2^-24, and the
    parameters' dtype rounds it once. The buffer starts from what the zero_grad policy
    left in .grad; a zero_grad inside the window clears it too.
    """

    def __init__(self, model: nn.Module, s: Settings):
        self.model, self.s = model, s
        match s.grad_accum_dtype:
            case GradAccumDtype.PARAM:
                self.buffer = None
            case GradAccumDtype.FLOAT32:
                self.params = [p for p in model.parameters() if p.requires_grad]
                self.buffer = [torch.zeros_like(p, dtype=torch.float32) if p.grad is None
                               else p.grad.detach().to(torch.float32, copy=True)
                               for p in self.params]
            case _:
                unhandled(s.grad_accum_dtype)

    def zero(self) -> None:
        self.model.zero_grad(set_to_none=self.s.set_to_none)
        if self.buffer is not None:
            for total in self.buffer:
                total.zero_()

    def before_backward(self) -> None:
        if self.buffer is not None:  # .grad holds only the buffer's rounded copy: drop it
            for p in self.params:
                p.grad = None

    def after_backward(self) -> None:
        if self.buffer is not None:
            for p, total in zip(self.params, self.buffer, strict=True):
                if p.grad is not None:
                    total.add_(p.grad.detach().to(torch.float32))
                p.grad = total.to(p.dtype, copy=True)


def unscale_and_clip(model: nn.Module, s: Settings, optimizer: torch.optim.Optimizer | None,
                     scaler: torch.amp.GradScaler | None) -> bool:
    """Once per window, after the last backward: the GradScaler's unscale_ and clipping, in
    the order clip_at puts them. Returns True when the step will be skipped: with a
    GradScaler, a gradient holding inf or NaN (scaler.step() skips it, update() backs off)."""
    match s.clip_at:
        case ClipAt.AFTER_ACCUMULATION:
            unscale(s, optimizer, scaler)
            clip(model, s)
        case ClipAt.BEFORE_UNSCALE:  # the mistake: clip_norm meets scale × gradient
            clip(model, s)
            unscale(s, optimizer, scaler)
        case ClipAt.PER_MICRO_BATCH:  # clipped already, each partial sum as it came
            unscale(s, optimizer, scaler)
        case _:
            unhandled(s.clip_at)
    match s.grad_scaler:
        case GradScaling.OFF:  # nothing checks: inf and NaN reach the optimizer
            return False
        case GradScaling.ON:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            return bool(grads) and not bool(torch.stack([g.isfinite().all() for g in grads]).all())
    unhandled(s.grad_scaler)


def unscale(s: Settings, optimizer: torch.optim.Optimizer | None,
            scaler: torch.amp.GradScaler | None) -> None:
    match s.grad_scaler:
        case GradScaling.OFF:
            pass
        case GradScaling.ON:
            scaler.unscale_(optimizer)
        case _:
            unhandled(s.grad_scaler)


def clip(model: nn.Module, s: Settings) -> None:
    if s.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       s.clip_norm)


def rank_micro_batches(window: Examples, n: int, ranks: int) -> list[list[Examples]]:
    """The window's micro-batches, rank by rank: each of the W ranks takes its own slice of
    the window, in order, and splits it into N, so the ranks together see every example of
    the window once (W = 1: the window's N micro-batches)."""
    return [split(part, n) for part in split(window, ranks)]  # (split(window, 1): [window])


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


def set_rng_state(state: tuple, device: torch.device) -> None:
    """Put back a state rng_state took."""
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def replayed(state: tuple, device: torch.device) -> Iterator[None]:
    """Draw random numbers as from ``state``; afterwards the streams are where they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        set_rng_state(state, device)
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
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
               scaler: torch.amp.GradScaler | None = None,
               measure_memory: bool = False) -> StepStats:
    """One optimizer step on a window of B examples, under the arm's policy.

    What it measures costs next to nothing: the loss is summed on the device and the
    gradient norm taken in one pass over .grad, then both come to the host once per
    step. Only the update norm needs a copy of every parameter, so it is taken only
    where the arm asks for it (s.update_norm). ``measure_memory`` meters the
    activations autograd saves (gradlab.train.memory): a Python call per saved tensor, which
    slows a small model's step by about a fifth, so the runner asks for it only on the
    steps it probes.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params] if s.update_norm else None
    allreduces = allreduce_calls(model)
    stopwatch = Stopwatch(params, s.time_steps)
    grad_scale = scaler.get_scale() if scaler is not None else math.nan
    # activations only (parameters left out), and only this step's: observers that compute
    # gradients of their own (the probe) do it in watch.gradient(), after this
    meter = SavedTensors(exclude=params) if measure_memory else contextlib.nullcontext()
    with stopwatch, meter:
        loss, units, skip = window_gradient(model, window, s, setup, watch, optimizer=optimizer,
                                            scaler=scaler)
    if watch is not None:  # what the watch does is not the step's cost
        watch.gradient()
    grad_norm = global_norm(p.grad for p in params)
    lr = learning_rate(optimizer)
    with stopwatch:
        step(optimizer, s, scaler)
        if s.zero_grad == ZeroGrad.EVERY_N:  # the accumulation pattern: clear once per step
            optimizer.zero_grad(set_to_none=s.set_to_none)
    if scheduler is not None:
        for _ in range(scheduler_steps(window, s)):
            scheduler.step()
    update_norm = math.nan
    if before is not None:
        torch._foreach_sub_(before, [p.detach() for p in params])  # before - after, in place
        update_norm = global_norm(before)
    loss, units, grad_norm, update_norm = to_host(summed_over_ranks(loss, model), units,
                                                  grad_norm, update_norm)
    return StepStats(loss / units, int(units), grad_norm, update_norm, lr, num_examples(window),
                     meter.peak if measure_memory else math.nan, negatives(s, setup), skip,
                     grad_scale, allreduce_calls(model) - allreduces, stopwatch.seconds)


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


def step(optimizer: torch.optim.Optimizer, s: Settings,
         scaler: torch.amp.GradScaler | None) -> None:
    """optimizer.step(); with a GradScaler, its step (none when unscale_ found inf/NaN) and
    the one update of the scale per window."""
    match s.grad_scaler:
        case GradScaling.OFF:
            optimizer.step()
        case GradScaling.ON:
            scaler.step(optimizer)
            scaler.update()
        case _:
            unhandled(s.grad_scaler)


def make_scaler(s: Settings, device: torch.device,
                like: torch.amp.GradScaler | None = None) -> torch.amp.GradScaler | None:
    """The arm's GradScaler (None with grad_scaler=off). ``like``: a new scaler holding another's
    state (its scale and growth count), so a probe computes with an arm's current scale
    without touching that arm's scaler (unscale_ records state per optimizer in it)."""
    match s.grad_scaler:
        case GradScaling.OFF:
            return None
        case GradScaling.ON:
            scaler = torch.amp.GradScaler(device.type)
            if like is not None:
                scaler.load_state_dict(like.state_dict())
            return scaler
    unhandled(s.grad_scaler)


def check_precision_support(s: Settings, device: torch.device) -> None:
    """What this torch supports on this device: autocast in the dtype asked for, and a
    GradScaler (torch.amp.GradScaler on the CPU came with torch 2.3)."""
    if s.autocast != Autocast.NONE and not autocast_supported(device.type, s.autocast):
        raise GradlabError(f"autocast={s.autocast} is not supported on {device.type} by this "
                           f"torch ({torch.__version__}); use autocast=bfloat16, autocast=none, "
                           f"or device=cuda")
    if s.grad_scaler == GradScaling.ON and not scaler_supported(device.type):
        raise GradlabError(f"grad_scaler=on: this torch ({torch.__version__}) has no GradScaler "
                           f"for {device.type}; use device=cuda, or torch >= 2.3 for the CPU "
                           f"one, or grad_scaler=off")


AUTOCAST_DTYPES = {Autocast.BFLOAT16: torch.bfloat16, Autocast.FLOAT16: torch.float16}


def autocast_supported(device_type: str, autocast: Autocast) -> bool:
    """Does torch.autocast run in this dtype on this device? (Where it does not, it warns and
    turns itself off.)"""
    dtype = AUTOCAST_DTYPES[autocast]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type, dtype=dtype):
                return torch.is_autocast_enabled(device_type) \
                    and torch.get_autocast_dtype(device_type) == dtype
    except (RuntimeError, AttributeError, TypeError):
        return False


def scaler_supported(device_type: str) -> bool:
    """Is there a working GradScaler for this device? (One without it disables itself.)"""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.amp.GradScaler(device_type).is_enabled()
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return False


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
