"""Specs, arms and trials: what to run, as data.

A spec is a TOML file: base ``[settings]``, named ``[arms.NAME]`` tables that
override them (one marked ``baseline = true``) and ``[sweep]`` axes. Expanding a
spec gives trials; each trial holds every arm, fully resolved into frozen
``Settings``. Precedence, lowest first: defaults < [settings] < sweep value <
arm override < ``--set ARM.key=v``. ``--set key=v`` replaces the setting in
[settings] and drops every sweep axis that sets the key; ``--set key=a,b`` makes
it a sweep axis. Every value is checked where it is read, so an error names the
place it came from: the file and its [section], or the --set.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from importlib import resources
from pathlib import Path
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


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Everything that decides how one arm trains. Names are part of the CLI contract."""

    setup: str = _setting(
        "", "a training setup: built-in (digit-views) or your own 'pkg.module:factory', where "
            "factory(settings) returns a gradlab.setup.Setup (model, examples, loss); "
            "replaces model and dataset")
    model: str = _setting(
        "mlp", "toy-linear | mlp | cnn | gru-lm | transformer-lm, or your own "
               "'pkg.module:factory'")
    dataset: str = _setting(
        "regression", "toy-pairs | regression | digits | docstrings, or your own "
                      "'pkg.module:factory'")
    norm: Norm = _setting(Norm.NONE, "normalisation layer in mlp/cnn: bn | gn | ln | in | none")
    hidden: int = _setting(5, "mlp, digit-views: width of each hidden layer")
    depth: int = _setting(1, "mlp, digit-views: number of hidden layers")
    channels: int = _setting(8, "cnn: channels of the first conv layer (the second has twice)")
    groups: int = _setting(4, "GroupNorm: number of groups; must divide the channels")
    min_len: int = _setting(8, "docstrings: tokens in the shortest sequence")
    max_len: int = _setting(64, "docstrings: tokens in the longest sequence (the rest is padding)")
    batch_size: int = _setting(64, "B, the effective batch: examples per optimizer step")
    accum_steps: int = _setting(1, "N, micro-batches per optimizer step (micro-batch = B/N)")
    loss_scale: LossScale = _setting(
        LossScale.BY_SIZE,
        "loss normalisation: by-size (summed loss / units of the whole window, exact for "
        "examples and tokens alike), by-count (each micro-batch's mean / N: the textbook "
        "loss/N), none (each micro-batch's mean, not divided by N)")
    accumulation: Accumulation = _setting(
        Accumulation.AUTO,
        "how N micro-batches make one gradient: plain (forward, loss, backward per "
        "micro-batch; a loss that couples the batch then sees only B/N examples), gradcache "
        "(for a coupled loss: embed every micro-batch, loss of the whole window, re-embed "
        "with a graph; exact, memory of one micro-batch, one extra forward), auto "
        "(gradcache when the setup's loss couples the batch and N > 1, else plain)")
    temperature: float = _setting(
        0.1, "digit-views: softmax temperature of the InfoNCE loss (similarities / temperature)")
    zero_grad: ZeroGrad = _setting(
        ZeroGrad.EVERY_N,
        "where zero_grad() runs: every-n (after each optimizer step, i.e. every N batches), "
        "every-step (before every batch's backward), never, after-backward (between "
        "backward and step)")
    set_to_none: bool = _setting(True, "zero_grad(set_to_none=...): drop .grad or fill it with 0")
    bn_mode: BnMode = _setting(
        BnMode.TRAIN, "BatchNorm while training: train (batch statistics) or frozen (eval mode)")
    optimizer: Optimizer = _setting(Optimizer.SGD, "sgd | adam | adamw")
    clip_norm: float = _setting(
        0.0, "clip_grad_norm_: the largest global L2 norm of the gradient (0: no clipping)")
    clip_at: ClipAt = _setting(
        ClipAt.AFTER_ACCUMULATION,
        "where clipping runs: after-accumulation (once, on the gradient the step applies, "
        "after a GradScaler's unscale_), per-micro-batch (after every backward, on the "
        "partial sum .grad holds) or before-unscale (the GradScaler mistake: clipping the "
        "scaled gradient)")
    dropout: float = _setting(
        0.0, "mlp/cnn: dropout rate of a dropout layer after each hidden activation (0: none)")
    dropout_mode: DropoutMode = _setting(
        DropoutMode.TRAIN, "dropout while training: train (drops) or eval (drops nothing)")
    dropout_masks: DropoutMasks = _setting(
        DropoutMasks.STREAM,
        "dropout masks: stream (torch's nn.Dropout, from the arm's random stream: micro-"
        "batching changes them) or per-example (each example's own generator state: the "
        "same masks however the window is split)")
    mask_draws: int = _setting(
        0, "dropout: at step 1, average the accumulated minus big-batch gradient over this "
           "many mask draws, and check that the mean is zero within 4 standard errors "
           "(checks.csv); 0: no check")
    epoch_end: EpochEnd = _setting(
        EpochEnd.RUN_ON,
        "where an epoch ends: run-on (no boundary, every window holds B examples), "
        "short-window (the epoch's last n mod B examples are a window of their own), "
        "carry-over (that short window is not flushed: its gradients join the next step)")
    lr: float = _setting(0.05, "learning rate")
    scheduler: Scheduler = _setting(
        Scheduler.NONE, "learning-rate schedule: none or warmup-cosine (linear warm-up over "
                        "warmup_steps, then cosine decay to 0 at the last step)")
    scheduler_step: SchedulerStep = _setting(
        SchedulerStep.PER_STEP, "when scheduler.step() runs: per-step (after each optimizer "
                                "step) or per-micro-batch (N times per optimizer step)")
    warmup_steps: int = _setting(0, "warmup-cosine: optimizer steps of linear warm-up")
    momentum: float = _setting(0.0, "sgd momentum")
    weight_decay: float = _setting(0.0, "weight decay (L2 for sgd/adam, decoupled for adamw)")
    steps: int = _setting(20, "optimizer steps each arm trains for")
    seed: int = _setting(0, "seed for initial weights and the order of examples")
    dtype: Dtype = _setting(Dtype.FLOAT32, "float32 | float64 | bfloat16 | float16")
    device: Device = _setting(Device.CPU, "cpu | cuda | auto (cuda when available)")
    autocast: Autocast = _setting(
        Autocast.NONE, "none | bfloat16 | float16: run each micro-batch's forward under "
                       "torch.autocast in this dtype; the parameters stay float32 (dtype)")
    grad_accum_dtype: GradAccumDtype = _setting(
        GradAccumDtype.PARAM, "where partial gradients are summed: param (in .grad, in the "
                              "parameters' dtype) or float32 (a float32 buffer, handed to the "
                              "optimizer once per window)")
    grad_scaler: GradScaling = _setting(
        GradScaling.OFF, "on | off: torch.amp.GradScaler (with autocast=float16): the loss "
                        "scaled before each backward, the window's gradient unscaled once, the "
                        "step skipped when it holds inf/NaN")
    probe_every: int = _setting(
        1, "compare gradients at the baseline's weights every K steps (0: only before step 1)")
    eval_every: int = _setting(0, "held-out evaluation every K steps (0: only after the last)")
    trace: bool = _setting(False, "record the accumulated gradient after every micro-batch, "
                                  "and the weights after every step (trace.csv, weights.csv)")
    trace_elements: int = _setting(
        8, "trace: how many elements of each parameter to record (the first ones)")
    world_size: int = _setting(
        1, "W, processes (ranks) that share each window with DistributedDataParallel: each "
           "takes B/W examples in N micro-batches. 1: one process. gradlab starts the ranks "
           "itself, or takes torchrun's")
    sync: Sync = _setting(
        Sync.NO_SYNC,
        "with world_size > 1, when the gradient is all-reduced across ranks: no-sync (once per "
        "window: no_sync() on the first N-1 micro-batches), every-micro-batch (after every "
        "backward), never (each rank steps on its own gradient)")
    time_steps: bool = _setting(
        False, "record each step's wall time (steps.csv step_seconds, its median in summary.csv):"
               " a measurement of this machine, so a run that records it is not byte-identical "
               "to its repeat")
    backend: Backend = _setting(
        Backend.AUTO, "with world_size > 1: torch.distributed backend, auto (nccl on CUDA, gloo "
                      "on CPU) | gloo | nccl")
    update_norm: bool = _setting(
        False, "steps.csv: measure update_norm, the L2 norm of each step's change in the "
               "weights (costs a copy of the parameters per step; NaN when false)")
    cost: bool = _setting(
        False, "measure what each step costs (cost.csv): time per optimizer step, the bytes "
               "autograd saves for backward, peak memory (see the cost experiment)")
    budget_mb: float = _setting(
        0.0, "cost: a memory budget in MB; the run names the largest micro-batch whose step "
             "fits in it (0: no budget)")
    threads: int = _setting(
        0, "intra-op threads a trial runs with on CPU (0: one per worker process, or the "
           "cores --jobs gives when there are fewer trials than jobs)")

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


@dataclass(frozen=True)
class Arm:
    name: str
    settings: Settings
    baseline: bool = False
    expect: str | None = None  # "equivalent" | "differs" | None: what the spec promises
    help: str = ""


@dataclass(frozen=True)
class Trial:
    index: int
    swept: dict[str, Any]  # the sweep values that define this trial
    arms: tuple[Arm, ...]

    @property
    def baseline(self) -> Arm:
        return next(a for a in self.arms if a.baseline)


@dataclass
class ArmSpec:
    overrides: dict[str, Any]
    baseline: bool = False
    expect: str | None = None
    help: str = ""
    origins: dict[str, str] = field(default_factory=dict)  # key -> "--set ARM.key" when set so


@dataclass
class Spec:
    name: str
    source: str  # path or "built-in NAME", for error messages
    description: str
    settings: dict[str, Any]
    arms: dict[str, ArmSpec]
    sweep: dict[str, list[Any]]
    text: str = ""  # the TOML as read, kept in run.json
    # ("settings" | "sweep", key) -> "--set KEY" for what the command line replaced
    origins: dict[tuple[str, str], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what --set dropped or left alone

    def origin(self, section: str, key: str) -> str:
        """Where a [settings] value or a sweep axis came from, as an error message names it."""
        where = f"{self.source} [sweep] {key}" if section == "sweep" else \
            f"{self.source} [settings]"
        return self.origins.get((section, key), where)


ARM_META_KEYS = ("baseline", "expect", "help")
TOP_KEYS = ("name", "description", "settings", "arms", "sweep")
# a spec needs arms to compare; this is what the error shows as a start
ARMS_EXAMPLE = ("[arms.big-batch] with baseline = true and accum_steps = 1, and "
                "[arms.accumulated] with accum_steps = 4")


# ----------------------------------------------------------------------------- loading

def builtin_dir() -> Path:
    return Path(str(resources.files("gradlab") / "experiments"))


def builtin_specs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(builtin_dir().glob("*.toml"))}


def local_dir() -> Path:
    """Your own specs: ./experiments, looked in before the built-in ones."""
    return Path("experiments")


def local_specs() -> dict[str, Path]:
    """Your own specs in ./experiments, by name."""
    folder = local_dir()
    return {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def findable_specs() -> dict[str, Path]:
    """Every spec `gradlab run NAME` finds by name: ./experiments first, then the built-ins
    (a local spec named like a built-in one replaces it)."""
    return {**builtin_specs(), **local_specs()}


def is_builtin(path: Path) -> bool:
    return path.resolve().parent == builtin_dir().resolve()


def find_spec(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        raise GradlabError(f"'{name_or_path}' is a folder, not a spec file; give a .toml file "
                           f"or a built-in name ({_builtin_names()})")
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise GradlabError(f"spec file '{name_or_path}' does not exist; "
                               f"give a .toml path or a built-in name ({_builtin_names()})")
        return path
    local = local_dir() / f"{name_or_path}.toml"
    if local.is_file():
        return local
    specs = builtin_specs()
    if name_or_path not in specs:
        raise GradlabError(f"no built-in experiment '{name_or_path}'; "
                           f"choose one of {_builtin_names()} or give a path to a .toml spec")
    return specs[name_or_path]


def _builtin_names() -> str:
    return ", ".join(builtin_specs()) or "none installed"


def load_spec(name_or_path: str) -> Spec:
    path = find_spec(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise GradlabError(f"{path}: cannot read the spec ({reason}); give a readable "
                           f"UTF-8 .toml file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise GradlabError(f"{path}: not valid TOML ({err}); fix the syntax") from None
    return parse_spec(data, source=str(path), default_name=path.stem, text=text)


def parse_spec(data: dict, source: str, default_name: str = "spec", text: str = "") -> Spec:
    _reject_unknown(data, TOP_KEYS, source, "top level")
    name = data.get("name", default_name)
    if not isinstance(name, str) or name.strip(" .") == "" or re.search(r"[/\\\x00-\x1f]", name):
        raise GradlabError(f"{source}: name = {name!r}; it names the run directory, so give "
                           f"a short text without '/' (e.g. name = \"{default_name}\")")
    settings = data.get("settings", {})
    _expect_table(settings, source, "[settings]")
    for key, value in settings.items():
        settings[key] = coerce(key, value, f"{source} [settings]")

    arm_tables = data.get("arms", {})
    _expect_table(arm_tables, source, "[arms]")
    if not arm_tables:
        raise GradlabError(f"{source}: no arms; a spec compares arms against a baseline, "
                           f"so add them, e.g. {ARMS_EXAMPLE}")
    arms = {arm: _parse_arm(arm, table, source) for arm, table in arm_tables.items()}
    baselines = [n for n, a in arms.items() if a.baseline]
    if len(baselines) != 1:
        raise GradlabError(f"{source}: exactly one arm needs 'baseline = true' "
                           f"(found {len(baselines)}: {', '.join(baselines) or 'none'})")

    sweep = data.get("sweep", {})
    _expect_table(sweep, source, "[sweep]")
    for axis, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise GradlabError(f"{source} [sweep]: '{axis}' must be a non-empty list of values")
        where = f"{source} [sweep] {axis}"
        if all(isinstance(v, dict) for v in values):  # a zipped axis: each value sets several keys
            # ... and may promise what the arms without an expect of their own do there
            sweep[axis] = [{k: _expectation(x, where) if k == "expect" else coerce(k, x, where)
                            for k, x in v.items()} for v in values]
        else:
            sweep[axis] = [coerce(axis, v, where) for v in values]
    # one arm compares nothing, unless the spec compares its trials (norm-training does)
    if len(arms) == 1 and not sweep:
        raise GradlabError(f"{source}: one arm ({baselines[0]}) and no [sweep], so there is "
                           f"nothing to compare; add an arm to compare with the baseline "
                           f"(e.g. [arms.accumulated] with accum_steps = 4), or a [sweep] "
                           f"whose trials are compared")

    return Spec(name=name, source=source, description=str(data.get("description", "")),
                settings=settings, arms=arms, sweep=sweep, text=text)


def _parse_arm(name: str, table: Any, source: str) -> ArmSpec:
    where = f"{source} [arms.{name}]"
    if not isinstance(table, dict):
        raise GradlabError(f"{where} must be a table of settings (found {table!r}); write "
                           f"[arms.{name}] on a line of its own, then its settings")
    baseline = table.get("baseline", False)
    if not isinstance(baseline, bool):
        raise GradlabError(f"{where}: baseline = {baseline!r} must be true or false")
    overrides = {k: coerce(k, v, where) for k, v in table.items() if k not in ARM_META_KEYS}
    return ArmSpec(overrides, baseline, _expectation(table.get("expect"), where),
                   str(table.get("help", "")))


def _expectation(value: Any, where: str) -> str | None:
    if value not in (None, "equivalent", "differs"):
        raise GradlabError(f"{where}: expect = {value!r}; allowed: 'equivalent', 'differs'")
    return value


def _reject_unknown(data: dict, allowed, source: str, where: str) -> None:
    for key in data:
        if key not in allowed:
            raise GradlabError(f"{source}: unknown key '{key}' at {where}; "
                               f"allowed: {', '.join(allowed)}")


def _expect_table(value, source: str, where: str) -> None:
    if not isinstance(value, dict):
        raise GradlabError(f"{source}: {where} must be a table (found {value!r})")


# ----------------------------------------------------------------------------- values

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
# the built-in models that put a dropout layer after each hidden activation when dropout > 0
DROPOUT_MODELS = ("mlp", "cnn")
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


def apply_overrides(spec: Spec, assignments: list[str]) -> Spec:
    """Apply ``--set`` assignments in order; what they leave alone goes to ``spec.notes``.

    ``key=value`` replaces the [settings] value and drops every sweep axis that sets the
    key; ``key=a,b,c`` makes the key a sweep axis. Either reaches every arm that does not
    set the key itself; one that reaches no arm is refused. ``ARM.key=value`` sets the key
    in that arm, over the arm's own value.
    """
    for item in assignments:
        target, sep, raw = item.partition("=")
        target = target.strip()
        arm, dot, key = target.rpartition(".")
        if not sep or not key or (dot and not arm):
            raise GradlabError(f"--set {item!r}: write --set key=value (or key=v1,v2 to sweep, "
                               f"or ARM.key=value for one arm)")
        if dot:
            _set_in_arm(spec, arm, key, raw)
        else:
            _set_for_all(spec, key, raw)
    return spec


def _set_in_arm(spec: Spec, arm: str, key: str, raw: str) -> None:
    where = f"--set {arm}.{key}"
    if arm not in spec.arms:
        raise GradlabError(f"{where}: no arm '{arm}' in {spec.source}; its arms are "
                           f"{', '.join(spec.arms)}")
    if "," in raw:
        raise GradlabError(f"{where}={raw}: an arm takes one value; to sweep a value, use "
                           f"--set {key}={raw}")
    spec.arms[arm].overrides[key] = coerce(key, raw, where)
    spec.arms[arm].origins[key] = where


def _set_for_all(spec: Spec, key: str, raw: str) -> None:
    where = f"--set {key}"
    values = [coerce(key, v, where) for v in raw.split(",")]
    own = {name: arm.overrides[key] for name, arm in spec.arms.items() if key in arm.overrides}
    if len(own) == len(spec.arms):
        example = next((n for n, a in spec.arms.items() if not a.baseline), next(iter(own)))
        values_of = ", ".join(f"{name}: {value!r}" for name, value in own.items())
        raise GradlabError(f"--set {key}={raw} would change nothing: every arm of {spec.name} "
                           f"sets {key} itself ({values_of}); to change one arm, use --set "
                           f"ARM.{key}=VALUE, e.g. --set {example}.{key}={raw}")
    for axis, axis_values in list(spec.sweep.items()):
        if axis != key and _is_zipped(axis_values) and any(key in v for v in axis_values):
            del spec.sweep[axis]  # its other keys went with this one: keeping them half-made
            others = sorted({k for v in axis_values for k in v} - {key})
            also = f", whose values also set {', '.join(others)}" if others else ""
            spec.notes.append(f"note: --set {key} replaces the sweep axis '{axis}'{also}; "
                              f"those now come from [settings] or another --set")
    if len(values) == 1:
        spec.settings[key] = values[0]
        spec.sweep.pop(key, None)
        spec.origins["settings", key] = where
    else:
        spec.sweep[key] = values
        spec.origins["sweep", key] = where
    if own:
        taking = [name for name in spec.arms if name not in own]
        kept = "; ".join(f"arm {name} keeps its own {key} = {value!r}"
                         for name, value in own.items())
        spec.notes.append(f"note: --set {key}={raw} applies to {_arms(taking)}; {kept} "
                          f"(--set ARM.{key}=VALUE sets it for one arm)")


def _is_zipped(axis_values: list) -> bool:
    return bool(axis_values) and isinstance(axis_values[0], dict)


def _arms(names: list[str]) -> str:
    return f"arm {names[0]}" if len(names) == 1 else f"arms {', '.join(names)}"


# ----------------------------------------------------------------------------- expansion

def expand(spec: Spec) -> list[Trial]:
    """All trials of a spec: the product of its sweep axes, each with every arm resolved."""
    axes = list(spec.sweep.items())
    trials: list[Trial] = []
    seen: set = set()
    for combo in itertools.product(*(values for _, values in axes)):
        swept: dict[str, Any] = {}
        axis_of: dict[str, str] = {}  # swept key -> the axis that set it, for messages
        for (axis, _), value in zip(axes, combo, strict=True):
            point = value if isinstance(value, dict) else {axis: value}
            swept.update(point)
            axis_of.update(dict.fromkeys(point, axis))
        trial_expect = swept.pop("expect", None)  # from a zipped sweep value
        key = tuple(sorted(swept.items()))
        if key in seen:  # a --set made two sweep values identical
            continue
        seen.add(key)
        arms = []
        for arm_name, arm in spec.arms.items():
            settings = Settings(**{**spec.settings, **swept, **arm.overrides})
            validate(settings, f"arm '{arm_name}'",
                     functools.partial(_origin, spec, arm_name, arm, axis_of))
            expect = arm.expect or (None if arm.baseline else trial_expect)
            arms.append(Arm(arm_name, settings, arm.baseline, expect, arm.help))
        threads = sorted({a.settings.threads for a in arms})
        if len(threads) > 1:  # a trial's arms run in one process, in lockstep
            raise GradlabError(f"{spec.source}: the arms of a trial run in one process, so "
                               f"with one thread count, but they set threads = {threads}; "
                               f"set threads for all arms ([settings] or --set threads=N)")
        trials.append(Trial(len(trials), swept, tuple(arms)))
    # every trial names the same keys, so CSV columns line up when zipped axes differ
    keys = list(dict.fromkeys(k for t in trials for k in t.swept))
    base = {**{f.name: f.default for f in dataclasses.fields(Settings)}, **spec.settings}
    return [dataclasses.replace(t, swept={k: t.swept.get(k, base[k]) for k in keys})
            for t in trials]


def _origin(spec: Spec, arm_name: str, arm: ArmSpec, axis_of: dict[str, str], key: str) -> str:
    """Where an arm's value of ``key`` came from, highest precedence first."""
    if key in arm.overrides:
        return arm.origins.get(key, f"{spec.source} [arms.{arm_name}]")
    if key in axis_of:
        return spec.origin("sweep", axis_of[key])
    if key in spec.settings:
        return spec.origin("settings", key)
    return "the default"


def validate(s: Settings, where: str, origin=lambda key: "") -> None:
    """Checks that need more than one setting (each value alone was checked by coerce).

    ``origin(key)`` says where the arm's value of a key came from, for the message.
    """
    def shown(key: str) -> str:
        came_from = origin(key)
        return f"{key}={getattr(s, key)}" + (f" ({came_from})" if came_from else "")

    if s.accum_steps > s.batch_size:
        raise GradlabError(f"{where}: {shown('accum_steps')} is larger than "
                           f"{shown('batch_size')}, so a micro-batch would be empty; use "
                           f"accum_steps <= batch_size")
    if s.temperature <= 0:
        raise GradlabError(f"{where}: {shown('temperature')}; the temperature divides the "
                           f"similarities, so it must be positive (e.g. temperature=0.1)")
    if s.accumulation == Accumulation.GRADCACHE and s.loss_scale != LossScale.BY_SIZE:
        raise GradlabError(f"{where}: {shown('accumulation')} computes one loss over the whole "
                           f"window, so {shown('loss_scale')} has no micro-batch losses to "
                           f"combine; use loss_scale=by-size with gradcache")
    if s.accum_steps * s.world_size > s.batch_size:
        raise GradlabError(f"{where}: {shown('world_size')} ranks x {shown('accum_steps')} "
                           f"micro-batches is more than {shown('batch_size')} examples, so a "
                           f"rank's micro-batch would be empty; use world_size x accum_steps "
                           f"<= batch_size")
    if s.world_size > 1 and s.backend == Backend.NCCL and s.device == Device.CPU:
        raise GradlabError(f"{where}: {shown('backend')} all-reduces CUDA tensors only, and "
                           f"{shown('device')}; use backend=gloo (or auto), or device=cuda")
    if s.budget_mb > 0 and not s.cost:
        raise GradlabError(f"{where}: {shown('budget_mb')} needs cost=true, which measures "
                           f"the memory it is compared with; run the cost experiment "
                           f"(gradlab run cost --set budget_mb=...) or add --set cost=true")
    if s.min_len > s.max_len:
        raise GradlabError(f"{where}: {shown('min_len')} is larger than {shown('max_len')}; "
                           f"use min_len <= max_len")
    if s.clip_norm == 0 and origin("clip_at") not in ("", "the default"):
        raise GradlabError(f"{where}: {shown('clip_at')} asks for clipping but "
                           f"{shown('clip_norm')} turns it off; give clip_norm > 0, the "
                           f"largest gradient norm")
    if s.dropout > 0 and (s.setup or s.model not in DROPOUT_MODELS):
        raise GradlabError(f"{where}: {shown('dropout')} but only the built-in "
                           f"{' and '.join(DROPOUT_MODELS)} have a dropout layer; use one of "
                           f"them, or put dropout in your own model and leave dropout=0")
    if s.mask_draws == 1:
        raise GradlabError(f"{where}: {shown('mask_draws')}; a mean and its standard error "
                           f"need at least 2 draws (0: no check)")
    if s.mask_draws and (s.dropout == 0 or s.dropout_mode != DropoutMode.TRAIN):
        off = shown("dropout") if s.dropout == 0 else shown("dropout_mode")
        raise GradlabError(f"{where}: {shown('mask_draws')} averages over dropout masks, but "
                           f"with {off} there are none; set dropout > 0 and "
                           f"dropout_mode=train, or mask_draws=0")
    if s.scheduler == Scheduler.NONE and (s.warmup_steps or origin("scheduler_step")
                                          not in ("", "the default")):
        asked = shown("warmup_steps") if s.warmup_steps else shown("scheduler_step")
        raise GradlabError(f"{where}: {asked} needs a schedule, but {shown('scheduler')}; "
                           f"set scheduler=warmup-cosine")
    if s.scheduler == Scheduler.WARMUP_COSINE and s.warmup_steps >= s.steps:
        raise GradlabError(f"{where}: {shown('warmup_steps')} leaves none of the "
                           f"{shown('steps')} for the cosine; use warmup_steps < steps")
    validate_precision(s, where, shown)


def validate_precision(s: Settings, where: str, shown) -> None:
    """autocast, grad_scaler, grad_accum_dtype and clip_at: the combinations that mean
    something (what torch itself supports on the device is checked when the model is built)."""
    if s.autocast != Autocast.NONE and s.dtype != Dtype.FLOAT32:
        raise GradlabError(f"{where}: {shown('autocast')} with {shown('dtype')}: autocast "
                           f"computes in {s.autocast} from float32 parameters; set dtype=float32, "
                           f"or autocast=none to compute in {s.dtype} itself")
    if s.grad_scaler == GradScaling.ON and s.autocast != Autocast.FLOAT16:
        raise GradlabError(f"{where}: {shown('grad_scaler')} with {shown('autocast')} and "
                           f"{shown('dtype')}: a GradScaler keeps float16 gradients from "
                           f"underflowing and unscales float32 ones, so it needs dtype=float32 "
                           f"with autocast=float16 (bfloat16 and float32 have float32's range: "
                           f"use grad_scaler=off)")
    if s.grad_scaler == GradScaling.ON and s.zero_grad == ZeroGrad.NEVER:
        raise GradlabError(f"{where}: {shown('grad_scaler')} with {shown('zero_grad')}: the "
                           f"scaler unscales all of .grad once per window, so .grad must start "
                           f"each window empty; use zero_grad=every-n")
    if s.grad_accum_dtype == GradAccumDtype.FLOAT32 and s.dtype == Dtype.FLOAT64:
        raise GradlabError(f"{where}: {shown('grad_accum_dtype')} with {shown('dtype')} would "
                           f"round float64 gradients to float32; use grad_accum_dtype=param")
    if s.world_size > 1 and s.grad_accum_dtype == GradAccumDtype.FLOAT32:
        raise GradlabError(f"{where}: {shown('world_size')} with {shown('grad_accum_dtype')}: "
                           f"DDP all-reduces what .grad holds at the last backward, not a "
                           f"buffer beside it; use grad_accum_dtype=param")
    if s.clip_at == ClipAt.PER_MICRO_BATCH and (s.grad_scaler == GradScaling.ON or
                                                s.grad_accum_dtype == GradAccumDtype.FLOAT32):
        other = shown("grad_scaler") if s.grad_scaler == GradScaling.ON \
            else shown("grad_accum_dtype")
        raise GradlabError(f"{where}: {shown('clip_at')} with {other}: clipping each partial "
                           f"sum is measured with the gradient summed in .grad, unscaled; use "
                           f"grad_scaler=off and grad_accum_dtype=param, or "
                           f"clip_at=after-accumulation")
    if s.clip_at == ClipAt.BEFORE_UNSCALE and s.grad_scaler == GradScaling.OFF:
        raise GradlabError(f"{where}: {shown('clip_at')} with {shown('grad_scaler')}: there "
                           f"is no unscale_ to clip before; use grad_scaler=on, or "
                           f"clip_at=after-accumulation")
