"""The gradlab command line. Thin: parse, validate, call the library, render.

Data goes to stdout (the run directory's path, or one JSON document with
--json); tables, progress and messages go to stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import traceback
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gradlab import compare, probe, runner, spec, store, zoo
from gradlab.errors import GradlabError

app = typer.Typer(
    help="gradlab: does your gradient accumulation compute the big-batch gradient? "
         "Run paired experiments (B x 1 against (B/N) x N) and measure.",
    epilog="Start with `gradlab run toy`, then `gradlab run` (the equivalence experiment); "
           "`gradlab list` shows what there is.",
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
    checks = [row for r in results for row in r.checks]
    if json_out:
        typer.echo(store.dumps(json_document(run_dir, trials, summaries, checks)))
        return
    render_summary(loaded.name, trials, summaries)
    render_checks(checks)
    traces = [row for r in results for row in r.trace]
    if traces and len(traces) <= 64:
        render_trace(traces, [w for r in results for w in r.weights])
    err.print(f"run directory ({len(trials)} trials, status complete):", highlight=False)
    typer.echo(str(run_dir.path))


def json_document(run_dir: store.RunDir, trials: list[spec.Trial], summaries: list[dict],
                  checks: list[dict] = ()) -> dict:
    by_trial: dict[int, list] = {t.index: [] for t in trials}
    for row in summaries:
        arm_checks = [{k: v for k, v in c.items() if k not in ("trial", "arm")} for c in checks
                      if (c["trial"], c["arm"]) == (row["trial"], row["arm"])]
        by_trial[row["trial"]].append({**{k: v for k, v in row.items() if k != "trial"},
                                       "checks": arm_checks})
    return {"run_dir": str(run_dir.path), "status": run_dir.meta["status"],
            "experiment": run_dir.meta["experiment"],
            "trials": [{"trial": t.index, "settings": t.swept, "arms": by_trial[t.index]}
                       for t in trials]}


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
               if any(not compare.is_missing(row.get(c)) and row.get(c) != "" for row in summaries)]
    for column in columns:
        table.add_column(compare.HEADERS.get(column, column.replace("_", " ")), no_wrap=True,
                         justify="right" if column in NUMERIC else "left")
    for row in summaries:
        style = VERDICT_STYLE.get(row["verdict"], "")
        cells = [compare.fmt(row.get(c)) for c in columns]
        cells[-1] = f"[{style}]{cells[-1]}[/]" if style and columns[-1] == "verdict" else cells[-1]
        table.add_row(*cells)
    err.print(table)
    dtypes = dict.fromkeys(row["dtype"] for row in summaries)
    units = ", ".join(f"{d} 2^{math.log2(probe.UNIT_ROUNDOFF[d]):.0f}" for d in dtypes)
    err.print(f"verdict: equivalent when rel grad err = ||g_arm - g_baseline|| / ||g_baseline|| "
              f"<= tolerance = {probe.TOLERANCE_FACTOR:g} * max(N, 2) * u\n"
              f"         (unit roundoff u: {units}); gradients taken at the baseline's weights",
              highlight=False)


def render_checks(checks: list[dict]) -> None:
    for c in checks:
        outcome = "[green]passed[/]" if c["passed"] else "[bold red]FAILED[/]"
        err.print(f"check, trial {c['trial']} arm {c['arm']}: {c['check']}: max rel err "
                  f"{compare.fmt(c['value'])}, tolerance {compare.fmt(c['tolerance'])}: {outcome}",
                  highlight=False)


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
    """Show the built-in experiments, models, datasets and every setting with its default.

    Example: `gradlab list`, then `gradlab run norm --set seed=0,1,2`.
    """
    experiments = {name: _describe(path) for name, path in spec.builtin_specs().items()}
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


def _describe(path: Path) -> str:
    """A built-in spec's one-line description (its 'description' key)."""
    try:
        return spec.load_spec(str(path)).description
    except GradlabError as e:
        return f"(broken spec: {e})"


# ----------------------------------------------------------------------------- reading runs

RunsArg = Annotated[list[Path], typer.Argument(
    help="Run directories (the path `gradlab run` printed), or a folder holding several.",
    show_default=False)]
FormatOpt = Annotated[str, typer.Option(
    "--format", "-f", help="table (for people, on stderr), csv, json or md (on stdout; md "
                           "pastes into a pull request).")]


@app.command("compare")
def compare_(
    runs: RunsArg,
    baseline: Annotated[str | None, typer.Option(
        help="Arm the loss difference is measured against (default: the run's baseline).")]
    = None,
    at_step: Annotated[int | None, typer.Option(
        "--at-step", min=1, help="Read the metrics at step K instead of at the end.")] = None,
    rtol: Annotated[float | None, typer.Option(
        min=0.0, help=f"Relative gradient tolerance, in place of "
                       f"{probe.TOLERANCE_FACTOR:g}·max(N,2)·u.")] = None,
    atol: Annotated[float | None, typer.Option(
        min=0.0, help="Also call an arm equivalent when its max abs gradient error <= ATOL.")]
    = None,
    all_: Annotated[bool, typer.Option(
        "--all", help="Show every column, not only the settings that differ between rows.")]
    = False,
    sort: Annotated[str | None, typer.Option(help="Sort the rows by this column.")] = None,
    reverse: Annotated[bool, typer.Option("--reverse", "-r", help="Sort descending.")] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="Exit 1 when an arm does not do what its spec expects (for CI).")]
    = False,
    format_: FormatOpt = "table",
    json_out: JsonOpt = False,
) -> None:
    """Compare arms against their baseline, across trials and runs, with verdicts.

    Rows that differ only by seed are shown as mean ± std.

    Examples:

    * `gradlab compare results/equivalence-20250101-120000`

    * `gradlab compare results/ --format md` - every run in results/, as a Markdown table

    * `gradlab compare RUN --check` - exit 1 if an arm expected equivalent is not (CI)
    """
    format_ = "json" if json_out else format_
    if format_ not in compare.FORMATS:
        raise fail(f"--format {format_}: choose one of {', '.join(compare.FORMATS)}")
    try:
        result = compare.compare(
            store.load_runs(runs), reference=baseline, at_step=at_step,
            tol=compare.Tolerance(rtol, atol), show_all=all_, sort=sort, descending=reverse)
    except GradlabError as e:
        raise fail(str(e)) from None
    if format_ == "json":
        typer.echo(store.dumps({"title": result.title, "columns": result.columns,
                                "grouped_over_seeds": result.grouped, "rows": result.records(),
                                "notes": result.notes, "check_failures": result.failures}))
    elif format_ == "csv":
        typer.echo(pd.DataFrame(result.records()).to_csv(index=False), nl=False)
    elif format_ == "md":
        typer.echo(result.markdown(), nl=False)
    else:
        render_comparison(result)
    for line in result.failures:
        err.print(f"[bold red]expectation failed:[/] {line}", highlight=False, soft_wrap=True)
    if check and result.failures:
        raise typer.Exit(1)


def render_comparison(result: compare.Comparison) -> None:
    # no vertical rules: a comparison is wide, and every character goes to the numbers
    table = Table(title=result.title, title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=(0, 1, 0, 0))
    for column in result.columns:
        header = result.header(column)
        table.add_column(header, no_wrap=True, min_width=min(len(header), 8),
                         justify="right" if result.numeric(column) else "left")
    for cells in result.cells():
        table.add_row(*(_styled(c, cell) for c, cell in zip(result.columns, cells, strict=True)))
    # a terminal squeezes the table to fit; a log file or CI output gets it whole
    natural = err.measure(table, options=err.options.update(max_width=10_000)).maximum
    out = err if err.is_terminal else Console(stderr=True, width=max(err.width, natural))
    out.print(table)
    for note in result.notes:
        err.print(note, highlight=False, soft_wrap=True)


CHECK_STYLE = {"ok": "green", "FAIL": "bold red", "n/a": "dim"}


def _styled(column: str, cell: str) -> str:
    style = {"verdict": VERDICT_STYLE, "check": CHECK_STYLE}.get(column, {}).get(cell)
    return f"[{style}]{cell}[/]" if style else cell


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
    try:
        from gradlab import plots  # matplotlib is slow to import: only plot needs it

        paths = plots.write(store.load_runs(runs), out, format_,
                            [m.strip() for m in y.split(",") if m.strip()] if y else None, x)
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
    try:
        from gradlab import report as reports  # imports matplotlib: slow, so only here

        paths = reports.write(store.load_run(run_dir))
    except GradlabError as e:
        raise fail(str(e)) from None
    for path in paths:
        typer.echo(str(path))


@app.command()
def audit(
    entrypoint: Annotated[str, typer.Argument(
        help="Your training function as pkg.module:train, with the signature "
             "train(micro_batch_size, accum_steps, max_steps).", show_default=False)],
    accum_steps: Annotated[int, typer.Option(
        "--accum-steps", "-n", help="N, the micro-batches per optimizer step to check.",
        show_default=False)],
    micro_batch_size: Annotated[int, typer.Option(
        "--micro-batch-size", "-m", help="m: the big-batch twin runs with m*N x 1.")] = 8,
    steps: Annotated[int, typer.Option(
        "--steps", "-k", help="Optimizer steps each run makes (max_steps).")] = 5,
    out: OutOpt = Path("results"),
    copy_limit: Annotated[int | None, typer.Option(
        help="Copy every gradient while parameters x steps <= this many elements (default "
             "5e7); above, estimate the errors from norms and random projections.",
        show_default=False)] = None,
    sequential: Annotated[bool, typer.Option(
        "--sequential", help="Run the two loops one after the other, not side by side (when "
                             "both do not fit in memory at once).")] = False,
) -> None:
    """Check your own, unchanged training loop against its big-batch twin; exit 1 if they differ.

    Calls train(m, N, K) and train(m*N, 1, K), each in its own process, records the
    gradient and learning rate every optimizer.step() receives, and compares them
    step by step. Prints the run directory (readable by compare, plot and report).

    Examples:

    * `gradlab audit experiments.tutorial_loop:train --accum-steps 4`

    * `gradlab audit mypkg.train:train -n 8 -m 4 --steps 20` - in CI: exit 1 when it differs
    """
    try:
        from gradlab import audit as audits  # starts torch processes: only audit needs it

        # a spinner on a terminal only: in a log or CI, stderr holds the result and nothing else
        with err.status("auditing") if err.is_terminal else contextlib.nullcontext() as status:
            result = audits.audit(
                entrypoint, micro_batch_size, accum_steps, steps, out,
                copy_limit=audits.COPY_LIMIT if copy_limit is None else copy_limit,
                parallel=not sequential, say=status.update if status else lambda line: None)
    except GradlabError as e:
        raise fail(str(e)) from None
    audits.render(result, err)
    err.print("run directory:", highlight=False)
    typer.echo(str(result.run_dir))
    if result.failed:
        raise typer.Exit(1)
