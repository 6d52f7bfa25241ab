"""Specs, arms and trials: what to run, as data.

A spec is a TOML file: base ``[settings]``, named ``[arms.NAME]`` tables that
override them (one marked ``baseline = true``) and ``[sweep]`` axes. Expanding a
spec gives trials; each trial holds every arm, fully resolved into frozen
``Settings``. Precedence, lowest first: defaults < [settings] < sweep value <
arm override < ``--set ARM.key=v``. ``--set key=v`` replaces the setting in
[settings] and drops every sweep axis that sets the key; ``--set key=a,b`` makes
it a sweep axis. Every value is checked where it is read, so an error names the
place it came from: the file and its [section], or the --set.

The settings themselves (and their roles) are in gradlab.config.settings, the rules that
need more than one of them in gradlab.config.rules.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from gradlab.config.rules import validate
from gradlab.config.settings import Settings, coerce
from gradlab.errors import GradlabError
from gradlab.record.verdict import Verdict


@dataclass(frozen=True)
class Arm:
    name: str
    settings: Settings
    baseline: bool = False
    expect: Verdict | None = None  # one of EXPECTABLE, or None: what the spec promises
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
    expect: Verdict | None = None
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
# what an arm may promise its verdict will be
EXPECTABLE = (Verdict.EQUIVALENT, Verdict.DIFFERS)
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
        # utf-8-sig: an editor's byte-order mark at the start is read past, not a syntax error
        text = path.read_text(encoding="utf-8-sig")
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


def _expectation(value: Any, where: str) -> Verdict | None:
    """An arm's (or a zipped sweep value's) promise, as its Verdict member."""
    if value is None:
        return None
    if value not in EXPECTABLE:
        raise GradlabError(f"{where}: expect = {value!r}; allowed: "
                           f"{', '.join(repr(str(v)) for v in EXPECTABLE)}")
    return Verdict(value)


def _reject_unknown(data: dict, allowed, source: str, where: str) -> None:
    for key in data:
        if key not in allowed:
            raise GradlabError(f"{source}: unknown key '{key}' at {where}; "
                               f"allowed: {', '.join(allowed)}")


def _expect_table(value, source: str, where: str) -> None:
    if not isinstance(value, dict):
        raise GradlabError(f"{source}: {where} must be a table (found {value!r})")


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

