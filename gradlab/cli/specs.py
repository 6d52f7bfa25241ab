"""`gradlab list`, `show` and `init`: what experiments, models, datasets and settings there
are, what a spec will run, and a copy of a built-in spec to edit."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from gradlab.cli.shared import JsonOpt, SetOpt, app, complete_spec_names, console, fail, say
from gradlab.cli.signals import Stop
from gradlab.config import catalog, spec
from gradlab.config.settings import Settings
from gradlab.errors import GradlabError
from gradlab.lab.experiment import count, resolve
from gradlab.record.verdict import Verdict


@app.command("list")
def list_(json_out: JsonOpt = False) -> None:
    """Show the experiments (and where each spec lives), models, datasets, setups and every
    setting with its default.

    Example: `gradlab list`, then `gradlab show norm`, then `gradlab run norm --set seed=0,1,2`.
    """
    found = spec.findable_specs()
    experiments = {name: _describe(path) for name, path in found.items()}
    settings = [{"name": f.name, "default": f.default, "help": f.metadata["help"]}
                for f in dataclasses.fields(Settings)]
    if json_out:
        typer.echo(json.dumps({
            "experiments": experiments,
            "spec_files": {name: str(path) for name, path in found.items()},
            "models": catalog.MODELS, "datasets": catalog.DATASETS, "setups": catalog.SETUPS,
            "settings": settings}, indent=2))
        return
    out = console()
    table = Table(title="experiments (gradlab show NAME, gradlab run NAME)",
                  title_justify="left", show_header=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    table.add_column(style="dim", overflow="fold")
    for name, path in found.items():
        table.add_row(name, Text(experiments[name]), Text(_where_spec(name, path)))
    out.print(table)
    for title, rows in (("models (--set model=NAME)", catalog.MODELS),
                        ("datasets (--set dataset=NAME)", catalog.DATASETS),
                        ("setups: model, data and loss in one (--set setup=NAME)",
                         catalog.SETUPS)):
        table = Table(title=title, title_justify="left", show_header=False)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for name, text in rows.items():
            table.add_row(name, Text(text))  # a description is text, never markup: [norm]
        out.print(table)
    table = Table(title="settings (--set KEY=VALUE; KEY=a,b,c sweeps)", title_justify="left")
    table.add_column("setting", style="bold cyan", no_wrap=True)
    table.add_column("default")
    table.add_column("what it does")
    for row in settings:
        table.add_row(row["name"], Text(repr(row["default"])), Text(row["help"]))
    out.print(table)


def _describe(path: Path) -> str:
    """A spec's one-line description (its 'description' key)."""
    try:
        return spec.load_spec(str(path)).description
    except GradlabError as e:
        return f"(broken spec: {e})"


def _where_spec(name: str, path: Path) -> str:
    """Where a spec found by name lives: built-in, or its path (saying what it replaces)."""
    if spec.is_builtin(path):
        return "built-in"
    replaces = " (replaces the built-in)" if name in spec.builtin_specs() else ""
    return f"{path}{replaces}"


@app.command()
def show(
    experiment: Annotated[str, typer.Argument(
        help="An experiment name (see `gradlab list`) or a path to a spec .toml.",
        show_default=False, autocompletion=complete_spec_names)],
    set_: SetOpt = None,
    estimate: Annotated[bool, typer.Option(
        "--estimate/--no-estimate", help="Build each model once and time one step, as `run` "
                                         "does before it starts, for the time and memory "
                                         "estimate (slower: imports torch).")] = True,
) -> None:
    """Show what a spec will run, without running it: its arms (with their help and settings),
    sweep axes, trials, and the time and memory it will take.

    Examples:

    * `gradlab show equivalence`

    * `gradlab show norm --set accum_steps=2,4` - what these overrides would run

    * `gradlab show my_spec.toml --no-estimate` - at once, without building the models
    """
    try:
        loaded, trials = resolve(experiment, set_ or [])
        cost = None
        if estimate:
            from gradlab.lab import preflight

            cost = preflight.preflight(trials)
    except GradlabError as e:
        raise fail(str(e)) from None
    out = console()
    path = Path(loaded.source)
    origin = "built-in" if spec.is_builtin(path) else "your own"
    out.print(Text.assemble((loaded.name, "bold"), f": {loaded.description}"), soft_wrap=True)
    out.print(f"spec: {path} ({origin})", markup=False, highlight=False, soft_wrap=True)
    for note in loaded.notes:
        say(note)
    if loaded.settings:
        out.print(Text.assemble(("settings of every arm: ", "bold"),
                                _assignments(loaded.settings)), soft_wrap=True)
    out.print(Text("arms", style="bold"))
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("arm", style="bold cyan", no_wrap=True)
    table.add_column("expect", no_wrap=True)
    table.add_column("what it does")
    table.add_column("its own settings", overflow="fold")
    for name, arm in loaded.arms.items():
        # a sweep value may set what the arm expects (norm: differs only for BatchNorm)
        expects = dict.fromkeys(a.expect or "-" for t in trials for a in t.arms
                                if a.name == name)
        expect = Verdict.BASELINE if arm.baseline else " or ".join(expects)
        table.add_row(name, expect, Text(arm.help or "-"),
                      Text(_assignments(arm.overrides) or "-"))
    out.print(table)
    if loaded.sweep:
        out.print(Text("sweep (one trial per combination)", style="bold"))
        table = Table(box=box.SIMPLE_HEAD)
        table.add_column("axis", style="bold cyan", no_wrap=True)
        table.add_column("values")
        for axis, values in loaded.sweep.items():
            shown = [", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict)
                     else str(value) for value in values]
            table.add_row(axis, Text(" | ".join(shown)))
        out.print(table)
    arms = {a.name for t in trials for a in t.arms}
    steps = sum(a.settings.steps for t in trials for a in t.arms)
    out.print(f"{count(len(trials), 'trial')} x {count(len(arms), 'arm')} = "
              f"{count(sum(len(t.arms) for t in trials), 'training')}, {steps} optimizer "
              f"steps in all", highlight=False, soft_wrap=True)
    out.print(f"cost: {cost.estimate()}" if cost else
              "cost: not estimated (--no-estimate); without it, show times one step of "
              "each model", markup=False, highlight=False, soft_wrap=True)
    out.print(f"run it: gradlab run {experiment}"
              + "".join(f" --set {a}" for a in set_ or []),
              markup=False, highlight=False, soft_wrap=True)


def _assignments(values: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


@app.command()
def init(
    experiment: Annotated[str, typer.Argument(
        help="The built-in experiment to start from (see `gradlab list`).",
        show_default=False, autocompletion=complete_spec_names)],
    name: Annotated[str | None, typer.Option(
        "--as", help="Name of your copy (default: the same name; yours is then found first, "
                     "in place of the built-in).")] = None,
) -> None:
    """Copy a built-in spec into ./experiments/ to edit; `gradlab run NAME` then runs yours
    (./experiments/NAME.toml is found before the built-in one). Prints the path written.

    Examples:

    * `gradlab init equivalence` - writes experiments/equivalence.toml

    * `gradlab init norm --as my-norm` - writes experiments/my-norm.toml, run by
      `gradlab run my-norm`
    """
    Stop.began = True
    builtins = spec.builtin_specs()
    if experiment not in builtins:
        raise fail(f"no built-in experiment '{experiment}'; choose one of "
                   f"{', '.join(builtins)}")
    name = name or experiment
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise fail(f"--as {name}: a spec name is letters, digits, '-' and '_' (it becomes "
                   f"experiments/NAME.toml and the run directory's name)")
    target = spec.local_dir() / f"{name}.toml"
    if target.exists():
        raise fail(f"{target} already exists; edit it, remove it first, or choose another "
                   f"name with --as")
    text = builtins[experiment].read_text(encoding="utf-8")
    if name != experiment:  # its command and its name follow the copy's
        text = text.replace(f"# gradlab run {experiment}\n", f"# gradlab run {name}\n", 1)
        text = text.replace(f'name = "{experiment}"\n', f'name = "{name}"\n', 1)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as e:
        raise fail(f"cannot write {target}: {e.strerror}; run gradlab init in a folder you can "
                   f"write to") from None
    say(f"copied the built-in '{experiment}' spec: edit it, then `gradlab show {name}` and "
        f"`gradlab run {name}`")
    typer.echo(str(target))


# ----------------------------------------------------------------------------- reading runs

