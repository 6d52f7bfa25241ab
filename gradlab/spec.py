"""Specs, arms and trials: what to run, as data.

A spec is a TOML file: base ``[settings]``, named ``[arms.NAME]`` tables that
override them (one marked ``baseline = true``) and ``[sweep]`` axes. Expanding a
spec gives trials; each trial holds every arm, fully resolved into frozen
``Settings``. Precedence, lowest first: defaults < [settings] < sweep value <
arm override. ``--set key=v`` replaces the setting in [settings] and drops a
sweep axis of that key; ``--set key=a,b`` makes it a sweep axis.
"""

from __future__ import annotations

import dataclasses
import itertools
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


class LossScale(StrEnum):
    """How each micro-batch's summed loss is normalised before backward."""
    BY_SIZE = "by-size"    # ÷ the units (examples or tokens) of the whole window: exact
    BY_COUNT = "by-count"  # per-micro-batch mean ÷ N: the textbook loss/N, pre-fix transformers
    NONE = "none"          # per-micro-batch mean, not divided by N: gradients N times too large


class ZeroGrad(StrEnum):
    """Where optimizer.zero_grad() runs."""
    EVERY_N = "every-n"                # after each optimizer step: the accumulation pattern
    EVERY_STEP = "every-step"          # before every micro-batch's backward
    NEVER = "never"                    # .grad keeps every gradient ever computed
    AFTER_BACKWARD = "after-backward"  # between backward and step: the step sees nothing


class Norm(StrEnum):
    NONE = "none"
    BN = "bn"
    GN = "gn"
    LN = "ln"
    IN = "in"


class BnMode(StrEnum):
    TRAIN = "train"    # batch statistics, running statistics updated
    FROZEN = "frozen"  # eval mode while training: a fixed per-channel affine map


class Optimizer(StrEnum):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


class Dtype(StrEnum):
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Device(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"  # cuda when available


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Everything that decides how one arm trains. Names are part of the CLI contract."""

    setup: str = _setting(
        "", "your own training setup, 'pkg.module:factory': factory(settings) returns a "
            "gradlab.setup.Setup (model, examples, loss); replaces model and dataset")
    model: str = _setting(
        "mlp", "toy-linear | mlp | cnn | gru-lm | transformer-lm, or your own "
               "'pkg.module:factory'")
    dataset: str = _setting(
        "regression", "toy-pairs | regression | digits | docstrings, or your own "
                      "'pkg.module:factory'")
    norm: Norm = _setting(Norm.NONE, "normalisation layer in mlp/cnn: bn | gn | ln | in | none")
    hidden: int = _setting(5, "mlp: width of each hidden layer")
    depth: int = _setting(1, "mlp: number of hidden layers")
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
    zero_grad: ZeroGrad = _setting(
        ZeroGrad.EVERY_N,
        "where zero_grad() runs: every-n (after each optimizer step, i.e. every N batches), "
        "every-step (before every batch's backward), never, after-backward (between "
        "backward and step)")
    set_to_none: bool = _setting(True, "zero_grad(set_to_none=...): drop .grad or fill it with 0")
    bn_mode: BnMode = _setting(
        BnMode.TRAIN, "BatchNorm while training: train (batch statistics) or frozen (eval mode)")
    optimizer: Optimizer = _setting(Optimizer.SGD, "sgd | adam | adamw")
    lr: float = _setting(0.05, "learning rate")
    momentum: float = _setting(0.0, "sgd momentum")
    weight_decay: float = _setting(0.0, "weight decay (L2 for sgd/adam, decoupled for adamw)")
    steps: int = _setting(20, "optimizer steps each arm trains for")
    seed: int = _setting(0, "seed for initial weights and the order of examples")
    dtype: Dtype = _setting(Dtype.FLOAT32, "float32 | float64 | bfloat16 | float16")
    device: Device = _setting(Device.CPU, "cpu | cuda | auto (cuda when available)")
    probe_every: int = _setting(
        1, "compare gradients at the baseline's weights every K steps (0: only before step 1)")
    eval_every: int = _setting(0, "held-out evaluation every K steps (0: only after the last)")
    trace: bool = _setting(False, "record the accumulated gradient after every micro-batch, "
                                  "and the weights after every step (trace.csv, weights.csv)")
    trace_elements: int = _setting(
        8, "trace: how many elements of each parameter to record (the first ones)")

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
        """Examples in the largest micro-batch (all are this size when N divides B)."""
        return -(-self.batch_size // self.accum_steps)


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


@dataclass
class Spec:
    name: str
    source: str  # path or "built-in NAME", for error messages
    description: str
    settings: dict[str, Any]
    arms: dict[str, ArmSpec]
    sweep: dict[str, list[Any]]
    text: str = ""  # the TOML as read, kept in run.json


ARM_META_KEYS = ("baseline", "expect", "help")
TOP_KEYS = ("name", "description", "settings", "arms", "sweep")


# ----------------------------------------------------------------------------- loading

def builtin_dir() -> Path:
    return Path(str(resources.files("gradlab") / "experiments"))


def builtin_specs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(builtin_dir().glob("*.toml"))}


def local_dir() -> Path:
    """Your own specs: ./experiments, looked in before the built-in ones."""
    return Path("experiments")


def find_spec(name_or_path: str) -> Path:
    path = Path(name_or_path)
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
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise GradlabError(f"{path}: not valid TOML ({err}); fix the syntax") from None
    return parse_spec(data, source=str(path), default_name=path.stem, text=text)


def parse_spec(data: dict, source: str, default_name: str = "spec", text: str = "") -> Spec:
    _reject_unknown(data, TOP_KEYS, source, "top level")
    settings = data.get("settings", {})
    _expect_table(settings, source, "[settings]")
    for key, value in settings.items():
        settings[key] = coerce(key, value, f"{source} [settings]")

    arms: dict[str, ArmSpec] = {}
    arm_tables = data.get("arms") or {"baseline": {"baseline": True}}
    _expect_table(arm_tables, source, "[arms]")
    for arm_name, table in arm_tables.items():
        _expect_table(table, source, f"[arms.{arm_name}]")
        where = f"{source} [arms.{arm_name}]"
        overrides = {k: coerce(k, v, where) for k, v in table.items() if k not in ARM_META_KEYS}
        arms[arm_name] = ArmSpec(overrides, bool(table.get("baseline", False)),
                                 _expectation(table.get("expect"), where),
                                 str(table.get("help", "")))
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

    return Spec(name=str(data.get("name", default_name)), source=source,
                description=str(data.get("description", "")), settings=settings,
                arms=arms, sweep=sweep, text=text)


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
        raise GradlabError(f"{source}: {where} must be a table")


# ----------------------------------------------------------------------------- values

def coerce(key: str, value: Any, where: str) -> Any:
    """Check one setting against its declared type and choices; parse it if it is a string."""
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
    """Apply ``--set key=value`` (one value: a setting; a comma list: a sweep axis)."""
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise GradlabError(f"--set {item!r}: write --set key=value (or key=v1,v2 to sweep)")
        values = [coerce(key, v, f"--set {key}") for v in raw.split(",")]
        if len(values) == 1:
            spec.settings[key] = values[0]
            spec.sweep.pop(key, None)
        else:
            spec.sweep[key] = values
        # a --set beats the same key inside a zipped sweep axis
        for axis, axis_values in spec.sweep.items():
            if axis != key and axis_values and isinstance(axis_values[0], dict):
                for v in axis_values:
                    v.pop(key, None)
    return spec


# ----------------------------------------------------------------------------- expansion

def expand(spec: Spec) -> list[Trial]:
    """All trials of a spec: the product of its sweep axes, each with every arm resolved."""
    axes = list(spec.sweep.items())
    trials: list[Trial] = []
    seen: set = set()
    for combo in itertools.product(*(values for _, values in axes)):
        swept: dict[str, Any] = {}
        for (axis, _), value in zip(axes, combo, strict=True):
            swept.update(value if isinstance(value, dict) else {axis: value})
        trial_expect = swept.pop("expect", None)  # from a zipped sweep value
        key = tuple(sorted(swept.items()))
        if key in seen:  # a --set made two sweep values identical
            continue
        seen.add(key)
        arms = []
        for arm_name, arm in spec.arms.items():
            merged = {**spec.settings, **swept, **arm.overrides}
            settings = Settings(**merged)
            validate(settings, f"{spec.source} arm '{arm_name}'")
            expect = arm.expect or (None if arm.baseline else trial_expect)
            arms.append(Arm(arm_name, settings, arm.baseline, expect, arm.help))
        trials.append(Trial(len(trials), swept, tuple(arms)))
    # every trial names the same keys, so CSV columns line up when zipped axes differ
    keys = list(dict.fromkeys(k for t in trials for k in t.swept))
    base = {**{f.name: f.default for f in dataclasses.fields(Settings)}, **spec.settings}
    return [dataclasses.replace(t, swept={k: t.swept.get(k, base[k]) for k in keys})
            for t in trials]


def validate(s: Settings, where: str) -> None:
    """Checks that need more than one setting, or a range. Raises GradlabError."""
    def fail(msg: str):
        raise GradlabError(f"{where}: {msg}")

    if s.batch_size < 1:
        fail(f"batch_size={s.batch_size}; it must be at least 1")
    if s.accum_steps < 1:
        fail(f"accum_steps={s.accum_steps}; N must be at least 1 (1 = no accumulation)")
    if s.accum_steps > s.batch_size:
        fail(f"accum_steps={s.accum_steps} is larger than batch_size={s.batch_size}, so a "
             f"micro-batch would be empty; use accum_steps <= batch_size")
    if s.steps < 1:
        fail(f"steps={s.steps}; train for at least 1 step")
    if s.lr < 0:
        fail(f"lr={s.lr}; the learning rate cannot be negative")
    if not 2 <= s.min_len <= s.max_len:
        fail(f"min_len={s.min_len}, max_len={s.max_len}; a sequence needs at least 2 tokens "
             f"(one to read, one to predict) and min_len <= max_len")
    for name in ("hidden", "depth", "channels", "groups", "trace_elements"):
        if getattr(s, name) < 1:
            fail(f"{name}={getattr(s, name)}; it must be at least 1")
    for name in ("probe_every", "eval_every", ):
        if getattr(s, name) < 0:
            fail(f"{name}={getattr(s, name)}; use 0 or a positive number of steps")
