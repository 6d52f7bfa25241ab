"""`gradlab compare`, `plot` and `report`: read run directories, judge, draw, write pages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from gradlab.cli.render import render_comparison, render_pivot
from gradlab.cli.shared import (
    TABLES,
    JsonOpt,
    TableOpt,
    app,
    check_choice,
    console,
    ended,
    fail,
)
from gradlab.cli.signals import Stop
from gradlab.errors import GradlabError

RunsArg = Annotated[list[Path], typer.Argument(
    help="Run directories (the path `gradlab run` printed), or a folder holding several.",
    show_default=False)]
FormatOpt = Annotated[str, typer.Option(
    "--format", "-f", help="table (for people), csv, json or md (md pastes into a pull "
                           "request; it follows --table). All on stdout.")]
FORMATS = ("table", "csv", "json", "md")


@app.command("compare")
def compare_(
    runs: RunsArg,
    baseline: Annotated[str | None, typer.Option(
        help="Arm the loss difference is measured against (default: the run's baseline).")]
    = None,
    at_step: Annotated[int | None, typer.Option(
        "--at-step", min=1, help="Read the metrics at step K instead of at the end.")] = None,
    rtol: Annotated[float | None, typer.Option(
        min=0.0, help="Relative tolerance on the distance from the exact gradient, in place "
                      "of the measured one (floor + (N−1)·u + 32·u_acc).")] = None,
    atol: Annotated[float | None, typer.Option(
        min=0.0, help="Also call an arm equivalent when its max abs gradient error <= ATOL.")]
    = None,
    table: TableOpt = "compact",
    all_: Annotated[bool, typer.Option(
        "--all", help="Show every column, not only the settings that differ between rows "
                      "(implies --table full).")] = False,
    sort: Annotated[str | None, typer.Option(
        help="Sort the rows by this column (implies --table full).")] = None,
    reverse: Annotated[bool, typer.Option("--reverse", "-r", help="Sort descending.")] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="Exit 1 when an arm does not do what its spec expects (for CI).")]
    = False,
    format_: FormatOpt = "table",
    json_out: JsonOpt = False,
) -> None:
    """Compare arms against their baseline, across trials and runs, with verdicts.

    The table goes to stdout: by default one row per arm and setting, one column per N
    (`--table full`: one row per arm of every trial, every column). Rows that differ only
    by seed are shown as mean ± std in the full table, as the worst in the compact one.

    Examples:

    * `gradlab compare results/equivalence-20250101-120000`

    * `gradlab compare results/ --format md` - every run in results/, as a Markdown table

    * `gradlab compare RUN --check` - exit 1 if an arm expected equivalent is not (CI)
    """
    format_ = "json" if json_out else format_
    check_choice("--format", format_, FORMATS)
    check_choice("--table", table, TABLES)
    full = table == "full" or all_ or sort is not None
    try:
        from gradlab.readers import compact, compare
        from gradlab.record import store  # pandas: imported only when a command reads runs

        result = compare.compare(
            store.load_runs(runs), reference=baseline, at_step=at_step,
            tol=compare.Tolerance(rtol, atol), show_all=all_, sort=sort, descending=reverse)
    except GradlabError as e:  # with --json (or --format json): the error as a document too
        raise ended(e, json_out=format_ == "json") from None
    out = console()
    if format_ == "json":
        typer.echo(store.dumps({"title": result.title, "columns": result.columns,
                                "grouped_over_seeds": result.grouped, "rows": result.records(),
                                "notes": result.notes, "check_failures": result.failures}))
    elif format_ == "csv":
        import pandas as pd

        typer.echo(pd.DataFrame(result.records()).to_csv(index=False), nl=False)
    elif format_ == "md":
        typer.echo((result if full else compact.pivot(result)).markdown(), nl=False)
    elif full:
        render_comparison(result, out)
    else:
        render_pivot(compact.pivot(result), out)
    for line in result.failures:
        console(stderr=True).print(f"[bold red]expectation failed:[/] {escape(line)}",
                                   highlight=False, soft_wrap=True)
    if check and result.failures:
        raise typer.Exit(1)


# colour says whether the spec's expectation held, not which verdict it is: an arm expected
# to differ that differs is green
@app.command()
def plot(
    runs: RunsArg,
    y: Annotated[str | None, typer.Option(
        "-y", "--y", help="Metric(s) to draw, comma-separated (e.g. loss,grad_norm or "
                          "max_rel_grad_err); default: the standard figures.")] = None,
    x: Annotated[str | None, typer.Option(
        "-x", "--x", help="x axis: step, examples, N or micro_batch.")] = None,
    format_: Annotated[str, typer.Option("--format", "-f", help="png or svg.")] = "png",
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for the figures (default: RUN/figures for one run, "
                            "./figures for several).")] = None,
) -> None:
    """Draw the standard figures of runs (or the metrics you name); print the paths written.

    Examples:

    * `gradlab plot results/equivalence-20250101-120000` - loss curves, gradient error
      against N with the rounding bound, accuracy against micro-batch size...

    * `gradlab plot RUN -y grad_norm -x examples --format svg --out figs/`
    """
    Stop.began = True
    try:
        # matplotlib and pandas are slow to import: only the commands that need them do
        from gradlab.readers import plots
        from gradlab.record import store

        paths = plots.write(store.load_runs(runs), out, format_,
                            [m.strip() for m in y.split(",") if m.strip()] if y else None, x,
                            say=lambda note: typer.echo(note, err=True))
    except GradlabError as e:
        raise fail(str(e)) from None
    for path in paths:
        typer.echo(str(path))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(
        help="One run directory (the path `gradlab run` printed).", show_default=False)],
) -> None:
    """Write report.md and a self-contained index.html (figures embedded) into a run directory.

    Both hold what was run, the comparison table with its verdicts, and the standard
    figures (also saved in RUN/figures). Prints the two paths.

    Example: `gradlab report results/equivalence-20250101-120000`
    """
    Stop.began = True
    try:
        from gradlab.readers import report as reports  # imports matplotlib: slow, so only here
        from gradlab.record import store

        paths = reports.write(store.load_run(run_dir),
                              say=lambda note: typer.echo(note, err=True))
    except GradlabError as e:
        raise fail(str(e)) from None
    for path in paths:
        typer.echo(str(path))


