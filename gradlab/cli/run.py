"""`gradlab run`: parse, call gradlab.run(), render what it returns, exit with its code."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from gradlab.cli.render import (
    RunProgress,
    json_document,
    render_checks,
    render_comparison,
    render_data_parallel,
    render_divergence,
    render_pivot,
    render_trace,
)
from gradlab.cli.shared import (
    TABLES,
    JsonOpt,
    OutOpt,
    SetOpt,
    TableOpt,
    YesOpt,
    app,
    check_choice,
    complete_spec_names,
    console,
    ended,
    say,
)
from gradlab.cli.signals import Stop, act_on_held_stop
from gradlab.errors import GradlabError
from gradlab.lab.experiment import Hooks, RunEnded, count
from gradlab.record.meta import Status

if TYPE_CHECKING:
    from gradlab.api import RunResult
    from gradlab.lab.distributed import Rank, World


@app.command()
def run(
    experiment: Annotated[str, typer.Argument(
        help="An experiment name (see `gradlab list`: ./experiments/NAME.toml first, then the "
             "built-ins) or a path to a spec .toml.",
        show_default=True, autocompletion=complete_spec_names)] = "equivalence",
    set_: SetOpt = None,
    out: OutOpt = Path("results"),
    table: TableOpt = "compact",
    json_out: JsonOpt = False,
    yes: YesOpt = False,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", "-j", min=1,
        show_default="the usable cores that the load leaves idle (on CUDA: the GPUs); 1 "
                     "for a run estimated under 10 s",
        help="Run up to K trials at once, each in a worker process with one intra-op "
             "thread (a run of fewer trials gives each the cores left over). The CSVs are "
             "the same bytes for any K.")] = None,
) -> None:
    """Run an experiment: every arm from the same weights on the same examples; write CSVs.

    Prints the run directory on stdout; the plan, progress and the table of results go to
    stderr. Exit 1 when an arm does not do what its spec expects.

    Examples:

    * `gradlab run` - the default `equivalence` experiment (about a minute on a laptop CPU)

    * `gradlab run toy` - the classic two-example toy: -16, then -20, then w = 1.2

    * `gradlab run equivalence --set accum_steps=4 --set dtype=float64`

    * `gradlab run my_spec.toml --set model=mypkg.nets:make_net --json`
    """
    # Stop.began stays False while the library runs: it reports a stop itself from the moment
    # it begins ("before the run started", or the trials kept), and one that comes before
    # that (held while typer imports, say) has written nothing
    check_choice("--table", table, TABLES)
    import gradlab  # the library call this command adapts

    # the ranks of a data-parallel run start as this command did, and rank 0 renders
    rank_args = ["run", experiment, *(f"--set={a}" for a in set_ or []), f"--out={out}",
                 f"--table={table}", *(["--json"] if json_out else []),
                 *(["--yes"] if yes else [])]
    try:
        with user_output_to_stderr(json_out):  # stdout holds the one JSON document
            result = gradlab.run(experiment, set_ or [], out=out, jobs=jobs, yes=yes,
                                 hooks=run_hooks(json_out), rank_args=rank_args)
    except (GradlabError, RunEnded) as e:
        raise ended(e, json_out) from None
    if result.launched is not None:  # rank 0 said how the run ended, or:
        Stop.reported = True
        sys.stdout.write(result.launched.stdout)  # its run directory, or its JSON document
        sys.stdout.flush()
        if result.launched.message:
            raise ended(RunEnded(result.launched.message, result.launched.code, Status.FAILED),
                        json_out)
        raise typer.Exit(result.launched.code)
    if result.run_dir is None:
        return  # a rank other than 0: rank 0 judges and shows the run
    Stop.began = True  # a stop from here on: the run is complete on disk
    show_run(result, json_out, table)
    if result.failures:
        raise typer.Exit(1)


@contextlib.contextmanager
def user_output_to_stderr(on: bool) -> Iterator[None]:
    """While on, whatever the run prints to stdout goes to stderr: the user's factories and
    losses, in this process (sys.stdout) and in the processes it starts meanwhile (file
    descriptor 1), so that --json's stdout is one JSON document and nothing else."""
    if not on:
        yield
        return
    sys.stdout.flush()
    try:
        out, err = sys.stdout.fileno(), sys.stderr.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):  # not files (a test's capture)
        out = err = None
    saved = os.dup(out) if out is not None else None
    if saved is not None:
        os.dup2(err, out)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, out)
            os.close(saved)


def run_hooks(json_out: bool) -> Hooks:
    """How `gradlab run` follows a run: notes and the plan line on stderr, a progress bar
    (or a line every 10 s off a terminal), and this process's stop signals."""

    @contextlib.contextmanager
    def progress(name: str, trials: int, steps: int, seconds: float
                 ) -> Iterator[Callable[[int], None]]:
        with RunProgress(name, trials, steps, seconds, shown=not json_out) as shown:
            def advance(steps_taken: int) -> None:
                shown.advance(steps_taken)
                act_on_held_stop()  # a step is a safe point for a stop held in an import

            yield advance

    def finishing() -> None:
        Stop.finishing = True

    def ranked(rank: Rank, world: World | None) -> None:
        Stop.rank = True
        Stop.quiet = rank.rank != 0  # rank 0 speaks for the run
        Stop.world = world

    return Hooks(say=say, plan=(lambda line: None) if json_out else say, progress=progress,
                 stop_signal=lambda: Stop.signum, finishing=finishing, ranked=ranked)


def show_run(result: RunResult, json_out: bool, table: str) -> None:
    """A completed run, judged as compare judges it: its table (or --json document) and the
    expectations that failed on stderr, its run directory on stdout."""
    from gradlab.readers import compact  # pandas: by now imported by the run
    from gradlab.record import store

    comparison, summaries, checks = result.comparison, result.summary, result.checks
    err = console(stderr=True)
    if json_out:
        typer.echo(store.dumps(json_document(result)))
    elif table == "full":
        render_comparison(comparison, err)
        render_checks(checks, err)
        render_divergence(summaries, err)
        render_data_parallel(summaries, err)
    else:
        render_pivot(compact.pivot(comparison), err)
        render_divergence(summaries, err, one_line=True)
        render_data_parallel(summaries, err)
    if not json_out:
        traces = [row for r in result.results for row in r["trace"]]
        if traces and len(traces) <= 64:
            render_trace(traces, [w for r in result.results for w in r["weights"]], err)
    for line in comparison.failures:
        err.print(f"[bold red]expectation failed:[/] {escape(line)}", highlight=False,
                  soft_wrap=True)
    if not json_out:
        say(f"run directory ({count(len(result.trials), 'trial')}, status {result.status}):")
        typer.echo(str(result.run_dir))
