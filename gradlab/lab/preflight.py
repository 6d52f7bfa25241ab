"""Before anything is written: build each distinct setup once, check that its model, loss and
micro-batches fit the arm's settings (one clear line when they do not), time one window, and
estimate the run's time and memory.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import nn

from gradlab.config.settings import (
    PREFLIGHT_BLIND,
    Accumulation,
    BnMode,
    Dtype,
    GradScaling,
    Optimizer,
    Parallel,
    Settings,
    Sync,
)
from gradlab.config.spec import Arm, Trial
from gradlab.errors import GradlabError, out_of_memory, unhandled
from gradlab.lab import setups
from gradlab.lab.device import configure, resolve_device
from gradlab.lab.plan import Plan, probe_due
from gradlab.lab.probing import low_precision, precision
from gradlab.setup import (
    Setup,
    cross_entropy_loss,
    mse_loss,
    num_examples,
    take,
)
from gradlab.train import amp, engine, gradcache, optim

# bytes a trace row and a probe row take in memory (a dict of a dozen small Python objects)
ROW_BYTES = 1000


def preflight(trials: list[Trial]) -> Plan:
    """Build each distinct setup once, run and time one window through it, before anything
    is written: bad input fails fast and clean, and the run's cost is estimated."""
    for device in {resolve_device(a.settings.device) for t in trials for a in t.arms}:
        configure(device)
    cache: dict = {}
    # setup -> (seconds per window, bytes of its parameters, number of parameter tensors)
    measured: dict[tuple, tuple[float, int, int]] = {}
    trial_seconds, worst_trial = [], 0
    notes: dict[str, str] = {}  # arm -> its note (one per arm, whatever the number of trials)
    for trial in trials:
        trial_bytes = probe_bytes = 0
        seconds = 0.0
        for arm in trial.arms:
            s = arm.settings
            key = tuple((k, v) for k, v in dataclasses.asdict(s).items()
                        if k not in PREFLIGHT_BLIND)
            if key not in measured:
                setup = setups.build_setup(s, resolve_device(s.device), cache)
                check_setup(arm, setup)
                if arm.name not in notes and splits_coupled_loss(s, setup):
                    notes[arm.name] = (
                        f"note: arm '{arm.name}': the setup's loss couples the batch and "
                        f"accumulation=plain computes it inside each micro-batch, so each "
                        f"example meets B/N - 1 others instead of B - 1: not the big batch's "
                        f"gradient (accumulation=gradcache is)")
                tensors = list(setup.model.parameters())
                try:
                    step_seconds = time_one_window(setup, s)
                except Exception as err:  # the forward passed check_setup: backward failed
                    if (memory := out_of_memory(err)) is not None:
                        raise GradlabError(
                            f"arm '{arm.name}': {memory} in one window's forward and backward "
                            f"(batch_size={s.batch_size}, {s.dtype}); lower batch_size or "
                            f"use a smaller model") from None
                    raise GradlabError(f"arm '{arm.name}': backward through the model and loss "
                                       f"failed: {type(err).__name__}: {err}") from None
                measured[key] = (step_seconds,
                                 sum(p.numel() * p.element_size() for p in tensors), len(tensors))
            step_seconds, params, tensors = measured[key]
            probes = 0 if arm.baseline else len([t for t in range(1, s.steps + 1)
                                                 if probe_due(s, t)])
            exact = 2 * probes if s.dtype != Dtype.FLOAT64 else 0  # the float64 reference
            # the big batch in the arm's precision (its floor), and Σ|g_i| in float64
            floor = probes if precision(s) != precision(trial.baseline.settings) else 0
            conditions = 2 * probes if any(low_precision(a.settings) for a in trial.arms) else 0
            seconds += (s.steps + probes + exact + floor + conditions) * step_seconds
            # weights and .grad, the optimizer's state, the step's copy for update_norm
            trial_bytes += (2 + optimizer_copies(s) + s.update_norm) * params
            if probes:  # one arm's gradient at a time; in float64 (2x float32) the exact
                # gradient and Σ|g_i|'s sums; a model in the arm's precision for its floor
                probe_bytes = max(probe_bytes, params + (6 * params if exact else 0)
                                  + (3 * params if floor else 0))
            traced = s.trace * s.steps * (s.accum_steps + 1) * s.trace_elements
            trial_bytes += ROW_BYTES * traced * tensors
        worst_trial = max(worst_trial, trial_bytes + probe_bytes)
        trial_seconds.append(seconds)
    plan = Plan(len(trials), sum(len(t.arms) for t in trials), sum(trial_seconds), worst_trial,
                available_memory(), list(notes.values()), trial_seconds)
    if plan.available_bytes is not None and plan.memory_bytes > 0.8 * plan.available_bytes:
        raise GradlabError(
            f"this run needs about {plan.memory_bytes / 2**30:.1f} GiB per trial but the "
            f"machine has {plan.available_bytes / 2**30:.1f} GiB available; use a smaller "
            f"model, fewer arms, or trace=false (or fewer trace_elements)")
    return plan


def splits_coupled_loss(s: Settings, setup: Setup) -> bool:
    """Would this arm compute a loss that couples the batch inside micro-batches?"""
    return setup.coupled and s.accum_steps > 1 \
        and gradcache.accumulation(s, setup) == Accumulation.PLAIN


def optimizer_copies(s: Settings) -> int:
    """Copies of the parameters the optimizer keeps: momentum, or Adam's two moments."""
    match s.optimizer:
        case Optimizer.SGD:
            return 1 if s.momentum else 0
        case Optimizer.ADAM | Optimizer.ADAMW:
            return 2
    unhandled(s.optimizer)


def time_one_window(setup: Setup, s: Settings) -> float:
    """Seconds for one window's forward and backward (the second of two: the first warms up)."""
    window = take(setup.train, torch.arange(s.batch_size).to(setup.device))
    seconds = []
    # an optimizer only for a GradScaler's unscale_: building one imports torch._dynamo
    # (a second's imports), which a run whose trials go to worker processes never needs here
    optimizer = optim.make_optimizer(setup.model, s) if s.grad_scaler == GradScaling.ON \
        else None
    with torch.random.fork_rng(devices=[]):
        for _ in range(2):
            start = time.perf_counter()
            engine.window_gradient(setup.model, window, s, setup, optimizer=optimizer,
                                   scaler=amp.make_scaler(s, setup.device))
            seconds.append(time.perf_counter() - start)
    setup.model.zero_grad(set_to_none=True)
    return seconds[-1]


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_setup(arm: Arm, setup: Setup) -> None:
    s, name = arm.settings, f"arm '{arm.name}'"
    if not any(p.requires_grad for p in setup.model.parameters()):
        frozen = sum(1 for _ in setup.model.parameters())
        what = (f"all {frozen} of its parameters are frozen (requires_grad=False)" if frozen
                else "it has no parameters")
        raise GradlabError(f"{name}: the model has nothing to train: {what}, so there is no "
                           f"gradient to accumulate; give a model with trainable parameters")
    n = num_examples(setup.train)
    if n < s.batch_size:
        raise GradlabError(f"{name}: batch_size={s.batch_size} but the training set has {n} "
                           f"examples; use a smaller batch_size")
    has_bn1d = any(isinstance(m, nn.BatchNorm1d) for m in setup.model.modules())
    smallest = setups.smallest_micro_batch(n, s)
    if has_bn1d and smallest == 1 and s.bn_mode == BnMode.TRAIN:
        short = n % s.batch_size
        at_end = smallest < s.batch_size // (s.accum_steps * s.world_size)  # an epoch's end
        ranks = f", world_size={s.world_size}" if s.world_size > 1 else ""
        where = f"{n} examples in windows of batch_size={s.batch_size} leave {short} at " \
                f"each epoch's end, epoch_end={s.epoch_end}" \
            if at_end else f"batch_size={s.batch_size}, accum_steps={s.accum_steps}{ranks}"
        fix = "another batch_size, or epoch_end=run-on" if at_end else "a smaller accum_steps"
        raise GradlabError(
            f"{name}: BatchNorm1d would see micro-batches of 1 example ({where}), so one value "
            f"per channel and no batch statistics; use norm=gn or norm=ln, or {fix}")
    if s.accumulation == Accumulation.GRADCACHE and not setup.coupled:
        raise GradlabError(f"{name}: accumulation=gradcache is for a loss that couples the "
                           f"batch, and this setup's loss is computed per example; give "
                           f"Setup(embed=..., coupled_loss=...) in place of loss, or use "
                           f"accumulation=plain")
    gradcache.check_gradcache(s, setup, name)
    window = take(setup.train, torch.arange(s.batch_size).to(setup.device))
    engine.set_train_mode(setup.model, s)
    every_rank = engine.rank_micro_batches(window, s.accum_steps, s.world_size, s.rank_split)
    losses = []
    with torch.no_grad():
        for i, micro_batch in enumerate(mb for part in every_rank for mb in part):
            units = int(setup.count_units(micro_batch))
            try:
                if setup.loss in (mse_loss, cross_entropy_loss):  # predictions must fit targets
                    check_prediction(name, setup.model(micro_batch[0]), micro_batch[1],
                                     setup.train[1])
                if setup.coupled:
                    check_embeddings(name, setup.embed(setup.model, micro_batch),
                                     num_examples(micro_batch))
                returned = setup.batch_loss(setup.model, micro_batch)
            except GradlabError:
                raise
            except Exception as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise GradlabError(f"{name}: the model and loss failed on a micro-batch of "
                                   f"{num_examples(micro_batch)} ({s.dtype}): "
                                   f"{type(err).__name__}: {first}") from None
            check_loss(name, returned, units, i)
            losses.append(float(returned[0]))
    if arm.baseline and not all(math.isfinite(loss) for loss in losses):
        # every arm is judged against the baseline: one whose loss is not a number before any
        # step measures nothing (an arm that diverges later is a finding, this is bad input)
        first = next(i for i, loss in enumerate(losses) if not math.isfinite(loss))
        raise GradlabError(f"{name}, the baseline: its loss is {losses[first]} at the initial "
                           f"weights (micro-batch {first + 1} of the first window, before any "
                           f"step), so there is nothing to compare the arms with; the model or "
                           f"its loss gives non-finite values there (a log of 0, a 0/0, an "
                           f"overflow in {s.dtype}): fix the model, or its initialisation")
    check_every_parameter_syncs(arm, setup)


def check_every_parameter_syncs(arm: Arm, setup: Setup) -> None:
    """DDP without find_unused_parameters: every parameter must get a gradient in every
    backward that all-reduces, on every rank. A rank whose micro-batch leaves one out (a head
    or branch it did not use) never launches that bucket's all-reduce, and the other ranks
    wait for it until the collective times out (measured: gloo's 5-minute timeout, see the
    sit-out experiment). Checked on the run's first window, each rank's micro-batches as the
    engine plans them, in this process alone (preflight runs on every rank before training)."""
    s = arm.settings
    if s.world_size == 1 or s.parallel != Parallel.DDP or s.find_unused_parameters \
            or s.static_graph or s.sync == Sync.NEVER:
        return
    window = next(setups.windows(setup, s))
    engine.set_train_mode(setup.model, s)
    for rank in range(s.world_size):
        part = engine.plan_window(window, s, setup, rank, s.world_size).micro_batches
        for i, micro_batch in enumerate(part):
            if s.sync == Sync.NO_SYNC and not micro_batch.last:
                continue  # under no_sync(): nothing is all-reduced, nothing waits
            setup.model.zero_grad(set_to_none=True)
            loss, _ = setup.batch_loss(setup.model, micro_batch.examples)
            loss.backward()
            left_out = [n for n, p in setup.model.named_parameters()
                        if p.requires_grad and p.grad is None]
            if left_out:
                setup.model.zero_grad(set_to_none=True)
                more = f" (and {len(left_out) - 1} more)" if len(left_out) > 1 else ""
                raise GradlabError(
                    f"arm '{arm.name}': parameter {left_out[0]}{more} gets no gradient from "
                    f"rank {rank}'s micro-batch {i + 1} of {len(part)} of the first window, a "
                    f"backward that all-reduces, and DDP with find_unused_parameters=false "
                    f"would wait for it until the ranks time out; set "
                    f"find_unused_parameters=true, or use every parameter in every forward")
    setup.model.zero_grad(set_to_none=True)


def check_embeddings(name: str, embeddings: object, examples: int) -> None:
    """What embed returned: GradCache caches it and splits its gradient along dim 0."""
    parts = embeddings if isinstance(embeddings, tuple | list) else (embeddings,)
    if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
        raise GradlabError(f"{name}: embed returned {type(embeddings).__name__}; it must return "
                           f"a tensor or a tuple of tensors (the embeddings of the batch's "
                           f"examples along dim 0)")
    rows = [len(p) if p.dim() else 0 for p in parts]
    if any(r != examples for r in rows):
        raise GradlabError(f"{name}: embed returned {rows} rows for a micro-batch of "
                           f"{examples} examples; return one embedding per example along dim 0")


def check_prediction(name: str, out: torch.Tensor, y: torch.Tensor,
                     all_targets: torch.Tensor) -> None:
    """The model's output against the targets, before a loss broadcasts or indexes past them."""
    if not isinstance(out, torch.Tensor):
        raise GradlabError(f"{name}: the model returned {type(out).__name__}; the built-in "
                           f"losses need a tensor of predictions")
    shape, target = tuple(out.shape), tuple(y.shape)
    if y.is_floating_point():
        if shape != target:
            raise GradlabError(f"{name}: the model's output has shape {shape} but the targets "
                               f"have shape {target}; make the model return one prediction "
                               f"per target (mse needs equal shapes)")
        return
    classes = int(all_targets.max()) + 1
    if out.dim() != 2 or shape[0] != target[0] or shape[1] < classes:
        raise GradlabError(f"{name}: the model's output has shape {shape} but the targets are "
                           f"{target[0]} class ids up to {classes - 1}; cross-entropy needs "
                           f"output shape ({target[0]}, {classes}) or more classes")


def check_loss(name: str, returned: object, units: int, index: int) -> None:
    if not (isinstance(returned, tuple) and len(returned) == 2):
        raise GradlabError(f"{name}: the loss returned {type(returned).__name__}; it must "
                           f"return (summed loss, number of loss units), e.g. "
                           f"(loss.sum(), len(y))")
    loss, said = returned
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise GradlabError(f"{name}: the loss's first value must be a one-element tensor (the "
                           f"summed loss), got {type(loss).__name__}")
    if units <= 0:
        raise GradlabError(f"{name}: micro-batch {index + 1} holds {units} loss units (all "
                           f"padding?); every micro-batch needs at least one unit: use fewer "
                           f"accum_steps or longer sequences")
    if int(said) != units:
        raise GradlabError(f"{name}: the loss says micro-batch {index + 1} holds {int(said)} "
                           f"units but the setup counts {units}; give Setup(units=...) that "
                           f"counts what the loss sums over (e.g. non-padding tokens)")
