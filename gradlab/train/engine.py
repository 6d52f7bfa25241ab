"""One optimizer step under an arm's accumulation policy.

This is the only training loop in gradlab. Every pitfall an experiment shows
(forgetting to normalise the loss, misplacing zero_grad, BatchNorm statistics,
dividing by the wrong token count, summing in bfloat16, clipping a scaled or a
partial gradient, stepping the LR scheduler per micro-batch, the short window at
an epoch's end, dropout masks, a contrastive loss computed per micro-batch) is a
value of a setting read here, never a copy of this code. Read ``train_step`` top
to bottom: ``window_gradient`` (``plan_window`` cuts the window into micro-batches
first; then the loop forwards, normalises, scales and backwards each, inside
``PartialSums.micro_batch``, which puts zero_grad, the sum and per-micro-batch
clipping where the policy says; then unscale and clip once; or, for a loss that
couples the batch, GradCache's two passes in gradlab.train.gradcache), then step,
zero and the scheduler.

The probe calls ``window_gradient`` as well, so a verdict sees everything the
step does to the gradient before the optimizer applies it.

A data-parallel arm (world_size W > 1) trains a DistributedDataParallel replica, or FSDP2's
shards of the model (gradlab.train.replica), on each of W ranks (gradlab.lab.distributed):
``plan_window`` gives each rank its own slice of the window, and the arm's sync policy
decides which backward passes reduce across the ranks, in the same one path. Mixed
precision (autocast, the GradScaler) is in gradlab.train.amp, the optimizer and schedule in
gradlab.train.optim.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import nn

from gradlab.config.settings import (
    Accumulation,
    BnMode,
    ClipAt,
    DropoutMasks,
    DropoutMode,
    EpochEnd,
    GradAccumDtype,
    GradScaling,
    LossScale,
    RankSplit,
    SchedulerStep,
    Settings,
    WindowOrder,
    ZeroGrad,
)
from gradlab.errors import GradlabError, unhandled
from gradlab.setup import IGNORE_INDEX, Examples, Setup, num_examples, split, split_at, take
from gradlab.train import amp, gradcache, optim, replica
from gradlab.train.dropout import example_keys
from gradlab.train.memory import SavedTensors


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
    allreduce_bytes: int = 0  # the bytes of the buckets those all-reduces reduced
    reduce_scatters: float = 0  # FSDP's gradient reduce-scatters (NaN: this torch cannot count)
    reduce_scatter_bytes: float = 0  # the bytes of the gradients they reduced
    seconds: float = math.nan  # wall time of the forward/backward passes and the step


class WindowGradient(NamedTuple):
    loss: torch.Tensor  # summed loss of the window, on the device
    units: torch.Tensor | int  # loss units in the window
    skip: bool  # the GradScaler found inf/NaN in .grad: the optimizer step will be skipped


def normalised(loss: torch.Tensor, units, window_units, s: Settings,
               ranks: int = 1, rank_units=None) -> torch.Tensor:
    """A micro-batch's summed loss, divided as the arm's loss_scale says.

    by-size divides by the units of the whole window, so the N backward passes add
    up to the gradient of the window's mean loss per unit even when micro-batches
    hold different numbers of examples or tokens (transformers' num_items_in_batch).
    by-count takes each micro-batch's own mean and divides by N: exact only when
    every micro-batch holds the same number of units.

    With W ranks, DDP's all-reduce takes the mean of the ranks' gradients, so by-size
    counts each rank's share W times (as transformers does under DDP), while by-count's
    mean of micro-batch means is what DDP's mean over ranks completes (nanoGPT's loss/N).
    by-rank-size divides by this rank's own units of the window (``rank_units``) and leaves
    the rest to DDP's mean: each rank's tokens then weigh by how many fell on the other
    ranks, the multi-GPU half of the 2024 token bug. by-size-then-mean divides by the whole
    window's units as one process would, and DDP's (or FSDP's) mean divides by W again.
    """
    match s.loss_scale:
        case LossScale.BY_SIZE:
            return (loss * ranks if ranks > 1 else loss) / window_units
        case LossScale.BY_COUNT:
            return loss / (units * s.accum_steps)
        case LossScale.BY_RANK_SIZE:
            return loss / (window_units if rank_units is None else rank_units)
        case LossScale.BY_SIZE_THEN_MEAN:  # the bug: no ×W against the ranks' mean
            return loss / window_units
        case LossScale.NONE:  # the bug: N means added up, gradients N times too large
            return loss / units
    unhandled(s.loss_scale)


def set_train_mode(model: nn.Module, s: Settings) -> None:
    # a module in eval mode (a held-out evaluation, a policy below) turns every one back:
    # model.train() sets each module's flag through nn.Module.__setattr__, several times the
    # cost of reading the flags (figures in benchmarks/RESULTS.md, "Costs inside a step")
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


class MicroBatch(NamedTuple):
    """One forward and backward of a window, as planned before the loop."""
    examples: Examples
    keys: torch.Tensor | None  # each example's dropout key (None: masks from the stream)
    window_units: torch.Tensor | int  # what the loss is divided by: its window's units, all ranks'
    rank_units: torch.Tensor | int  # this rank's units of the window (by-rank-size divides by it)
    last: bool  # the window's last backward (where no_sync lets DDP all-reduce)


class WindowPlan(NamedTuple):
    micro_batches: list[MicroBatch]  # this rank's, in the order they run
    units: torch.Tensor | int  # loss units in the windows the step applies, every rank's


def plan_window(window: Examples, s: Settings, setup: Setup, rank: int,
                ranks: int) -> WindowPlan:
    """This rank's micro-batches of a window, each with what its backward needs, so the loop
    only runs them. Each window the step applies (step_windows) is cut into its micro-batches
    and normalised by its own units; with W ranks each rank takes its slice, in order, and
    its examples' dropout keys are their places in the whole window."""
    window = ordered(window, s, setup)
    keys = mask_keys(window, s)  # one draw from the arm's stream per step, before any forward
    planned, units, start = [], 0, 0
    for part in step_windows(window, s):
        every_rank = rank_micro_batches(part, micro_batch_count(num_examples(part), s), ranks,
                                        s.rank_split)
        part_units = sum(setup.count_units(mb) for mine in every_rank for mb in mine)
        rank_units = sum(setup.count_units(mb) for mb in every_rank[rank])
        offset = start if s.rank_split == RankSplit.TOKENS else \
            start + sum(num_examples(mb) for mine in every_rank[:rank] for mb in mine)
        for micro_batch in every_rank[rank]:
            size = num_examples(micro_batch)
            mine = None if keys is None else keys[offset:offset + size]
            planned.append(MicroBatch(micro_batch, mine, part_units, rank_units, last=False))
            offset += size
        units, start = units + part_units, start + num_examples(part)
    planned[-1] = planned[-1]._replace(last=True)
    return WindowPlan(planned, units)


def ordered(window: Examples, s: Settings, setup: Setup) -> Examples:
    """The window in the order its ranks and micro-batches take it (window_order)."""
    match s.window_order:
        case WindowOrder.AS_DRAWN:
            return window
        case WindowOrder.BY_LENGTH:  # a stable sort: equal lengths keep the stream's order
            units = torch.tensor([int(setup.count_units(example))
                                  for example in split(window, num_examples(window))])
            return take(window, torch.sort(units, stable=True).indices.to(setup.device))
    unhandled(s.window_order)


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
    sums = PartialSums(model, s, watch)
    if gradcache.accumulation(s, setup) == Accumulation.GRADCACHE:  # a loss coupling the batch
        micro_batches = split(window, micro_batch_count(num_examples(window), s))
        window_units = sum(setup.count_units(mb) for mb in micro_batches)
        loss = gradcache.gradcache(model, micro_batches, window_units, setup, sums.micro_batch)
        return WindowGradient(loss, window_units, unscale_and_clip(model, s, optimizer, scaler))
    rank, ranks = replica.data_parallel_rank(model)
    plan = plan_window(window, s, setup, rank, ranks)
    losses = []
    for index, micro_batch in enumerate(plan.micro_batches):
        with sums.micro_batch(index):  # zero_grad where the policy puts it; the sum; the clip
            # DDP decides at forward time whether the backward all-reduces: both go inside
            with replica.synced(model, s, micro_batch.last):
                with example_keys(model, micro_batch.keys), amp.forward_precision(s, setup):
                    # a coupled loss: each example scored against its micro-batch's only
                    loss, units = setup.batch_loss(model, micro_batch.examples)
                loss_to_backward = normalised(loss, units, micro_batch.window_units, s, ranks,
                                              micro_batch.rank_units)
                amp.scaled(loss_to_backward, s, scaler).backward()
        losses.append(loss.detach())
    skip = unscale_and_clip(model, s, optimizer, scaler)
    # summed once, on the device; a float16 loss under autocast in float32, float64 as it is
    summed_in = torch.promote_types(losses[0].dtype, torch.float32)
    window_loss = losses[0].to(summed_in) if len(losses) == 1 \
        else torch.stack(losses).sum(dtype=summed_in)
    return WindowGradient(window_loss, plan.units, skip)


class PartialSums:
    """Where the partial gradients of a window add up: under grad_accum_dtype, cleared where
    the zero_grad policy says inside the window, clipped each where clip_at says.

    param: backward adds into .grad itself, so each of the N additions rounds in the
    parameters' dtype (u = 2^-8 in bfloat16). float32: each partial gradient is moved
    out of .grad into a float32 buffer right after its backward, and .grad gets the
    buffer rounded to the parameters' dtype: the sum rounds at 2^-24, and the
    parameters' dtype rounds it once. The buffer starts from what the zero_grad policy
    left in .grad; a zero_grad inside the window clears it too.
    """

    def __init__(self, model: nn.Module, s: Settings, watch: Watch | None):
        self.model, self.s, self.watch = model, s, watch
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

    @contextlib.contextmanager
    def micro_batch(self, index: int) -> Iterator[None]:
        """Around micro-batch ``index``'s forward and backward (the plain loop's and
        GradCache's second pass alike): zero_grad where the policy puts it, the partial
        gradient added into the sum, clipped if clip_at says so, then shown to the watch."""
        if self.s.zero_grad == ZeroGrad.EVERY_STEP:  # zero_grad before each backward: last wins
            self.zero()
        if self.buffer is not None:  # .grad holds only the buffer's rounded copy: drop it
            for p in self.params:
                p.grad = None
        yield
        if self.buffer is not None:
            for p, total in zip(self.params, self.buffer, strict=True):
                if p.grad is not None:
                    total.add_(p.grad.detach().to(torch.float32))
                p.grad = total.to(p.dtype, copy=True)
        if clips_each_micro_batch(self.s):  # the bug: .grad holds a partial sum, and is clipped
            clip(self.model, self.s)
        if self.watch is not None:
            self.watch.micro_batch(index)
        if self.s.zero_grad == ZeroGrad.AFTER_BACKWARD:  # the misplacement: wipes the backward
            self.zero()

    def zero(self) -> None:
        self.model.zero_grad(set_to_none=self.s.set_to_none)
        if self.buffer is not None:
            for total in self.buffer:
                total.zero_()


def unscale_and_clip(model: nn.Module, s: Settings, optimizer: torch.optim.Optimizer | None,
                     scaler: torch.amp.GradScaler | None) -> bool:
    """Once per window, after the last backward: the GradScaler's unscale_ and clipping, in
    the order clip_at puts them. Returns True when the step will be skipped: with a
    GradScaler, a gradient holding inf or NaN (scaler.step() skips it, update() backs off)."""
    match s.clip_at:
        case ClipAt.AFTER_ACCUMULATION:
            amp.unscale(s, optimizer, scaler)
            clip(model, s)
        case ClipAt.BEFORE_UNSCALE:  # the mistake: clip_norm meets scale × gradient
            clip(model, s)
            amp.unscale(s, optimizer, scaler)
        case ClipAt.PER_MICRO_BATCH:  # clipped already, each partial sum as it came
            amp.unscale(s, optimizer, scaler)
        case _:
            unhandled(s.clip_at)
    match s.grad_scaler:
        case GradScaling.OFF:  # nothing checks: inf and NaN reach the optimizer
            return False
        case GradScaling.ON:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            return bool(grads) and not bool(torch.stack([g.isfinite().all() for g in grads]).all())
    unhandled(s.grad_scaler)


def clip(model: nn.Module, s: Settings) -> None:
    if s.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       s.clip_norm)


def rank_micro_batches(window: Examples, n: int, ranks: int,
                       by: RankSplit = RankSplit.EXAMPLES) -> list[list[Examples]]:
    """The window's micro-batches, rank by rank: each of the W ranks takes its own slice of
    the window, in order, and splits it into N, so the ranks together see every example of
    the window once (W = 1: the window's N micro-batches). Split by tokens, each rank takes
    every sequence with only its own shard of the positions scored (context_shard)."""
    match by:
        case RankSplit.EXAMPLES:
            parts = split(window, ranks)  # (split(window, 1): [window])
        case RankSplit.TOKENS:
            parts = [context_shard(window, rank, ranks) for rank in range(ranks)]
        case _:
            unhandled(by)
    return [split(part, n) for part in parts]


def context_shard(window: Examples, rank: int, ranks: int) -> Examples:
    """Context parallelism in miniature: rank r of W scores the r-th of W contiguous shards of
    the positions of every sequence (their labels; the others become IGNORE_INDEX). Every
    rank still reads whole sequences (real context parallelism passes attention's keys and
    values between the ranks instead), so the shards' losses add up to the window's, and the
    later shards hold fewer tokens: sequences end in padding."""
    if not isinstance(window, dict) or "labels" not in window:
        raise GradlabError("rank_split=tokens shards the positions of token sequences, so it "
                           "needs a token setup (batches with 'labels', as the docstrings "
                           "dataset); use rank_split=examples")
    labels = window["labels"]
    mine = torch.zeros(labels.shape[1], dtype=torch.bool, device=labels.device)
    mine[torch.tensor_split(torch.arange(labels.shape[1]), ranks)[rank]] = True
    return {**window, "labels": labels.masked_fill(~mine, IGNORE_INDEX)}


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
    match gradcache.accumulation(s, setup):
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
    activations autograd saves (gradlab.train.memory): a Python call per saved tensor,
    a cost a small model's step notices (benchmarks/RESULTS.md, "Costs inside a step"),
    so the lab asks for it only on the steps it probes.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # a sharded model's norms: of this rank's shards, then over the ranks (norm_over_shards)
    before = [replica.local(p).detach().clone() for p in params] if s.update_norm else None
    counted = replica.reduction_counts(model)
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
    grad_norm = replica.norm_over_shards(global_norm(replica.local(p.grad) for p in params),
                                         model)
    lr = optim.learning_rate(optimizer)
    with stopwatch:
        step(optimizer, s, scaler)
        if s.zero_grad == ZeroGrad.EVERY_N:  # the accumulation pattern: clear once per step
            optimizer.zero_grad(set_to_none=s.set_to_none)
    if scheduler is not None:
        for _ in range(scheduler_steps(window, s)):
            scheduler.step()
    update_norm = math.nan
    if before is not None:
        # before - after, in place
        torch._foreach_sub_(before, [replica.local(p).detach() for p in params])
        update_norm = replica.norm_over_shards(global_norm(before), model)
    loss, units, grad_norm, update_norm = to_host(replica.summed_over_ranks(loss, model), units,
                                                  grad_norm, update_norm)
    allreduces, allreduce_bytes, reduce_scatters, reduce_scatter_bytes = (
        now - was for now, was in zip(replica.reduction_counts(model), counted, strict=True))
    return StepStats(loss / units, int(units), grad_norm, update_norm, lr, num_examples(window),
                     meter.peak if measure_memory else math.nan, negatives(s, setup), skip,
                     grad_scale, allreduces, allreduce_bytes, reduce_scatters,
                     reduce_scatter_bytes, stopwatch.seconds)


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


def scheduler_steps(window: Examples, s: Settings) -> int:
    """How many times scheduler.step() runs for one optimizer step."""
    match s.scheduler_step:
        case SchedulerStep.PER_STEP:
            return 1
        case SchedulerStep.PER_MICRO_BATCH:  # the bug: called next to backward(), not step()
            return sum(micro_batch_count(num_examples(part), s)
                       for part in step_windows(window, s))
    unhandled(s.scheduler_step)


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


