"""Trials in lockstep: every arm from the same weights, on the same examples in the same order.

The arms of a trial train side by side; the arm that has seen the fewest examples
steps next, the baseline first on a tie. So when the baseline is about to take
step t, every arm can be probed at the baseline's weights on the baseline's
window (the gradient alone: nothing else differs), and after an arm's step its
weights can be compared with the baseline's at equal examples seen, without
keeping the baseline's history. What a trial holds costs O(parameters) per arm,
whatever the number of steps.

What gets recorded is up to observers (trajectory, probe, trace, held-gradient
check, evaluation): each watches an arm's steps and owns its rows. The loop
itself is ``run_trial`` and ``ArmRun.advance``: a few lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradlab import zoo
from gradlab.config.spec import (
    Accumulation,
    Arm,
    Autocast,
    BnMode,
    ClipAt,
    Dtype,
    EpochEnd,
    GradAccumDtype,
    GradScaling,
    Optimizer,
    Settings,
    Trial,
    ZeroGrad,
)
from gradlab.errors import GradlabError, unhandled
from gradlab.lab import parallel
from gradlab.record import schema
from gradlab.record.store import RunDir, whole_write
from gradlab.setup import (
    Examples,
    Setup,
    cast,
    check_examples,
    cross_entropy_loss,
    mse_loss,
    num_examples,
    take,
)
from gradlab.train import engine, memory, metrics
from gradlab.train.replica import Replica

DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GradlabError("device=cuda but this machine has no CUDA device (or this torch "
                           "build has no CUDA); use --set device=cpu or device=auto")
    return torch.device(name)


def configure(device: torch.device) -> None:
    """On CUDA, float32 means float32 and a run repeats: no TF32 in matmul or convolution
    (it rounds at 2^-11), no cuDNN autotuning, deterministic cuDNN kernels. Recorded in
    run.json (``environment``)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers of a run depend on besides its settings: the device, the versions,
    the threads and the determinism settings in force."""
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


# ----------------------------------------------------------------------------- building

def call_factory(kind: str, name: str, *args) -> Any:
    """Call a built-in or user factory; a user's exception becomes a one-line input error."""
    factory = zoo.resolve(kind, name)
    try:
        return factory(*args)
    except GradlabError:
        raise
    except Exception as err:
        signature = {"model": "(settings, data)"}.get(kind, "(settings)")
        raise GradlabError(f"{kind} '{name}' failed: {type(err).__name__}: {err}; a {kind} "
                           f"factory is called as factory{signature}") from None


def seeded(s: Settings, build: Callable[[], Any]) -> Any:
    """Build with torch seeded by the arm's seed, leaving the global random state as it was:
    every arm of a trial starts from the same weights, and building one moves no other's
    random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        return build()


def load_data(s: Settings) -> zoo.Data:
    data = call_factory("dataset", s.dataset, s)
    if isinstance(data, tuple):  # a user's factory may return just (x, y)
        x, y = data
        data = zoo.Data(x, y, loss="cross_entropy" if not y.is_floating_point() else "mse")
    if not isinstance(data, zoo.Data):
        raise GradlabError(f"dataset '{s.dataset}' returned {type(data).__name__}; "
                           f"return gradlab.zoo.Data or a tuple (x, y)")
    if data.loss not in zoo.LOSSES:
        raise GradlabError(f"dataset '{s.dataset}' asks for loss '{data.loss}'; choose one of "
                           f"{', '.join(zoo.LOSSES)}")
    return data


def builtin_setup(s: Settings, data_cache: dict) -> Setup:
    """A Setup from the model and dataset settings (built-in or 'pkg.module:factory')."""
    key = (s.dataset, s.min_len, s.max_len)  # what the built-in datasets read
    if key not in data_cache:
        data_cache[key] = load_data(s)
    data = data_cache[key]
    model = seeded(s, lambda: call_factory("model", s.model, s, data))
    if not isinstance(model, nn.Module):
        raise GradlabError(f"model '{s.model}' returned {type(model).__name__}, "
                           f"not a torch.nn.Module")
    loss, units, accuracy = zoo.LOSSES[data.loss]
    return Setup(model, data.train, loss, units, data.test, accuracy, data.shuffle)


def user_setup(s: Settings) -> Setup:
    """The user's own Setup from ``setup = 'pkg.module:factory'``."""
    made = seeded(s, lambda: call_factory("setup", s.setup, s))
    if not isinstance(made, Setup):
        raise GradlabError(f"setup '{s.setup}' returned {type(made).__name__}; return "
                           f"gradlab.setup.Setup(model, train, loss, ...)")
    if not isinstance(made.model, nn.Module):
        raise GradlabError(f"setup '{s.setup}': model is a {type(made.model).__name__}, "
                           f"not a torch.nn.Module")
    functions = {"embed": "embed(model, batch) -> embeddings",
                 "coupled_loss": "coupled_loss(embeddings) -> (summed loss, units)"} \
        if made.coupled else {"loss": "loss(model, batch) -> (summed loss, units)"}
    for name, signature in functions.items():
        if not callable(getattr(made, name)):
            raise GradlabError(f"setup '{s.setup}': {name} is not callable; give a function "
                               f"{signature}")
    return made


def build_setup(s: Settings, device: torch.device, data_cache: dict) -> Setup:
    """The arm's model and examples, in its dtype and on its device."""
    engine.check_precision_support(s, device)
    setup = user_setup(s) if s.setup else builtin_setup(s, data_cache)
    name = s.setup or f"dataset '{s.dataset}'"
    check_examples(setup.train, f"{name}: training examples")
    if setup.test is not None:
        check_examples(setup.test, f"{name}: test examples")
    dtype = DTYPES[s.dtype]
    return dataclasses.replace(setup, model=setup.model.to(device, dtype),
                               train=cast(setup.train, dtype, device),
                               test=cast(setup.test, dtype, device))


def windows(setup: Setup, s: Settings) -> Iterator[Examples]:
    """The seeded stream of windows; every arm of a trial reads the same examples in the same
    order (reshuffled each epoch), grouped into windows as its epoch_end says."""
    n = num_examples(setup.train)
    g = torch.Generator().manual_seed(s.seed)

    def epoch() -> torch.Tensor:
        return torch.randperm(n, generator=g) if setup.shuffle else torch.arange(n)

    def window(index: torch.Tensor) -> Examples:
        return take(setup.train, index.to(setup.device))

    match s.epoch_end:
        case EpochEnd.RUN_ON:
            order = torch.empty(0, dtype=torch.long)
            while True:
                while len(order) < s.batch_size:  # epochs are concatenated
                    order = torch.cat([order, epoch()])
                index, order = order[:s.batch_size], order[s.batch_size:]
                yield window(index)
        case EpochEnd.SHORT_WINDOW:
            while True:  # the last window of each epoch holds what is left: n mod B examples
                yield from map(window, epoch().split(s.batch_size))
        case EpochEnd.CARRY_OVER:
            held = torch.empty(0, dtype=torch.long)
            while True:
                for index in epoch().split(s.batch_size):
                    if len(index) < s.batch_size:  # backwarded at the epoch's end, not stepped
                        held = index
                    else:  # ... so its gradients are still in .grad at the next step
                        yield window(torch.cat([held, index]))
                        held = held[:0]
        case _:
            unhandled(s.epoch_end)


def smallest_micro_batch(n: int, s: Settings) -> int:
    """Examples in the smallest micro-batch the arm will run, on a training set of n."""
    smallest = s.batch_size // s.accum_steps
    short = n % s.batch_size
    if short and s.epoch_end != EpochEnd.RUN_ON:  # the short window at each epoch's end
        smallest = min(smallest, short // engine.micro_batch_count(short, s))
    return smallest


# ----------------------------------------------------------------------------- preflight

# settings that change neither the model's shape nor the data, so not what preflight checks
TRAINING_ONLY = {"seed", "lr", "momentum", "weight_decay", "optimizer", "steps", "probe_every",
                 "eval_every", "trace", "trace_elements", "zero_grad", "set_to_none",
                 "loss_scale", "clip_norm", "clip_at", "scheduler", "scheduler_step",
                 "warmup_steps", "epoch_end", "mask_draws", "sync", "backend", "time_steps"}


@dataclass(frozen=True)
class Workers:
    """How a run spreads its trials: worker processes, and the threads each trial gets."""
    jobs: int  # what --jobs asked for
    processes: int  # worker processes; 1: the trials run one by one in this process
    threads: int  # torch intra-op threads per trial on CPU, unless its `threads` setting says
    # the trials' positions in the order workers take them: the longest first (preflight's
    # estimate), so that no worker starts a long one while the other has nothing left
    order: list[int] | None = None  # None: as listed

    def threads_of(self, trial: Trial) -> int:
        return trial.baseline.settings.threads or self.threads


@dataclass
class Plan:
    """What a run will cost, estimated in preflight from one timed step of each setup."""
    trials: int
    arms: int  # in all trials together
    seconds: float  # one trial after another
    memory_bytes: int  # the largest trial's
    available_bytes: int | None  # what the machine has free (None: unknown)
    notes: list[str] = dataclasses.field(default_factory=list)  # what the user should know
    trial_seconds: list[float] = dataclasses.field(default_factory=list)  # each trial's
    workers: Workers | None = None  # how the trials will run (see spread)

    def estimate(self) -> str:
        processes = self.workers.processes if self.workers else 1
        held = self.memory_bytes * processes
        if held >= 2**30:
            memory = f"{held / 2**30:.1f} GiB"
        elif held >= 2**20:
            memory = f"{held / 2**20:.0f} MiB"
        else:
            memory = "under 1 MiB"
        where = f" in {processes} worker processes" if processes > 1 else ""
        return (f"about {format_seconds(self.seconds / processes)}{where} and {memory} "
                f"(estimated from one timed step of each model)")


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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
                        if k not in TRAINING_ONLY)
            if key not in measured:
                setup = build_setup(s, resolve_device(s.device), cache)
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
        and engine.accumulation(s, setup) == Accumulation.PLAIN


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
    # (about 1 s), which a run whose trials go to worker processes never needs here
    optimizer = engine.make_optimizer(setup.model, s) if s.grad_scaler == GradScaling.ON \
        else None
    with torch.random.fork_rng(devices=[]):
        for _ in range(2):
            start = time.perf_counter()
            engine.window_gradient(setup.model, window, s, setup, optimizer=optimizer,
                                   scaler=engine.make_scaler(s, setup.device))
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
    n = num_examples(setup.train)
    if n < s.batch_size:
        raise GradlabError(f"{name}: batch_size={s.batch_size} but the training set has {n} "
                           f"examples; use a smaller batch_size")
    has_bn1d = any(isinstance(m, nn.BatchNorm1d) for m in setup.model.modules())
    smallest = smallest_micro_batch(n, s)
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
    engine.check_gradcache(s, setup, name)
    window = take(setup.train, torch.arange(s.batch_size).to(setup.device))
    engine.set_train_mode(setup.model, s)
    every_rank = engine.rank_micro_batches(window, s.accum_steps, s.world_size)
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


# ----------------------------------------------------------------------------- one arm

class ArmRng:
    """The arm's own random stream (dropout and the like), so that what one arm draws never
    depends on which arms stepped before it: swapped in around the arm's work."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.state = engine.rng_state(device)

    def __enter__(self):
        self.outside = engine.rng_state(self.device)
        engine.set_rng_state(self.state, self.device)

    def __exit__(self, *exc):
        self.state = engine.rng_state(self.device)
        engine.set_rng_state(self.outside, self.device)

    def replay(self, state) -> contextlib.AbstractContextManager:
        """Run from ``state`` (one this stream held), then put back whatever was there: a
        probe draws the dropout masks the step it mirrors drew, and moves no stream."""
        return engine.replayed(state, self.device)


class ArmRun:
    """One arm of a trial while it trains: model, optimizer, stream of windows, observers.

    It is also the engine's Watch: what happens inside a step is passed on to the
    observers.
    """

    def __init__(self, trial: Trial, arm: Arm, setup: Setup, data_cache: dict):
        self.trial, self.arm, self.setup, self.s = trial, arm, setup, arm.settings
        self.data_cache = data_cache
        self.model = setup.model
        self.replica = self.replicate(self.model)  # what the engine trains
        self.optimizer = engine.make_optimizer(self.model, self.s)
        self.scaler = engine.make_scaler(self.s, setup.device)  # None with grad_scaler=off
        self.scheduler = engine.make_scheduler(self.optimizer, self.s)
        self.windows = windows(setup, self.s)
        self.upcoming = next(self.windows)  # the window the next step takes
        self.rng = ArmRng(self.s.seed, setup.device)
        self.step = 0  # the step being taken, or the last one taken
        self.examples = 0  # examples seen after the last step
        self.loss = math.nan  # the last step's loss
        self.observers: list[Observer] = []
        self.rows: dict[str, list[dict[str, Any]]] = {t: [] for t in schema.TABLES}

    def fresh_model(self) -> nn.Module:
        """Another model like this arm's (for probes and checks to compute in)."""
        return build_setup(self.s, self.setup.device, self.data_cache).model

    def replicate(self, model: nn.Module) -> nn.Module:
        """The model as this arm trains it: a DDP replica on each rank when the arm is
        data-parallel (world_size > 1), else the model itself."""
        return Replica(model) if self.s.world_size > 1 else model

    @property
    def ids(self) -> dict[str, Any]:
        return {"trial": self.trial.index, "arm": self.arm.name}

    @property
    def done(self) -> bool:
        return self.step >= self.s.steps

    @property
    def next_examples(self) -> int:
        """Examples seen after the next step."""
        return self.examples + num_examples(self.upcoming)

    def advance(self) -> None:
        """Take one optimizer step, with every observer watching."""
        window, self.upcoming = self.upcoming, next(self.windows)
        self.step += 1
        for o in self.observers:
            o.before_step(self, window)
        with self.rng, contextlib.ExitStack() as around:
            for o in self.observers:
                around.enter_context(o.around_step(self))
            stats = engine.train_step(self.replica, self.optimizer, window, self.s, self.setup,
                                      self, self.scheduler, self.scaler,
                                      # a loss that couples the batch: what GradCache saves
                                      measure_memory=self.setup.coupled
                                      and probe_due(self.s, self.step))
        self.examples += stats.examples
        self.loss = stats.loss
        for o in self.observers:
            o.stepped(self, stats)

    def micro_batch(self, index: int) -> None:
        for o in self.observers:
            o.micro_batch(self, index)

    def gradient(self) -> None:
        for o in self.observers:
            o.gradient(self)


# ----------------------------------------------------------------------------- observers

class Observer:
    """Watches an arm's steps and writes rows into it. Override what you need."""

    def before_step(self, run: ArmRun, window: Examples) -> None: ...

    def around_step(self, run: ArmRun) -> contextlib.AbstractContextManager:
        """A context the step runs inside (after before_step, before stepped)."""
        return contextlib.nullcontext()

    def micro_batch(self, run: ArmRun, index: int) -> None: ...
    def gradient(self, run: ArmRun) -> None: ...
    def stepped(self, run: ArmRun, stats: engine.StepStats) -> None: ...
    def finished(self, run: ArmRun) -> None: ...


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


class Trajectory(Observer):
    """steps.csv: each step's loss and norms, and the distance from the baseline's weights
    and loss at equal examples seen (the baseline, stepping first on a tie, is there)."""

    def __init__(self, base: ArmRun, comparable: bool):
        self.base, self.comparable = base, comparable

    def stepped(self, run: ArmRun, stats: engine.StepStats) -> None:
        level = self.base.examples == run.examples
        weight_dist = metrics.param_distance(run.model, self.base.model) \
            if level and self.comparable else math.nan
        ref_loss = self.base.loss if level else math.nan
        epoch = -(-run.examples // num_examples(run.setup.train))  # its last example's epoch
        run.rows["steps"].append({
            **run.ids, "step": run.step, "examples": run.examples, "epoch": epoch,
            "window_size": stats.examples, "units": stats.units, "lr": stats.lr,
            "loss": stats.loss, "grad_norm": stats.grad_norm, "update_norm": stats.update_norm,
            "saved_bytes": stats.saved_bytes, "negatives": stats.negatives,
            "allreduces": stats.allreduces, "step_seconds": stats.seconds,
            "skipped": stats.skipped, "grad_scale": stats.grad_scale,
            "weight_dist": weight_dist,
            "rel_loss_diff": abs(stats.loss - ref_loss) / abs(ref_loss) if ref_loss
            else math.nan})


def probe_due(s: Settings, step: int) -> bool:
    return step == 1 or (s.probe_every > 0 and (step - 1) % s.probe_every == 0)


def precision(s: Settings) -> tuple[Dtype, Autocast, GradScaling]:
    """What decides how one big batch rounds: the parameters' dtype, autocast, the scaler.
    (A float32 buffer changes nothing for one micro-batch.)"""
    return s.dtype, s.autocast, s.grad_scaler


def low_precision(s: Settings) -> bool:
    """Does the arm compute its gradients in bfloat16 or float16?"""
    return schema.compute_dtype(s.dtype, s.autocast) in (Dtype.BFLOAT16, Dtype.FLOAT16)


def floor_key(run: ArmRun) -> tuple:
    """Arms alike in this compute the same floor: their precision, and a GradScaler's scale."""
    return *precision(run.s), run.scaler.get_scale() if run.scaler is not None else None


class Probe(Observer):
    """probe.csv and buffers.csv, watching the baseline: when its .grad holds the gradient
    its step will apply, each due arm computes its own at the same weights (and running
    statistics) on the same window, through the same engine function; the two are
    compared parameter by parameter.

    Each probe also takes the exact gradient: the baseline's, in float64, at the same
    weights on the same window. Every arm's distance from it (exact_err), and the
    distance of one big batch in the arm's own precision (floor_err: the baseline's
    own when the precisions agree), are what the verdict weighs (schema.py). And it
    takes Σ_i |g_i| of the window's N partial gradients in float64, the condition of
    their sum (sum_condition = ‖Σ|g_i|‖ / ‖Σ g_i‖), which scales the rounding that
    summing them can add. Each also records the learning rate the arm's step applies
    (lr) beside the baseline's (ref_lr): a step is the gradient times it.

    An arm with a GradScaler is probed with a copy of its scaler, holding the scale
    the arm's own step will use: the probe's unscale_ leaves the arm's scaler as it was.

    "The same window" is the same examples, drawn from the same random state: both the
    exact gradient and every arm's start from the state the baseline's step started
    from, so the big batch's dropout masks are the baseline's own, and an arm's differ
    from them only by how its own split of the window draws them. An arm is due when
    its next step ends where the baseline's does (the same examples seen); its window is
    its own next one: the baseline's, or under epoch_end = carry-over the baseline's with
    the last epoch's unflushed examples in front.

    Memory: the probe computes in the baseline's own model. The baseline's gradient is
    set aside (not copied); the exact one, and Σ|g_i|, are taken with the model cast to
    float64 in place and back (exact: a float64 holds every value of a narrower float);
    each arm's gradient then lands in the model's .grad, one arm at a time; at the end
    the baseline's gradient and running statistics are put back. So a probe holds the
    exact gradient (float64) and one arm's gradient beyond what training holds. Only an
    arm whose model may differ from the baseline's (another dtype, or a setting the
    engine does not read: see ENGINE_SETTINGS) gets a model of its own, and only an arm
    in another precision than the baseline's a model for its floor.
    """

    def __init__(self, base: ArmRun, arms: list[ArmRun]):
        self.arms = arms
        self.own_models: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}  # by arm
        self.window: Examples | None = None
        self.end = 0  # examples the baseline will have seen after this step
        self.start_state = None  # the baseline's random state as its step starts
        self.buffers_before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}  # every buffer after the baseline's forward
        # the big batch, computed exactly: no autocast, scaler or buffer in float64
        self.exact_settings = dataclasses.replace(
            base.s, dtype=Dtype.FLOAT64, autocast=Autocast.NONE, grad_scaler=GradScaling.OFF,
            grad_accum_dtype=GradAccumDtype.PARAM, clip_at=ClipAt.AFTER_ACCUMULATION)
        # a model (and an optimizer for a GradScaler's unscale_) per precision, for floors
        self.floor_models: dict[tuple, tuple[Setup, torch.optim.Optimizer]] = {}
        # Σ|g_i| costs a float64 pass per N: taken where the bound it gives can matter, in
        # a trial with an arm computing in bfloat16 or float16 (float32's is below 1e-5)
        self.conditions = any(low_precision(a.s) for a in [base, *arms])

    def due(self, base: ArmRun) -> list[ArmRun]:
        return [a for a in self.arms if probe_due(a.s, base.step) and base.step <= a.s.steps
                and a.next_examples == self.end]

    def before_step(self, base: ArmRun, window: Examples) -> None:
        self.window = window
        self.end = base.examples + num_examples(window)
        self.start_state = base.rng.state
        if self.due(base):  # running statistics as the baseline's forward will find them
            self.buffers_before = {k: b.clone() for k, b in running_stats(base.model).items()}

    def gradient(self, base: ArmRun) -> None:
        due = self.due(base)
        if not due:
            return
        model = base.model
        held = {name: p.grad for name, p in model.named_parameters()}  # set aside, not copied
        baseline = {name: metrics.grad_or_zeros(p) for name, p in model.named_parameters()}
        self.after = {name: b.clone() for name, b in model.named_buffers()}  # the forward's
        model.zero_grad(set_to_none=True)
        try:
            exact = self.exact_gradient(base)
            if exact is None:  # a float64 baseline computes the exact gradient itself
                exact = baseline
            floors = {floor_key(base): compare_grads(baseline, exact)}
            conditions: dict[int, dict[str, float]] = {}
            for arm in due:
                key, n = floor_key(arm), arm.s.accum_steps
                if key not in floors:
                    floors[key] = self.floor(arm, base, exact)
                if n not in conditions:
                    conditions[n] = self.sum_condition(base, n) if self.conditions else {}
                self.probe_arm(arm, base, baseline, exact, floors[key], conditions[n])
        finally:
            for name, p in model.named_parameters():
                p.grad = held[name]
            load_buffers(model, self.after)

    def probe_arm(self, arm: ArmRun, base: ArmRun, baseline: dict[str, torch.Tensor],
                  exact: dict[str, torch.Tensor], floor: list[dict],
                  condition: dict[str, float]) -> None:
        """The arm's gradient against the baseline's and the exact one: its probe rows."""
        replica, optimizer = self.model_for(arm, base)  # data-parallel: all-reduced on ranks
        model = engine.module_of(replica)
        self.start_at_baseline(model, base)
        window = cast(arm.upcoming, DTYPES[arm.s.dtype], arm.setup.device)
        with base.rng.replay(self.start_state):  # and moves no arm's stream
            engine.window_gradient(replica, window, arm.s, arm.setup, optimizer=optimizer,
                                   scaler=engine.make_scaler(arm.s, arm.setup.device,
                                                             like=arm.scaler))
        grads = {name: metrics.grad_or_zeros(p) for name, p in model.named_parameters()}
        ids = {**arm.ids, "step": base.step}
        rates = {"lr": engine.learning_rate(arm.optimizer),
                 "ref_lr": engine.learning_rate(base.optimizer)}
        arm.rows["probe"] += [
            {**ids, **r, "exact_err": e["rel_l2_err"], "floor_err": f["rel_l2_err"],
             "sum_condition": condition.get(r["param"], math.nan), **rates}
            for r, e, f in zip(compare_grads(grads, baseline), compare_grads(grads, exact),
                               floor, strict=True)]
        arm.rows["buffers"] += [{**ids, **r} for r in compare_buffers(
            model, running_stats_of(self.after), arm.setup)]
        model.zero_grad(set_to_none=True)  # one arm's gradient at a time

    def start_at_baseline(self, model: nn.Module, base: ArmRun) -> None:
        """The baseline's weights, and its running statistics before this step's forward
        (its other buffers, like BatchNorm's counter, as its forward left them)."""
        if model is not base.model:
            model.load_state_dict(base.model.state_dict())
        load_buffers(model, {**self.after, **self.buffers_before})
        model.zero_grad(set_to_none=True)

    def exact_gradient(self, base: ArmRun) -> dict[str, torch.Tensor] | None:
        """The baseline's gradient computed in float64 (None: the baseline is float64)."""
        if base.s.dtype == Dtype.FLOAT64:
            return None
        model = base.model
        with cast_in_place(model, torch.float64):
            self.start_at_baseline(model, base)
            window = cast(self.window, torch.float64, base.setup.device)
            with base.rng.replay(self.start_state):  # the baseline's dropout masks
                engine.window_gradient(model, window, self.exact_settings, base.setup)
            exact = {name: metrics.grad_or_zeros(p) for name, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)  # the float64 gradient stays in `exact` alone
        return exact

    def floor(self, arm: ArmRun, base: ArmRun, exact: dict[str, torch.Tensor]
              ) -> list[dict[str, Any]]:
        """The baseline's big batch computed in the arm's precision, against the exact
        gradient: what one big batch rounds there (with a GradScaler: at the arm's scale)."""
        s = dataclasses.replace(base.s, dtype=arm.s.dtype, autocast=arm.s.autocast,
                                grad_scaler=arm.s.grad_scaler)
        if precision(s) not in self.floor_models:
            setup = build_setup(s, base.setup.device, base.data_cache)
            self.floor_models[precision(s)] = setup, engine.make_optimizer(setup.model, s)
        setup, optimizer = self.floor_models[precision(s)]
        self.start_at_baseline(setup.model, base)
        with base.rng.replay(self.start_state):
            engine.window_gradient(setup.model, cast(self.window, DTYPES[s.dtype], setup.device),
                                   s, setup, optimizer=optimizer,
                                   scaler=engine.make_scaler(s, setup.device, like=arm.scaler))
        floor = compare_grads(metrics.grads_of(setup.model), exact)
        setup.model.zero_grad(set_to_none=True)
        return floor

    def sum_condition(self, base: ArmRun, accum_steps: int) -> dict[str, float]:
        """‖Σ_i |g_i|‖ / ‖Σ_i g_i‖ over the window's partial gradients in float64, per
        parameter and for all together ('*'): 1 when N = 1 or when the partial gradients
        all point alike, large when they cancel. Taken in the baseline's model, cast."""
        model = base.model
        with cast_in_place(model, torch.float64):
            self.start_at_baseline(model, base)
            magnitudes = PartialMagnitudes(model)
            with base.rng.replay(self.start_state):
                engine.window_gradient(model, cast(self.window, torch.float64, base.setup.device),
                                       dataclasses.replace(self.exact_settings,
                                                           accum_steps=accum_steps),
                                       base.setup, magnitudes)
            model.zero_grad(set_to_none=True)
        return magnitudes.condition()

    def model_for(self, arm: ArmRun, base: ArmRun) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Where the arm's probe computes: the baseline's model when the arm's can only be
        the same (their settings differ only in what the engine reads), else its own; and
        an optimizer over it that only a GradScaler's unscale_ uses (the probe never steps).
        A data-parallel arm's is a replica of its own, all-reduced across the ranks."""
        if same_model(arm.s, base.s):
            return base.model, base.optimizer
        if arm.arm.name not in self.own_models:
            model = arm.fresh_model()
            self.own_models[arm.arm.name] = (arm.replicate(model),
                                             engine.make_optimizer(model, arm.s))
        return self.own_models[arm.arm.name]


# Settings the engine and the run read, never a model factory: arms differing from the
# baseline only in these compute their probes in the baseline's model. A setting missing
# here only costs a model of the arm's own (a factory receives every setting).
ENGINE_SETTINGS = frozenset({
    "batch_size", "accum_steps", "loss_scale", "zero_grad", "set_to_none", "bn_mode",
    "optimizer", "clip_norm", "clip_at", "dropout_mode", "dropout_masks", "mask_draws",
    "epoch_end", "lr", "scheduler", "scheduler_step", "warmup_steps", "momentum",
    "weight_decay", "steps", "probe_every", "eval_every", "trace", "trace_elements",
    "update_norm", "cost", "budget_mb", "threads", "autocast", "grad_accum_dtype",
    "grad_scaler", "sync", "backend", "time_steps"})


def same_model(a: Settings, b: Settings) -> bool:
    return all(getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(Settings)
               if f.name not in ENGINE_SETTINGS)


def compare_grads(arm: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]
                  ) -> list[dict[str, float | str]]:
    return metrics.compare_tensors((name, g, ref[name]) for name, g in arm.items())


@contextlib.contextmanager
def cast_in_place(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The model's floating parameters and buffers in ``dtype`` for the block, then back
    to their own dtypes (the same objects: an optimizer's references stay valid)."""
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers())
               if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.to(dtype)
    try:
        yield
    finally:
        for t, own in zip(tensors, dtypes, strict=True):
            t.data = t.data.to(own)


class PartialMagnitudes:
    """Watches a float64 window_gradient and sums |g_i|, the magnitude of each micro-batch's
    partial gradient (the difference in .grad across its backward), per parameter."""

    def __init__(self, model: nn.Module):
        self.params = dict(model.named_parameters())
        self.before = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.total = {n: torch.zeros_like(p) for n, p in self.params.items()}

    def micro_batch(self, index: int) -> None:
        for name, p in self.params.items():
            now = metrics.grad_or_zeros(p).detach()
            self.total[name] += (now - self.before[name]).abs()
            self.before[name] = now.clone()

    def gradient(self) -> None: ...

    def condition(self) -> dict[str, float]:
        rows, sums, norms = {}, 0.0, 0.0
        for name in self.params:
            total, norm = float(self.total[name].norm()), float(self.before[name].norm())
            rows[name] = ratio(total, norm)
            sums, norms = sums + total**2, norms + norm**2
        rows["*"] = ratio(math.sqrt(sums), math.sqrt(norms))
        return rows


def ratio(magnitudes: float, norm: float) -> float:
    """Σ|g_i| over ‖Σ g_i‖; a zero gradient made of zero parts is perfectly conditioned."""
    if norm > 0:
        return magnitudes / norm
    return 1.0 if magnitudes == 0 else math.inf


def running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm running means and variances (num_batches_tracked is a counter, not a statistic)."""
    return running_stats_of(dict(model.named_buffers()))


def running_stats_of(buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: b.detach() for name, b in buffers.items()
            if name.endswith(("running_mean", "running_var"))}


def load_buffers(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into the model's buffers of those names (cast to their dtype)."""
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in values.items():
            buffers[name].copy_(value)


def compare_buffers(probed: nn.Module, ref: dict[str, torch.Tensor], setup: Setup
                    ) -> list[dict[str, Any]]:
    """Running statistics the arm's probe pass left, vs the baseline's, and what they do to eval.

    Both passes started from the baseline's weights and statistics; the baseline's
    forward updated them once (``ref``), the arm's N times. The '*' row also evaluates
    the baseline's weights with the arm's statistics and with the baseline's, so the
    accuracy change is due to the statistics alone.
    """
    if not ref:
        return []
    arm = running_stats(probed)
    rows = [{"buffer": r.pop("param"), **r}
            for r in metrics.compare_tensors((k, arm[k], ref[k]) for k in ref)]
    with_arm = evaluate(probed, setup)
    saved = {k: v.clone() for k, v in arm.items()}
    load_buffers(probed, ref)
    with_ref = evaluate(probed, setup)
    load_buffers(probed, saved)
    if with_arm:
        rows[-1].update(test_accuracy=with_arm["test_accuracy"],
                        ref_test_accuracy=with_ref["test_accuracy"])
    return rows


def evaluate(model: nn.Module, setup: Setup) -> dict[str, float]:
    """Held-out loss per unit and accuracy, in eval mode (running statistics)."""
    if setup.test is None:
        return {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss, units = setup.batch_loss(model, setup.test)
        metrics = {"test_loss": float(loss) / int(units), "test_accuracy": math.nan}
        if setup.accuracy is not None:
            correct, total = setup.accuracy(model, setup.test)
            metrics["test_accuracy"] = int(correct) / int(total)
    model.train(was_training)
    return metrics


class Evaluation(Observer):
    """eval.csv: held-out loss and accuracy every eval_every steps and after the last."""

    def stepped(self, run: ArmRun, stats: engine.StepStats) -> None:
        s = run.s
        if (s.eval_every and run.step % s.eval_every == 0) or run.step == s.steps:
            metrics = evaluate(run.model, run.setup)
            if metrics:
                run.rows["eval"].append({**run.ids, "step": run.step,
                                         "examples": run.examples, **metrics})


class Trace(Observer):
    """trace.csv and weights.csv (trace = true): the accumulated .grad after every
    micro-batch, and the weights after every step (step 0: the initial weights)."""

    def __init__(self, run: ArmRun):
        self.weights(run, 0)

    def micro_batch(self, run: ArmRun, index: int) -> None:
        run.rows["trace"] += [{**run.ids, "step": run.step, "micro_batch": index + 1,
                               "param": name, "element": i, "grad": value}
                              for name, i, value in elements(run.model, metrics.grad_or_zeros,
                                                             run.s.trace_elements)]

    def stepped(self, run: ArmRun, stats: engine.StepStats) -> None:
        self.weights(run, run.step)

    def weights(self, run: ArmRun, step: int) -> None:
        run.rows["weights"] += [{**run.ids, "step": step, "param": name, "element": i,
                                 "value": value}
                                for name, i, value in elements(run.model, lambda p: p,
                                                               run.s.trace_elements)]


def elements(model: nn.Module, tensor_of, count: int) -> Iterator[tuple[str, int, float]]:
    """(parameter name, element index, value) of the first ``count`` elements of each
    ``tensor_of(param)``: a trace costs rows per parameter, not per element of a model."""
    for name, p in model.named_parameters():
        values = tensor_of(p).detach().flatten()[:count].double().tolist()
        yield from ((name, i, v) for i, v in enumerate(values))


class CudaMemory(Observer):
    """summary.csv cuda_peak_bytes, on CUDA: the arm's parameters, plus the most memory its
    forward and backward passes allocated on top of what was allocated when its step began
    (activations, gradients, a float32 buffer). Every arm of a trial lives on the device
    at once, so a peak of the whole device would mostly count the other arms. It is read
    before the probe runs (the probe's work is not the arm's)."""

    def __init__(self, run: ArmRun):
        self.device = run.setup.device
        self.params = sum(p.numel() * p.element_size() for p in run.model.parameters())
        self.start = 0
        self.peak = 0

    def before_step(self, run: ArmRun, window: Examples) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)

    def gradient(self, run: ArmRun) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - self.start)

    def bytes(self) -> int:
        return self.params + self.peak


class HeldGradientCheck(Observer):
    """checks.csv, under zero_grad='never': the .grad held after step t must be the sum of
    the fresh gradients of steps 1..t, each taken at the weights of its own step.

    A fresh gradient is what the ordinary loop would compute at those weights: the
    same settings with zero_grad='every-n', on a scratch model, before the step.
    """

    name = "held grad = sum of fresh grads"

    def __init__(self, run: ArmRun):
        self.scratch = run.fresh_model()
        self.settings = dataclasses.replace(run.s, zero_grad=ZeroGrad.EVERY_N)
        self.total: dict[str, torch.Tensor] | None = None  # float64 sum of fresh gradients
        self.worst = 0.0  # largest relative error over the steps so far

    def before_step(self, run: ArmRun, window: Examples) -> None:
        self.scratch.load_state_dict(run.model.state_dict())
        self.scratch.zero_grad(set_to_none=True)
        with run.rng.replay(run.rng.state):  # the random state the step itself starts from
            engine.window_gradient(self.scratch, window, self.settings, run.setup)
        fresh = metrics.grads_of(self.scratch)
        self.total = fresh if self.total is None else {
            name: self.total[name] + fresh[name] for name in fresh}

    def gradient(self, run: ArmRun) -> None:
        held = metrics.grads_of(run.model)
        overall = metrics.compare_tensors((n, held[n], self.total[n]) for n in self.total)[-1]
        self.worst = max(self.worst, overall["rel_l2_err"])

    def finished(self, run: ArmRun) -> None:
        # the sum of steps*N terms rounds like one accumulation of that many terms
        s = self.settings
        tolerance = schema.sum_tolerance(s.dtype, s.steps * s.accum_steps)
        run.rows["checks"].append({**run.ids, "check": self.name, "value": self.worst,
                                   "tolerance": tolerance, "passed": self.worst <= tolerance})


class Cost(Observer):
    """cost.csv (cost = true): the wall time of every optimizer step, and what the first
    step held in memory: the most bytes autograd held saved for backward at once, which is
    its largest micro-batch's, each freed by its backward (activation_bytes: the
    activations, the parameters left out); memory_bytes, what the
    step needs at its peak (CUDA: torch.cuda.max_memory_allocated during it; CPU: the
    weights, gradients and optimizer state plus those activations, counted); rss_bytes,
    the process's peak resident set size during it (CPU).

    Memory is measured on the first step only: counting saved tensors slows a step, so
    the time that summary.csv reports (step_ms) is the median of the later steps. The
    baseline's steps include probing the other arms, if any.
    """

    def __init__(self) -> None:
        self.saved: memory.SavedTensors | None = None  # counting, during the first step

    @contextlib.contextmanager
    def around_step(self, run: ArmRun) -> Iterator[None]:
        device = run.setup.device
        cuda = device.type == "cuda"
        first = run.step == 1
        if first:
            self.saved = memory.SavedTensors(run.model.parameters())
            memory.reset_peak(device)
        with self.saved if first else contextlib.nullcontext():
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            yield
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        row = {**run.ids, "step": run.step, "seconds": seconds, "activation_bytes": math.nan,
               "memory_bytes": math.nan, "rss_bytes": math.nan}
        if first:
            peak, activations = memory.peak_bytes(device), self.saved.peak
            held = peak if cuda else memory.state_bytes(run.model, run.optimizer) + activations
            row.update(activation_bytes=activations, memory_bytes=held,
                       rss_bytes=math.nan if cuda else peak)
            self.saved = None
        run.rows["cost"].append(row)


class MaskAverageCheck(Observer):
    """checks.csv, with dropout and mask_draws = K: at step 1, the arm's gradient minus the
    big batch's (the same settings with N = 1), at the same weights on the same window, for
    K draws of the dropout masks, each pair from one random state. Each draw differs,
    because the masks differ; unbiased accumulation makes the mean difference zero within
    its standard error, sqrt(sum of |d_k - mean|^2 / (K - 1) / K). The check passes when
    |mean| <= 4 standard errors; value and tolerance are both relative to |mean big-batch
    gradient|.
    """

    def __init__(self, run: ArmRun):
        self.name = f"mean over {run.s.mask_draws} mask draws of accumulated - big batch = 0"
        self.row: dict[str, Any] | None = None

    def before_step(self, run: ArmRun, window: Examples) -> None:
        if run.step != 1:
            return
        s = run.s
        big = dataclasses.replace(s, accum_steps=1)
        scratch = run.fresh_model()
        seeds = torch.randint(2**62, (s.mask_draws,),
                              generator=torch.Generator().manual_seed(s.seed))
        differences, bigs = [], []
        for seed in seeds.tolist():
            pair = []
            for settings in (s, big):
                scratch.load_state_dict(run.model.state_dict())
                scratch.zero_grad(set_to_none=True)
                with run.rng.replay(run.rng.state):  # a fork: seeding it moves no stream
                    torch.manual_seed(seed)
                    engine.window_gradient(scratch, window, settings, run.setup)
                pair.append(torch.cat([g.flatten() for g in metrics.grads_of(scratch).values()]))
            differences.append(pair[0] - pair[1])
            bigs.append(pair[1])
        d = torch.stack(differences)
        mean = d.mean(0)
        standard_error = float(((d - mean) ** 2).sum() / (len(d) - 1) / len(d)) ** 0.5
        scale = float(torch.stack(bigs).mean(0).norm())
        value = float(mean.norm()) / scale
        tolerance = 4 * standard_error / scale
        self.row = {**run.ids, "check": self.name, "value": value, "tolerance": tolerance,
                    "passed": value <= tolerance}

    def finished(self, run: ArmRun) -> None:
        if self.row is not None:
            run.rows["checks"].append(self.row)


# ----------------------------------------------------------------------------- trials

def start(trial: Trial, data_cache: dict) -> list[ArmRun]:
    """Every arm of a trial, built and watched; the baseline first."""
    arms = sorted(trial.arms, key=lambda a: not a.baseline)
    runs = []
    for arm in arms:
        setup = build_setup(arm.settings, resolve_device(arm.settings.device), data_cache)
        runs.append(ArmRun(trial, arm, setup, data_cache))
    base, others = runs[0], runs[1:]
    probed = [r for r in others if same_architecture(r.model, base.model)
              and r.s.batch_size == base.s.batch_size]
    base.observers.append(Probe(base, probed))
    for run in runs:
        if run.setup.device.type == "cuda":  # first: it reads the peak before the probe runs
            run.observers.insert(0, CudaMemory(run))
        run.observers += [Trajectory(base, same_architecture(run.model, base.model)),
                          Evaluation()]
        if run.s.trace:
            run.observers.append(Trace(run))
        if run.s.zero_grad == ZeroGrad.NEVER:
            run.observers.append(HeldGradientCheck(run))
        if run.s.cost:
            run.observers.append(Cost())
        if run.s.mask_draws and not run.arm.baseline:
            run.observers.append(MaskAverageCheck(run))
    return runs


def run_trial(trial: Trial, data_cache: dict,
              advance: Callable[[int], None] = lambda n: None) -> dict[str, list[dict]]:
    """Train every arm of a trial in lockstep; returns the trial's rows, table by table."""
    runs = start(trial, data_cache)
    while pending := [r for r in runs if not r.done]:
        # the fewest examples after its next step goes next; the baseline first on a tie
        run = min(pending, key=lambda r: (r.next_examples, not r.arm.baseline))
        run.advance()
        advance(1)
    rows: dict[str, list[dict]] = {t: [] for t in schema.TABLES}
    for run in runs:
        for o in run.observers:
            o.finished(run)
        run.rows["summary"].append(summary_row(run))
        for table in schema.TABLES:
            rows[table] += run.rows[table]
    return rows


def summary_row(run: ArmRun) -> dict[str, Any]:
    s, arm = run.s, run.arm
    metrics = schema.summarise(run.rows["steps"], run.rows["probe"], run.rows["eval"],
                               run.rows["buffers"])
    computed_in = schema.compute_dtype(s.dtype, s.autocast)
    tolerance, verdict = schema.judge(arm.baseline, computed_in, s.accum_steps,
                                      {**metrics, "world_size": s.world_size})
    memory = [o.bytes() for o in run.observers if isinstance(o, CudaMemory)]
    if s.cost:
        metrics.update(schema.summarise_cost(run.rows["cost"], s.batch_size))
    return {**run.ids, "baseline": arm.baseline,
            **{key: getattr(s, key) for key in run.trial.swept},  # the arm's own value of each
            "batch_size": s.batch_size, "accum_steps": s.accum_steps,
            "micro_batch": s.micro_batch, "world_size": s.world_size, "dtype": s.dtype,
            "precision": computed_in, **metrics,
            "accum_bound": math.nan if arm.baseline else schema.accumulation_bound(
                computed_in, s.accum_steps, metrics["max_sum_condition"]),
            "cuda_peak_bytes": memory[0] if memory else math.nan,
            "rel_tolerance": tolerance, "expect": arm.expect or "", "verdict": verdict}


# ----------------------------------------------------------------------------- workers

# a run estimated shorter than this runs in the gradlab process: starting worker processes
# (a fork server importing torch, about 2 s of CPU) would cost more than they save
WORTH_WORKERS_SECONDS = 10.0


def default_jobs(trials: list[Trial], plan: Plan | None, idle: int) -> int:
    """One job per usable core that other work leaves ``idle`` (parallel.idle_cores()); on CUDA, one
    per GPU visible; one for a run that preflight's ``plan`` found short (None: before
    preflight, what the jobs will be unless the run is short). On 2 cores with 2 busy loops
    beside it, 2 workers made the default run slower than 1: benchmarks/RESULTS.md."""
    if plan is not None and plan.seconds < WORTH_WORKERS_SECONDS:
        return 1
    if any(resolve_device(a.settings.device).type == "cuda" for t in trials for a in t.arms):
        return max(1, torch.cuda.device_count())
    return idle


# what a worker process holds before its first trial (Python, torch, gradlab imported)
PROCESS_BYTES = 400 * 2**20


def spread(trials: list[Trial], jobs: int, plan: Plan) -> Plan:
    """The plan, with how K jobs run its trials (workers_for)."""
    return dataclasses.replace(plan, workers=workers_for(trials, jobs, plan))


def workers_for(trials: list[Trial], jobs: int, plan: Plan | None = None) -> Workers:
    """How K jobs run the trials: at most K worker processes, no more than there are trials
    or than fit in memory (known once preflight's ``plan`` is); each trial gets one intra-op
    thread, or the cores left over when there are fewer trials than jobs (one trial alone
    gets them all)."""
    processes = max(1, min(jobs, len(trials)))
    if plan is not None and plan.available_bytes is not None and processes > 1:
        fit = int(0.8 * plan.available_bytes // (plan.memory_bytes + PROCESS_BYTES))
        processes = max(1, min(processes, fit))
    order = sorted(range(len(trials)), key=lambda i: -plan.trial_seconds[i]) \
        if plan is not None and len(plan.trial_seconds) == len(trials) else None
    return Workers(jobs, processes, max(1, jobs // processes), order)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_trials(trials: list[Trial], run_dir: RunDir | None,
               advance: Callable[[int], None] = lambda n: None,
               workers: Workers | None = None) -> list[dict[str, list[dict]]]:
    """Run every trial, in this process or in worker processes, and append each trial's
    rows to the run directory in trial order, as soon as every earlier trial is there: the
    files are the same bytes for any number of workers. Returns every trial's rows.

    When the run stops early (a stop signal, an error), the trials that finished are
    written too, even those after one that did not. Ranks other than 0 of a data-parallel
    run train alike and write nothing (run_dir None)."""
    workers = workers or Workers(1, 1, torch.get_num_threads())
    results: list[dict[str, list[dict]] | None] = [None] * len(trials)
    written = 0

    def write(rows: dict[str, list[dict]]) -> None:
        if run_dir is None:
            return
        with whole_write():  # a stop signal waits until the trial is on disk whole
            for table in schema.TABLES:
                run_dir.append(table, rows[table])

    def finished(position: int, rows: dict[str, list[dict]]) -> None:
        nonlocal written
        results[position] = rows
        while written < len(trials) and results[written] is not None:
            written += 1
            write(results[written - 1])

    try:
        if workers.processes == 1:
            cache: dict = {}
            for position, trial in enumerate(trials):
                with torch_threads(workers.threads_of(trial)):
                    rows = run_trial(trial, cache, advance)
                finished(position, rows)
        else:
            parallel.run(trials, workers.processes, workers.threads_of, finished, advance,
                         workers.order)
    except BaseException:
        with contextlib.suppress(OSError):  # the disk may be why it stopped
            for rows in results[written:]:
                if rows is not None:
                    write(rows)
        raise
    return results
