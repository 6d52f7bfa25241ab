"""The gradlab command line. Thin: parse, validate, call the library, render.

Data goes to stdout (the run directory's path, or one JSON document with
--json); tables, progress and messages go to stderr.

SIGINT (Ctrl-C) and SIGTERM (kill, timeout, a batch scheduler) stop gradlab at any
moment with one line and exit code 130 or 143; a run directory that exists by then
is marked interrupted, with the trials finished so far kept.
"""

from __future__ import annotations

import signal
import sys


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: stop, say so in one line, exit 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOPPED = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "stopped by SIGTERM"}


def catch_stop_signals(handler) -> dict:
    """Route SIGINT and SIGTERM to ``handler``; returns the handlers they had.

    A signal the parent ignores (nohup, a background job) stays ignored, and outside
    the main thread, where Python allows no handlers, nothing changes.
    """
    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            try:
                previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread
                break
    return previous


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def restore_signal_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def early_stop(signum: int, what: str = "") -> SystemExit:
    """A stop that no command reported: its one line (and the --json document)."""
    import json

    message = STOPPED[signum] + what
    if "--json" in sys.argv[1:]:
        print(json.dumps({"status": "interrupted", "error": message, "run_dir": None}),
              flush=True)
    sys.stderr.write(f"error: {message}\n")
    return SystemExit(128 + signum)


# before anything slow: torch and pandas take seconds to import, and a Ctrl-C meanwhile gets
# the one line too (only Python's own start-up, some milliseconds, comes before this)
_handlers_before_import = catch_stop_signals(_raise_interrupted)
try:
    import contextlib
    import dataclasses
    import traceback
    from pathlib import Path
    from typing import Annotated

    import pandas as pd
    import typer
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table

    from gradlab import compare, runner, spec, store, zoo
    from gradlab.errors import GradlabError
except Interrupted as stop:
    starting = (" before the run started; nothing was written" if sys.argv[1:2] == ["run"]
                else " while starting; nothing was written")
    raise early_stop(stop.signum, starting) from None
finally:
    restore_signal_handlers(_handlers_before_import)

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


# above this many trials a run needs --yes: a typo in a sweep should not start hours of work
MAX_TRIALS = 1000
YesOpt = Annotated[bool, typer.Option(
    "--yes", help=f"Run even when the sweep makes more than {MAX_TRIALS} trials.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    one_line = " ".join(message.split())  # an exception's text may hold newlines
    err.print(f"[bold red]error:[/] {escape(one_line)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


class Stop:
    """The stop signal this process received, shared by the handler and the commands."""
    signum: int | None = None
    finishing = False  # writing the end state: a second signal must not cut it short
    reported = False  # the one line is out


def _on_stop_signal(signum, frame):
    if Stop.signum is None:
        Stop.signum = signum
    if not Stop.finishing:
        store.raise_after_write(Interrupted(signum))  # a CSV line is never cut in half


def main() -> None:
    """The `gradlab` command: the app, with SIGINT and SIGTERM ending it in one line."""
    Stop.signum, Stop.finishing, Stop.reported = None, False, False
    previous = catch_stop_signals(_on_stop_signal)
    try:
        app()
    except KeyboardInterrupt:  # outside any command, e.g. while typer reads the arguments
        Stop.finishing = True
        raise early_stop(Stop.signum or signal.SIGINT) from None
    except SystemExit as ended:
        # typer turns a KeyboardInterrupt that leaves a command into a silent exit 130
        if ended.code == 130 and Stop.signum is not None and not Stop.reported:
            Stop.finishing = True
            raise early_stop(Stop.signum) from None
        raise
    finally:
        restore_signal_handlers(previous)


@app.command()
def run(
    experiment: Annotated[str, typer.Argument(
        help="A built-in experiment name (see `gradlab list`) or a path to a spec .toml.",
        show_default=True)] = "equivalence",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", metavar="KEY=VALUE",
        help="Override a setting; a comma list sweeps it (`--set accum_steps=2,4`); "
             "ARM.KEY=VALUE sets it in one arm. Repeatable.")] = None,
    out: OutOpt = Path("results"),
    json_out: JsonOpt = False,
    yes: YesOpt = False,
) -> None:
    """Run an experiment: every arm from the same weights on the same examples; write CSVs.

    Examples:

    * `gradlab run` - the default `equivalence` experiment (about a minute on a laptop CPU)

    * `gradlab run toy` - the classic two-example toy: -16, then -20, then w = 1.2

    * `gradlab run equivalence --set accum_steps=4 --set dtype=float64`

    * `gradlab run my_spec.toml --set model=mypkg.nets:make_net --json`
    """
    run_dir = None
    try:
        loaded, trials, cost = prepare(experiment, set_ or [], yes)
        run_dir = store.RunDir(out, loaded.name, {
            "spec_source": loaded.source, "spec_text": loaded.text, "overrides": set_ or [],
            "notes": loaded.notes, "description": loaded.description,
            "trials": [{"trial": t.index, "swept": t.swept,
                        "arms": {a.name: {"baseline": a.baseline, "expect": a.expect,
                                          "settings": dataclasses.asdict(a.settings)}
                                 for a in t.arms}} for t in trials],
            "device": str(runner.resolve_device(trials[0].baseline.settings.device)),
        })
        for note in loaded.notes:
            err.print(note, markup=False, highlight=False, soft_wrap=True)
        if not json_out:
            err.print(plan(loaded.name, trials, cost), markup=False, highlight=False,
                      soft_wrap=True)
        total = sum(a.settings.steps for t in trials for a in t.arms)
        show_progress = not json_out and sys.stdout.isatty()
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("steps"), TimeElapsedColumn(), console=err,
                      disable=not show_progress, transient=True) as progress:
            task = progress.add_task(f"{loaded.name}: {len(trials)} trials", total=total)
            results = runner.run_trials(trials, run_dir, lambda n: progress.advance(task, n))
        run_dir.finish("complete")
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM through _on_stop_signal
        signum = getattr(stop, "signum", Stop.signum or signal.SIGINT)
        raise stopped(signum, json_out, run_dir) from None
    except GradlabError as e:  # bad input; during a stop, a factory may have turned it into one
        if Stop.signum is not None:
            raise stopped(Stop.signum, json_out, run_dir) from None
        if run_dir is not None:
            mark(run_dir, "failed", str(e))
        raise end_run(str(e), 2, "bad-input", json_out, run_dir) from None
    except Exception as e:  # a bug or a numerical failure: keep the evidence, say where
        if Stop.signum is not None:
            raise stopped(Stop.signum, json_out, run_dir) from None
        if run_dir is None:
            raise end_run(f"preparing the run failed: {type(e).__name__}: {e} (at "
                          f"{_where(e)})", 1, "failed", json_out) from None
        mark(run_dir, "failed", traceback.format_exc())
        raise end_run(f"run failed: {type(e).__name__}: {e} (traceback in "
                      f"{run_dir.path / 'run.json'})", 1, "failed", json_out, run_dir) from None

    # the run is judged as compare judges it, from what was written: one rule, one table
    comparison = compare.compare(store.load_runs([run_dir.path]))
    summaries = [row for r in results for row in r["summary"]]
    checks = [row for r in results for row in r["checks"]]
    if json_out:
        typer.echo(store.dumps(json_document(run_dir, trials, summaries, checks, comparison)))
    else:
        render_comparison(comparison)
        render_checks(checks)
        render_divergence(summaries)
        traces = [row for r in results for row in r["trace"]]
        if traces and len(traces) <= 64:
            render_trace(traces, [w for r in results for w in r["weights"]])
    for line in comparison.failures:
        err.print(f"[bold red]expectation failed:[/] {line}", highlight=False, soft_wrap=True)
    if not json_out:
        err.print(f"run directory ({len(trials)} trials, status complete):", highlight=False)
        typer.echo(str(run_dir.path))
    if comparison.failures:
        raise typer.Exit(1)


def prepare(experiment: str, assignments: list[str],
            yes: bool) -> tuple[spec.Spec, list[spec.Trial], runner.Plan]:
    """Everything that can refuse the input, before anything is written."""
    loaded = spec.apply_overrides(spec.load_spec(experiment), assignments)
    if not loaded.source.startswith(str(spec.builtin_dir())):
        # a spec's own folder is importable: setup = "my_lm:make_setup" finds my_lm.py
        sys.path.insert(0, str(Path(loaded.source).resolve().parent))
    trials = spec.expand(loaded)
    if len(trials) > MAX_TRIALS and not yes:
        axes = " x ".join(f"{k}: {len(v)} values" for k, v in loaded.sweep.items())
        raise GradlabError(f"{len(trials)} trials ({axes}) is more than {MAX_TRIALS}; add "
                           f"--yes to run them all, or sweep fewer values")
    return loaded, trials, runner.preflight(trials)


def plan(name: str, trials: list[spec.Trial], cost: runner.Plan) -> str:
    """What is about to run, and what it will cost, on one line."""
    arms = list(dict.fromkeys(a.name for t in trials for a in t.arms))
    trainings = sum(len(t.arms) for t in trials)
    steps = sum(a.settings.steps for t in trials for a in t.arms)
    return (f"{name}: {_count(len(trials), 'trial')} x {_count(len(arms), 'arm')} "
            f"({', '.join(arms)}) = {_count(trainings, 'training')}, {steps} optimizer steps "
            f"in all; {cost.estimate()}")


def mark(run_dir: store.RunDir, status: str, error: str) -> None:
    """Write how the run ended, if the disk still lets us: the error line matters more."""
    with contextlib.suppress(OSError):  # else run.json stays 'running', and compare says why
        run_dir.finish(status, error)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _where(e: BaseException) -> str:
    """The file and line an exception was raised at."""
    frames = traceback.extract_tb(e.__traceback__)
    return f"{frames[-1].filename}, line {frames[-1].lineno}" if frames else "unknown place"


def end_run(message: str, code: int, status: str, json_out: bool,
            run_dir: store.RunDir | None = None) -> typer.Exit:
    """A run that did not complete: its one line, and with --json its one document."""
    Stop.reported = True
    if json_out:
        typer.echo(store.dumps({"status": status, "error": " ".join(message.split()),
                                "run_dir": str(run_dir.path) if run_dir else None}))
    return fail(message, code)


def stopped(signum: int, json_out: bool, run_dir: store.RunDir | None) -> typer.Exit:
    """SIGINT or SIGTERM: mark the run interrupted (finished trials stay) and say so."""
    Stop.finishing = True  # a second Ctrl-C must not cut the writing of run.json short
    word = STOPPED.get(signum, f"stopped by signal {signum}")
    if run_dir is None:
        message = f"{word} before the run started; nothing was written"
    elif run_dir.meta["status"] == "complete":
        message = f"{word} after the run completed; its results are in {run_dir.path}"
    else:
        total = len(run_dir.meta["trials"])
        done = len(run_dir.finished_trials)
        mark(run_dir, "interrupted", f"{signal.Signals(signum).name}: {done} of {total} "
                                     f"trials finished before it arrived")
        message = (f"{word}; {done} of {total} trials finished and are kept in "
                   f"{run_dir.path} (run.json says interrupted)")
    return end_run(message, 128 + signum, "interrupted", json_out, run_dir)


def json_document(run_dir: store.RunDir, trials: list[spec.Trial], summaries: list[dict],
                  checks: list[dict], comparison: compare.Comparison) -> dict:
    by_trial: dict[int, list] = {t.index: [] for t in trials}
    for row in summaries:
        arm_checks = [{k: v for k, v in c.items() if k not in ("trial", "arm")} for c in checks
                      if (c["trial"], c["arm"]) == (row["trial"], row["arm"])]
        by_trial[row["trial"]].append({**{k: v for k, v in row.items() if k != "trial"},
                                       "check": comparison.check_of(row["trial"], row["arm"]),
                                       "checks": arm_checks})
    return {"run_dir": str(run_dir.path), "status": run_dir.meta["status"],
            "experiment": run_dir.meta["experiment"],
            "trials": [{"trial": t.index, "settings": t.swept, "arms": by_trial[t.index]}
                       for t in trials],
            "check_failures": comparison.failures}


def render_divergence(summaries: list[dict]) -> None:
    for row in summaries:
        if not compare.is_missing(row["diverged_at_step"]):
            err.print(f"[bold]diverged:[/] trial {row['trial']} arm {row['arm']}: non-finite "
                      f"loss, gradient or weights from step {row['diverged_at_step']:.0f}; its "
                      f"gradient is judged on the probes before that", highlight=False)


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
        min=0.0, help="Relative tolerance on the distance from the exact gradient, in place "
                      "of the measured one (4·max(floor, 16·2^-53) + (N−1)·u).")] = None,
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
        err.print(f"[bold red]expectation failed:[/] {escape(line)}", highlight=False,
                  soft_wrap=True)
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
        err.print(note, markup=False, highlight=False, soft_wrap=True)


# colour says whether the spec's expectation held, not which verdict it is
CHECK_STYLE = {"ok": "green", "FAIL": "bold red", "n/a": "dim"}
VERDICT_STYLE = {"baseline": "dim"}


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


if __name__ == "__main__":  # python -m gradlab.cli: what the `gradlab` script runs
    main()
