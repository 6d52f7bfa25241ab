"""The gradlab command line. Thin: parse, validate, call the library, render.

Data goes to stdout (the run directory's path, or one JSON document with
--json); tables, progress and messages go to stderr.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gradlab import probe, runner, spec, store, zoo
from gradlab.errors import GradlabError

app = typer.Typer(
    help="gradlab: does your gradient accumulation compute the big-batch gradient? "
         "Run paired experiments (B x 1 against (B/N) x N) and measure.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)
# when stderr is not a terminal (CI logs, captured output) rich would wrap tables at 80 columns
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and "
                                                      "nothing else (no table, no progress).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder that receives the run "
                                                          "directory.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command()
def run(
    experiment: Annotated[str, typer.Argument(
        help="A built-in experiment name (see `gradlab list`) or a path to a spec .toml.",
        show_default=True)] = "equivalence",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", metavar="KEY=VALUE",
        help="Override a setting; a comma list sweeps it (`--set accum_steps=2,4`). "
             "Repeatable.")] = None,
    out: OutOpt = Path("results"),
    json_out: JsonOpt = False,
) -> None:
    """Run an experiment: every arm from the same weights on the same examples; write CSVs.

    Examples:

    * `gradlab run` - the default `equivalence` experiment (about a minute on a laptop CPU)

    * `gradlab run toy` - the classic two-example toy: -16, then -20, then w = 1.2

    * `gradlab run equivalence --set accum_steps=4 --set dtype=float64`

    * `gradlab run my_spec.toml --set model=mypkg.nets:make_net --json`
    """
    try:
        loaded = spec.apply_overrides(spec.load_spec(experiment), set_ or [])
        trials = spec.expand(loaded)
        runner.preflight(trials)
    except GradlabError as e:
        raise fail(str(e)) from None

    run_dir = store.RunDir(out, loaded.name, {
        "spec_source": loaded.source, "spec_text": loaded.text, "overrides": set_ or [],
        "description": loaded.description,
        "trials": [{"trial": t.index, "swept": t.swept,
                    "arms": {a.name: {"baseline": a.baseline, "expect": a.expect,
                                      "settings": dataclasses.asdict(a.settings)}
                             for a in t.arms}} for t in trials],
        "device": str(runner.resolve_device(trials[0].baseline.settings.device)),
    })
    total = sum(a.settings.steps for t in trials for a in t.arms)
    show_progress = not json_out and sys.stdout.isatty()
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("steps"), TimeElapsedColumn(), console=err,
                      disable=not show_progress, transient=True) as progress:
            task = progress.add_task(f"{loaded.name}: {len(trials)} trials", total=total)
            results = runner.run_trials(trials, run_dir, lambda n: progress.advance(task, n))
    except KeyboardInterrupt:
        run_dir.finish("interrupted")
        raise fail(f"interrupted; partial results kept in {run_dir.path}", 130) from None
    except GradlabError as e:
        run_dir.finish("failed", str(e))
        raise fail(str(e)) from None
    except Exception as e:  # a bug or a numerical failure: keep the evidence, say where
        run_dir.finish("failed", traceback.format_exc())
        raise fail(f"run failed: {type(e).__name__}: {e} (traceback in "
                   f"{run_dir.path / 'run.json'})", 1) from None
    run_dir.finish("complete")

    summaries = [row for r in results for row in r.summary]
    if json_out:
        typer.echo(store.dumps(json_document(run_dir, trials, summaries)))
        return
    render_summary(loaded.name, trials, summaries)
    traces = [row for r in results for row in r.trace]
    if traces and len(traces) <= 64:
        render_trace(traces, [w for r in results for w in r.weights])
    err.print(f"run directory ({len(trials)} trials, status complete):", highlight=False)
    typer.echo(str(run_dir.path))


def json_document(run_dir: store.RunDir, trials: list[spec.Trial], summaries: list[dict]) -> dict:
    by_trial: dict[int, list] = {t.index: [] for t in trials}
    for row in summaries:
        by_trial[row["trial"]].append({k: v for k, v in row.items() if k != "trial"})
    return {"run_dir": str(run_dir.path), "status": run_dir.meta["status"],
            "experiment": run_dir.meta["experiment"],
            "trials": [{"trial": t.index, "settings": t.swept, "arms": by_trial[t.index]}
                       for t in trials]}


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


HEADERS = {"accum_steps": "N", "max_rel_grad_err": "rel grad err", "rel_tolerance": "tolerance",
           "min_grad_cosine": "min cos", "final_test_accuracy": "test acc",
           "max_rel_buffer_diff": "rel BN stats diff"}
NUMERIC = ("accum_steps", "max_rel_grad_err", "rel_tolerance", "min_grad_cosine", "final_loss",
           "final_test_accuracy", "max_rel_buffer_diff")
VERDICT_STYLE = {"equivalent": "green", "differs": "red", "baseline": "dim"}


def render_summary(name: str, trials: list[spec.Trial], summaries: list[dict]) -> None:
    swept = list(dict.fromkeys(key for t in trials for key in t.swept))
    table = Table(title=f"{name}: gradient at the baseline's weights, and training on its own",
                  title_justify="left")
    columns = [*swept, "arm", "accum_steps", "max_rel_grad_err", "rel_tolerance",
               "min_grad_cosine", "final_loss", "final_test_accuracy", "max_rel_buffer_diff",
               "expect", "verdict"]
    columns = [c for c in dict.fromkeys(columns)
               if any(not _is_nan(row.get(c)) and row.get(c) != "" for row in summaries)]
    for column in columns:
        table.add_column(HEADERS.get(column, column.replace("_", " ")), no_wrap=True,
                         justify="right" if column in NUMERIC else "left")
    for row in summaries:
        style = VERDICT_STYLE.get(row["verdict"], "")
        cells = [_fmt(row.get(c)) for c in columns]
        cells[-1] = f"[{style}]{cells[-1]}[/]" if style and columns[-1] == "verdict" else cells[-1]
        table.add_row(*cells)
    err.print(table)
    err.print(f"verdict: equivalent when max_rel_grad_err <= rel_tolerance = "
              f"{probe.TOLERANCE_FACTOR:g} * max(N, 2) * u, u the unit roundoff of the dtype "
              f"(float32 2^-24, float64 2^-53); rel err = ||g_arm - g_baseline|| / "
              f"||g_baseline||.", highlight=False)


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def render_trace(traces: list[dict], weights: list[dict]) -> None:
    table = Table(title="trace: the accumulated .grad after each micro-batch backward, "
                        "and the weights after each step", title_justify="left")
    for column in ("trial", "arm", "step", "after", "param", "value"):
        table.add_column(column)
    for row in traces:
        name = f"{row['param']}[{row['element']}]"
        table.add_row(str(row["trial"]), row["arm"], str(row["step"]),
                      f"micro-batch {row['micro_batch']}", f"{name}.grad", f"{row['grad']:.6g}")
    for row in weights:
        if row["step"] > 0:
            table.add_row(str(row["trial"]), row["arm"], str(row["step"]), "optimizer step",
                          f"{row['param']}[{row['element']}]", f"{row['value']:.6g}")
    err.print(table)


@app.command("list")
def list_(json_out: JsonOpt = False) -> None:
    """Show the built-in experiments, models, datasets and every setting with its default."""
    experiments = {name: _first_comment(path) for name, path in spec.builtin_specs().items()}
    settings = [{"name": f.name, "default": f.default, "help": f.metadata["help"]}
                for f in dataclasses.fields(spec.Settings)]
    if json_out:
        typer.echo(store.dumps({
            "experiments": experiments,
            "models": {k: v[1] for k, v in zoo.MODELS.items()},
            "datasets": {k: v[1] for k, v in zoo.DATASETS.items()},
            "settings": settings}))
        return
    for title, rows in (("experiments (gradlab run NAME)", experiments),
                        ("models (--set model=NAME)", {k: v[1] for k, v in zoo.MODELS.items()}),
                        ("datasets (--set dataset=NAME)",
                         {k: v[1] for k, v in zoo.DATASETS.items()})):
        table = Table(title=title, title_justify="left", show_header=False)
        table.add_column(style="bold cyan")
        table.add_column()
        for name, text in rows.items():
            table.add_row(name, text)
        err.print(table)
    table = Table(title="settings (--set KEY=VALUE; KEY=a,b,c sweeps)", title_justify="left")
    for column in ("setting", "default", "what it does"):
        table.add_column(column)
    for row in settings:
        table.add_row(f"[bold cyan]{row['name']}[/]", repr(row["default"]), row["help"])
    err.print(table)


def _first_comment(path: Path) -> str:
    """A spec's description: its 'description' key, else its first comment line."""
    try:
        return spec.load_spec(str(path)).description
    except GradlabError as e:
        return f"(broken spec: {e})"


def main() -> None:  # pragma: no cover
    app()
