"""The settings: everything that decides how one arm trains, each field with its role, and
the checks one value gets alone (its type, choices and range).

Names, defaults and help are the CLI contract (``gradlab list``, ``--set``, the TOML). Each
field's role says what reads it; the sets the lab needs ("a model factory never reads these",
"preflight need not time these again") are computed from the roles below, never typed.
Checks that need more than one setting are in gradlab.config.rules.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from gradlab.errors import GradlabError

# ----------------------------------------------------------------------------- policies
# Every policy is an enum whose values are the strings a spec, --set and the CSVs use.
# Settings always hold members (see Settings.__post_init__), so the code that acts on a
# policy can dispatch with `match` and fail loudly on a value it does not handle.


class Policy(StrEnum):
    """A policy's members read as the strings a spec writes, in messages too."""

    def __repr__(self) -> str:
        return repr(self.value)


class LossScale(Policy):
    """How each micro-batch's summed loss is normalised before backward."""
    BY_SIZE = "by-size"    # ÷ the units (examples or tokens) of the whole window: exact
    BY_COUNT = "by-count"  # per-micro-batch mean ÷ N: the textbook loss/N, pre-fix transformers
    BY_RANK_SIZE = "by-rank-size"  # ÷ this rank's units of the window, then DDP's mean: W ranks'
                                   # 2024 token bug (exact on one process)
    BY_SIZE_THEN_MEAN = "by-size-then-mean"  # ÷ the window's units on every rank, then the
    #                                          ranks' mean on top: 1/W too small (exact on one)
    NONE = "none"          # per-micro-batch mean, not divided by N: gradients N times too large


class Accumulation(Policy):
    """How a window's N micro-batches make one gradient (see engine.window_gradient)."""
    AUTO = "auto"            # gradcache for a loss that couples the batch when N > 1, else plain
    PLAIN = "plain"          # forward, loss, backward per micro-batch (a coupled loss: per B/N)
    GRADCACHE = "gradcache"  # embed all, loss of the whole window, re-embed with a graph


class ZeroGrad(Policy):
    """Where optimizer.zero_grad() runs."""
    EVERY_N = "every-n"                # after each optimizer step: the accumulation pattern
    EVERY_STEP = "every-step"          # before every micro-batch's backward
    NEVER = "never"                    # .grad keeps every gradient ever computed
    AFTER_BACKWARD = "after-backward"  # between backward and step: the step sees nothing


class Norm(Policy):
    NONE = "none"
    BN = "bn"
    GN = "gn"
    LN = "ln"
    IN = "in"


class BnMode(Policy):
    TRAIN = "train"    # batch statistics, running statistics updated
    FROZEN = "frozen"  # eval mode while training: a fixed per-channel affine map


class ClipAt(Policy):
    """Where clip_grad_norm_ runs (when clip_norm > 0)."""
    AFTER_ACCUMULATION = "after-accumulation"  # once, on the unscaled accumulated gradient
    PER_MICRO_BATCH = "per-micro-batch"        # after every backward: clips the partial sums
    BEFORE_UNSCALE = "before-unscale"  # the scaler mistake: the threshold meets scale × gradient


class Scheduler(Policy):
    NONE = "none"                    # the learning rate stays lr
    WARMUP_COSINE = "warmup-cosine"  # linear warm-up over warmup_steps, then cosine to 0


class SchedulerStep(Policy):
    """How often scheduler.step() runs."""
    PER_STEP = "per-step"                # once per optimizer step: the schedule as written
    PER_MICRO_BATCH = "per-micro-batch"  # once per micro-batch: the schedule runs N times fast


class RankSplit(Policy):
    """How W ranks share a window."""
    EXAMPLES = "examples"  # data parallel: each rank takes B/W whole examples
    TOKENS = "tokens"      # context parallel in miniature: every rank reads every sequence and
    #                        scores the W-th of its positions that is its own shard


class WindowOrder(Policy):
    """The order of a window's examples before the ranks take their slices and micro-batches."""
    AS_DRAWN = "as-drawn"    # as the seeded stream drew them
    BY_LENGTH = "by-length"  # fewest loss units first, as a length-grouped sampler leaves them
    #                          (group_by_length): rank 0 the shortest, the last rank the longest


class EpochEnd(Policy):
    """What the window stream does where an epoch ends (n training examples, B per window)."""
    RUN_ON = "run-on"            # no boundary: a window may hold the end of one epoch and the
                                 # start of the next; every window holds B examples
    SHORT_WINDOW = "short-window"  # each epoch ends with a window of its last n mod B examples
    CARRY_OVER = "carry-over"    # that short window is not flushed: no step, no zero_grad; its
                                 # gradients are added to the next epoch's first step


class DropoutMode(Policy):
    TRAIN = "train"  # dropout layers drop while training
    EVAL = "eval"    # dropout layers in eval mode while training: they drop nothing


class DropoutMasks(Policy):
    """Where a dropout mask's random numbers come from."""
    STREAM = "stream"            # torch's nn.Dropout: drawn from the arm's random stream, in the
                                 # order the forward passes run, so micro-batching changes them
    PER_EXAMPLE = "per-example"  # each example its own generator state, seeded by one draw per
                                 # window and its place in the window: the same however split


class Optimizer(Policy):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


class Dtype(Policy):
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Device(Policy):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"  # cuda when available


class Sync(Policy):
    """When a data-parallel arm (world_size > 1) all-reduces its gradient across the ranks."""
    NO_SYNC = "no-sync"  # no_sync() on the first N-1 micro-batches: all-reduce once a window
    EVERY_MICRO_BATCH = "every-micro-batch"  # after every backward: right, N× the all-reduces
    NEVER = "never"  # no_sync() on all: each rank steps on its own slice's gradient
    # fsdp: reduce-scattered after every backward into a gradient shard that is replaced, not
    # added to (the ZeRO-2-style bug): only the last micro-batch's gradient is left
    OVERWRITING = "every-micro-batch-overwriting"


class Parallel(Policy):
    """How the W ranks of a data-parallel arm hold the model and combine its gradient."""
    DDP = "ddp"    # DistributedDataParallel: a whole replica per rank, gradients all-reduced
    FSDP = "fsdp"  # FSDP2's fully_shard: parameters and gradients sharded, reduce-scattered


class Backend(Policy):
    """The torch.distributed backend of a data-parallel arm."""
    AUTO = "auto"  # nccl on CUDA, gloo on CPU
    GLOO = "gloo"
    NCCL = "nccl"


class Autocast(Policy):
    """The dtype torch.autocast runs each micro-batch's forward in (parameters stay float32)."""
    NONE = "none"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class GradAccumDtype(Policy):
    """Where a window's partial gradients are summed."""
    PARAM = "param"      # in .grad, in the parameters' dtype: every addition rounds there
    FLOAT32 = "float32"  # in a float32 buffer, rounded to the parameters' dtype once per window


class GradScaling(Policy):
    """torch.amp.GradScaler for float16: the loss scaled up before backward, so small
    gradients do not underflow; the window's gradient unscaled before anything reads it."""
    OFF = "off"
    ON = "on"


class Role(StrEnum):
    """What reads a setting, so the lab can tell which settings can change what."""
    SETUP = "setup"          # the setup's factories: the model's shape, the data, the loss
    SEED = "seed"            # where the random streams start: initial weights, example order
    PLACEMENT = "placement"  # where the model's copy lives: its dtype, device and ranks
    WINDOW = "window"        # how a window is cut into micro-batches: B and N
    PASSES = "passes"        # how each micro-batch's forward and backward compute
    STEP = "step"            # what the step does with the gradient: normalise, clear, clip,
    #                          the optimizer and schedule, the epoch's end, the all-reduce
    OBSERVE = "observe"      # what the run measures and records, changing no gradient
    RUNTIME = "runtime"      # how the machine runs it: threads, the rank backend


def _setting(role: Role, default, help: str):
    return field(default=default, metadata={"role": role, "help": help})


@dataclass(frozen=True)
class Settings:
    """Everything that decides how one arm trains. Names are part of the CLI contract; each
    field's metadata holds its help and its Role (what reads it)."""

    setup: str = _setting(
        Role.SETUP, "",
        "a training setup: built-in (digit-views) or your own 'pkg.module:factory', where "
        "factory(settings) returns a gradlab.setup.Setup (model, examples, loss); replaces model "
        "and dataset")
    model: str = _setting(
        Role.SETUP, "mlp",
        "toy-linear | mlp | cnn | gru-lm | transformer-lm, or your own 'pkg.module:factory'")
    dataset: str = _setting(
        Role.SETUP, "regression",
        "toy-pairs | regression | digits | docstrings, or your own 'pkg.module:factory'")
    norm: Norm = _setting(
        Role.SETUP, Norm.NONE,
        "normalisation layer in mlp/cnn: bn | gn | ln | in | none")
    hidden: int = _setting(Role.SETUP, 5, "mlp, digit-views: width of each hidden layer")
    depth: int = _setting(Role.SETUP, 1, "mlp, digit-views: number of hidden layers")
    channels: int = _setting(
        Role.SETUP, 8,
        "cnn: channels of the first conv layer (the second has twice)")
    groups: int = _setting(Role.SETUP, 4, "GroupNorm: number of groups; must divide the channels")
    min_len: int = _setting(Role.SETUP, 8, "docstrings: tokens in the shortest sequence")
    max_len: int = _setting(
        Role.SETUP, 64,
        "docstrings: tokens in the longest sequence (the rest is padding)")
    batch_size: int = _setting(
        Role.WINDOW, 64,
        "B, the effective batch: examples per optimizer step")
    accum_steps: int = _setting(
        Role.WINDOW, 1,
        "N, micro-batches per optimizer step (micro-batch = B/N)")
    loss_scale: LossScale = _setting(
        Role.STEP, LossScale.BY_SIZE,
        "loss normalisation: by-size (summed loss / units of the whole window, exact for examples "
        "and tokens alike; on W ranks the units of every rank, times W), by-count (each "
        "micro-batch's mean / N: the textbook loss/N), by-rank-size (summed loss / this rank's "
        "units of the window, then DDP's mean over the ranks: exact on one process), "
        "by-size-then-mean (summed loss / the window's units on every rank, then the ranks' mean "
        "on top: 1/W too small), none (each micro-batch's mean, not divided by N)")
    accumulation: Accumulation = _setting(
        Role.PASSES, Accumulation.AUTO,
        "how N micro-batches make one gradient: plain (forward, loss, backward per micro-batch; a "
        "loss that couples the batch then sees only B/N examples), gradcache (for a coupled loss: "
        "embed every micro-batch, loss of the whole window, re-embed with a graph; exact, memory "
        "of one micro-batch, one extra forward), auto (gradcache when the setup's loss couples the "
        "batch and N > 1, else plain)")
    temperature: float = _setting(
        Role.SETUP, 0.1,
        "digit-views: softmax temperature of the InfoNCE loss (similarities / temperature)")
    zero_grad: ZeroGrad = _setting(
        Role.STEP, ZeroGrad.EVERY_N,
        "where zero_grad() runs: every-n (after each optimizer step, i.e. every N batches), "
        "every-step (before every batch's backward), never, after-backward (between backward and "
        "step)")
    set_to_none: bool = _setting(
        Role.STEP, True,
        "zero_grad(set_to_none=...): drop .grad or fill it with 0")
    bn_mode: BnMode = _setting(
        Role.PASSES, BnMode.TRAIN,
        "BatchNorm while training: train (batch statistics) or frozen (eval mode)")
    optimizer: Optimizer = _setting(Role.STEP, Optimizer.SGD, "sgd | adam | adamw")
    clip_norm: float = _setting(
        Role.STEP, 0.0,
        "clip_grad_norm_: the largest global L2 norm of the gradient (0: no clipping)")
    clip_at: ClipAt = _setting(
        Role.STEP, ClipAt.AFTER_ACCUMULATION,
        "where clipping runs: after-accumulation (once, on the gradient the step applies, after a "
        "GradScaler's unscale_), per-micro-batch (after every backward, on the partial sum .grad "
        "holds) or before-unscale (the GradScaler mistake: clipping the scaled gradient)")
    dropout: float = _setting(
        Role.SETUP, 0.0,
        "mlp/cnn: dropout rate of a dropout layer after each hidden activation (0: none)")
    dropout_mode: DropoutMode = _setting(
        Role.PASSES, DropoutMode.TRAIN,
        "dropout while training: train (drops) or eval (drops nothing)")
    dropout_masks: DropoutMasks = _setting(
        Role.PASSES, DropoutMasks.STREAM,
        "dropout masks: stream (torch's nn.Dropout, from the arm's random stream: micro-batching "
        "changes them) or per-example (each example's own generator state: the same masks however "
        "the window is split)")
    mask_draws: int = _setting(
        Role.OBSERVE, 0,
        "dropout: at step 1, average the accumulated minus big-batch gradient over this many mask "
        "draws, and check that the mean is zero within 4 standard errors (checks.csv); 0: no check")
    rank_split: RankSplit = _setting(
        Role.WINDOW, RankSplit.EXAMPLES,
        "with world_size > 1, how the ranks share a window: examples (data parallel: B/W "
        "examples each) | tokens (context parallel in miniature: every rank reads every "
        "sequence and scores its own 1/W of the positions; token setups only)")
    window_order: WindowOrder = _setting(
        Role.WINDOW, WindowOrder.AS_DRAWN,
        "as-drawn | by-length: the window's examples sorted by their loss units (tokens) before "
        "the ranks and micro-batches take their slices, as a length-grouped sampler leaves "
        "them: on W ranks, rank 0 the shortest sequences and the last rank the longest")
    epoch_end: EpochEnd = _setting(
        Role.STEP, EpochEnd.RUN_ON,
        "where an epoch ends: run-on (no boundary, every window holds B examples), short-window "
        "(the epoch's last n mod B examples are a window of their own), carry-over (that short "
        "window is not flushed: its gradients join the next step)")
    lr: float = _setting(Role.STEP, 0.05, "learning rate")
    scheduler: Scheduler = _setting(
        Role.STEP, Scheduler.NONE,
        "learning-rate schedule: none or warmup-cosine (linear warm-up over warmup_steps, then "
        "cosine decay to 0 at the last step)")
    scheduler_step: SchedulerStep = _setting(
        Role.STEP, SchedulerStep.PER_STEP,
        "when scheduler.step() runs: per-step (after each optimizer step) or per-micro-batch (N "
        "times per optimizer step)")
    warmup_steps: int = _setting(Role.STEP, 0, "warmup-cosine: optimizer steps of linear warm-up")
    momentum: float = _setting(Role.STEP, 0.0, "sgd momentum")
    weight_decay: float = _setting(
        Role.STEP, 0.0,
        "weight decay (L2 for sgd/adam, decoupled for adamw)")
    steps: int = _setting(Role.STEP, 20, "optimizer steps each arm trains for")
    seed: int = _setting(Role.SEED, 0, "seed for initial weights and the order of examples")
    dtype: Dtype = _setting(Role.PLACEMENT, Dtype.FLOAT32, "float32 | float64 | bfloat16 | float16")
    device: Device = _setting(Role.PLACEMENT, Device.CPU, "cpu | cuda | auto (cuda when available)")
    autocast: Autocast = _setting(
        Role.PASSES, Autocast.NONE,
        "none | bfloat16 | float16: run each micro-batch's forward under torch.autocast in this "
        "dtype; the parameters stay float32 (dtype)")
    grad_accum_dtype: GradAccumDtype = _setting(
        Role.PASSES, GradAccumDtype.PARAM,
        "where partial gradients are summed: param (in .grad, in the parameters' dtype) or float32 "
        "(a float32 buffer, handed to the optimizer once per window)")
    grad_scaler: GradScaling = _setting(
        Role.PASSES, GradScaling.OFF,
        "on | off: torch.amp.GradScaler (with autocast=float16): the loss scaled before each "
        "backward, the window's gradient unscaled once, the step skipped when it holds inf/NaN")
    probe_every: int = _setting(
        Role.OBSERVE, 1,
        "compare gradients at the baseline's weights every K steps (0: only before step 1)")
    eval_every: int = _setting(
        Role.OBSERVE, 0,
        "held-out evaluation every K steps (0: only after the last)")
    trace: bool = _setting(
        Role.OBSERVE, False,
        "record the accumulated gradient after every micro-batch, and the weights after every step "
        "(trace.csv, weights.csv)")
    trace_elements: int = _setting(
        Role.OBSERVE, 8,
        "trace: how many elements of each parameter to record (the first ones)")
    world_size: int = _setting(
        Role.PLACEMENT, 1,
        "W, processes (ranks) that share each window with DistributedDataParallel: each takes B/W "
        "examples in N micro-batches. 1: one process. gradlab starts the ranks itself, or takes "
        "torchrun's")
    sync: Sync = _setting(
        Role.STEP, Sync.NO_SYNC,
        "with world_size > 1, when the gradient is all-reduced across ranks: no-sync (once per "
        "window: no_sync() on the first N-1 micro-batches), every-micro-batch (after every "
        "backward), never (each rank steps on its own gradient), every-micro-batch-overwriting "
        "(fsdp: reduce-scattered after every backward into a shard that is replaced, not added "
        "to)")
    find_unused_parameters: bool = _setting(
        Role.PLACEMENT, False,
        "parallel=ddp: DistributedDataParallel's find_unused_parameters, for a model whose "
        "parameters sit out some micro-batches (a head, a branch, an expert); false, DDP's "
        "default, stops the run with DDP's error when one gets no gradient in a synced backward")
    static_graph: bool = _setting(
        Role.PLACEMENT, False,
        "parallel=ddp: DistributedDataParallel's static_graph (the same parameters used in every "
        "backward)")
    parallel: Parallel = _setting(
        Role.PLACEMENT, Parallel.DDP,
        "with world_size > 1, how the ranks hold the model: ddp (DistributedDataParallel: a "
        "whole replica each, gradients all-reduced) | fsdp (FSDP2's fully_shard: parameters "
        "and gradients sharded across the ranks, gradients reduce-scattered)")
    time_steps: bool = _setting(
        Role.OBSERVE, False,
        "record each step's wall time (steps.csv step_seconds, its median in summary.csv): a "
        "measurement of this machine, so a run that records it is not byte-identical to its repeat")
    backend: Backend = _setting(
        Role.RUNTIME, Backend.AUTO,
        "with world_size > 1: torch.distributed backend, auto (nccl on CUDA, gloo on CPU) | gloo | "
        "nccl")
    update_norm: bool = _setting(
        Role.OBSERVE, False,
        "steps.csv: measure update_norm, the L2 norm of each step's change in the weights (costs a "
        "copy of the parameters per step; NaN when false)")
    cost: bool = _setting(
        Role.OBSERVE, False,
        "measure what each step costs (cost.csv): time per optimizer step, the bytes autograd "
        "saves for backward, peak memory (see the cost experiment)")
    budget_mb: float = _setting(
        Role.OBSERVE, 0.0,
        "cost: a memory budget in MB; the run names the largest micro-batch whose step fits in it "
        "(0: no budget)")
    threads: int = _setting(
        Role.RUNTIME, 0,
        "intra-op threads a trial runs with on CPU (0: one per worker process, or the cores --jobs "
        "gives when there are fewer trials than jobs)")

    def __post_init__(self):
        # a policy given as its string (dataclasses.replace in code, old run.json) becomes
        # its member, so every value a Settings holds is one the code dispatches on
        for f in dataclasses.fields(self):
            kind = type(f.default)
            if issubclass(kind, Enum) and not isinstance(getattr(self, f.name), kind):
                object.__setattr__(self, f.name, kind(getattr(self, f.name)))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_of(cls, key: str) -> dataclasses.Field:
        return {f.name: f for f in dataclasses.fields(cls)}[key]

    @classmethod
    def choices(cls, key: str) -> tuple[str, ...] | None:
        """The allowed values of a policy setting, as a spec writes them; None if free."""
        kind = type(cls.field_of(key).default)
        return tuple(member.value for member in kind) if issubclass(kind, Enum) else None

    @property
    def micro_batch(self) -> int:
        """Examples in the largest micro-batch (all are this size when W·N divides B)."""
        return -(-self.batch_size // (self.accum_steps * self.world_size))

    @classmethod
    def with_roles(cls, *roles: Role) -> frozenset[str]:
        """The names of the settings whose role is one of ``roles``."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata["role"] in roles)


# Settings a model factory never reads (the engine and the run do): arms differing from the
# baseline only in these compute their probes in the baseline's model. (A factory receives
# every setting; one that reads, say, lr anyway still gets it: the probe's model is only
# shared when nothing a factory builds from differs.)
FACTORY_BLIND = Settings.with_roles(Role.WINDOW, Role.PASSES, Role.STEP, Role.OBSERVE,
                                    Role.RUNTIME)
# Settings that change neither the model, nor the data's shapes, nor what one window's
# forward and backward cost: preflight builds and times one window per distinct value of
# the others, and reuses it for arms that differ only in these.
PREFLIGHT_BLIND = Settings.with_roles(Role.SEED, Role.STEP, Role.OBSERVE)

# the range of each numeric setting, and what to tell a user whose value is outside it
RANGES = {
    "batch_size": (1, None, "it must be at least 1"),
    "accum_steps": (1, None, "N must be at least 1 (1 = no accumulation)"),
    "steps": (1, None, "train for at least 1 step"),
    "hidden": (1, None, "it must be at least 1"),
    "depth": (1, None, "it must be at least 1"),
    "channels": (1, None, "it must be at least 1"),
    "groups": (1, None, "it must be at least 1"),
    "trace_elements": (1, None, "record at least 1 element of each parameter"),
    "world_size": (1, None, "use 1 (one process) or more ranks"),
    "min_len": (2, None, "a sequence needs at least 2 tokens (one to read, one to predict)"),
    "max_len": (2, None, "a sequence needs at least 2 tokens (one to read, one to predict)"),
    "probe_every": (0, None, "use 0 or a positive number of steps"),
    "eval_every": (0, None, "use 0 or a positive number of steps"),
    "lr": (0, None, "the learning rate cannot be negative"),
    "clip_norm": (0, None, "give the largest gradient norm, > 0 (or 0 for no clipping)"),
    # [0, 1): the largest float below 1 is the top, so a rate of 1 (drop everything) is refused
    "dropout": (0, math.nextafter(1.0, 0.0), "a dropout rate must be in [0, 1) (0: no dropout)"),
    "mask_draws": (0, None, "use 0 (no check) or a number of mask draws, at least 2"),
    "warmup_steps": (0, None, "use 0 or a positive number of steps"),
    "momentum": (0, None, "momentum cannot be negative"),
    "weight_decay": (0, None, "weight decay cannot be negative"),
    "seed": (0, 2**63 - 1, "use a seed from 0 to 2^63 - 1"),
    "budget_mb": (0, None, "give a budget in MB, or 0 for none"),
    "threads": (0, None, "use 0 (automatic) or a number of threads"),
}
# a user's own factory: 'pkg.module:callable'
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def coerce(key: str, value: Any, where: str) -> Any:
    """Check one setting against its type, choices and range; parse it if it is a string."""
    if key not in Settings.names():
        raise GradlabError(f"{where}: unknown setting '{key}'; allowed: "
                           f"{', '.join(Settings.names())} (see 'gradlab list')")
    f = Settings.field_of(key)
    choices = Settings.choices(key)
    if choices is not None:  # a policy: one of its enum's strings
        value = value.strip() if isinstance(value, str) else value
        if value not in choices:
            raise GradlabError(f"{where}: {key} = {value!r} is not allowed; "
                               f"choose one of: {', '.join(choices)}")
        return type(f.default)(value)
    kind = type(f.default)
    if isinstance(value, str) and kind is not str:
        value = _parse(value, kind, key, where)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise GradlabError(f"{where}: {key} = {value!r} must be {kind.__name__} "
                           f"(e.g. {key} = {f.default!r})")
    if kind is float and not math.isfinite(value):
        raise GradlabError(f"{where}: {key} = {value!r} is not a finite number; "
                           f"give a number such as {key} = {f.default!r}")
    if key in RANGES:
        low, high, why = RANGES[key]
        if value < low or (high is not None and value > high):
            raise GradlabError(f"{where}: {key}={value}; {why}")
    if key in ("setup", "model", "dataset") and ":" in value \
            and not IMPORT_PATH.fullmatch(value):
        raise GradlabError(f"{where}: {key} = {value!r} is not an import path; give your own "
                           f"as 'pkg.module:factory' or a built-in name (see 'gradlab list')")
    return value


def _parse(text: str, kind: type, key: str, where: str) -> Any:
    text = text.strip()
    try:
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise GradlabError(f"{where}: {key} = {text!r} is not a valid {kind.__name__}") from None

