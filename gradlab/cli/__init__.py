"""The gradlab command line. Thin: parse, validate, call the library, render.

A command's result goes to stdout: the tables of `list`, `show` and `compare`, the
run directory's path (`run`), the paths written (`plot`, `report`, `init`), or one
JSON document with --json. Progress, messages, warnings and `run`'s own table go to
stderr, so `gradlab run ... | xargs gradlab compare` and `gradlab list | grep lr` work.

Start-up is fast: torch, pandas and matplotlib are imported inside the commands that
need them, never here (tests/test_startup.py holds that).

SIGINT (Ctrl-C) and SIGTERM (kill, timeout, a batch scheduler) stop gradlab at any
moment with one line and exit code 130 or 143; a run directory that exists by then
is marked interrupted, with the trials finished so far kept.
"""

from __future__ import annotations

import os
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
    if os.environ.get("RANK", "0") != "0":  # a rank of torchrun's other than 0: rank 0 says it
        return SystemExit(128 + signum)
    if "--json" in sys.argv[1:]:
        print(json.dumps({"status": "interrupted", "error": message, "run_dir": None}),
              flush=True)
    sys.stderr.write(f"error: {message}\n")
    return SystemExit(128 + signum)


def starting() -> str:
    """What a stop before any command began adds to its line: nothing was written."""
    return (" before the run started; nothing was written" if sys.argv[1:2] == ["run"]
            else " while starting; nothing was written")


# before anything slow: torch and pandas take seconds to import, and a Ctrl-C meanwhile gets
# the one line too (only Python's own start-up, some milliseconds, comes before this)
_handlers_before_import = catch_stop_signals(_raise_interrupted)
try:
    import contextlib
    import dataclasses
    import json
    import re
    import socket
    import time
    import traceback
    from pathlib import Path
    from typing import TYPE_CHECKING, Annotated

    import typer
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from gradlab import __version__
    from gradlab.config import catalog, spec
    from gradlab.errors import GradlabError
    from gradlab.record import schema

    if TYPE_CHECKING:  # the modules that import torch or pandas: only inside the commands
        from gradlab.lab import distributed, runner
        from gradlab.readers import compare
        from gradlab.record import store
except Interrupted as stop:
    raise early_stop(stop.signum, starting()) from None
finally:
    restore_signal_handlers(_handlers_before_import)

app = typer.Typer(
    help="gradlab: does your gradient accumulation compute the big-batch gradient? "
         "Run paired experiments (B x 1 against (B/N) x N) and measure.",
    epilog="Start with `gradlab run toy`, then `gradlab run` (the equivalence experiment); "
           "`gradlab list` shows what there is, `gradlab show NAME` what a spec will run.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


# off a terminal (a pipe, a log file, CI) lines are as long as they need to be: a table is
# printed whole, one line per row, and a message on one line
UNBOUNDED = 10_000


def console(stderr: bool = False) -> Console:
    """Rich's console on stdout or stderr, made at each use, so that it writes to the
    stream and the width (COLUMNS) in force then. A terminal (or a set COLUMNS) gets its
    width, tables squeezed to fit; anything else long lines (rich would wrap at 80)."""
    stream = sys.stderr if stderr else sys.stdout
    fixed = stream.isatty() or "COLUMNS" in os.environ
    return Console(stderr=stderr, width=None if fixed else UNBOUNDED,
                   quiet=stderr and Stop.quiet)


def say(message: str, markup: bool = False) -> None:
    """A message for people, on stderr: in a terminal wrapped between words at its width,
    elsewhere one line."""
    console(stderr=True).print(message, markup=markup, highlight=False)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"gradlab {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option(
        "--version", "-V", callback=version_callback, is_eager=True,
        help="Print gradlab's version and exit.")] = False,
) -> None:
    """The options that come before a command."""


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and "
                                                      "nothing else (no table, no progress).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder that receives the run "
                                                          "directory.")]


def complete_spec_names(incomplete: str) -> list[str]:
    """Shell completion of an experiment name (gradlab --install-completion)."""
    return [name for name in spec.findable_specs() if name.startswith(incomplete)]


SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", metavar="KEY=VALUE",
    help="Override a setting; a comma list sweeps it (`--set accum_steps=2,4`); "
         "ARM.KEY=VALUE sets it in one arm. Repeatable.")]

# above this many trials a run needs --yes: a typo in a sweep should not start hours of work
MAX_TRIALS = 1000
YesOpt = Annotated[bool, typer.Option(
    "--yes", help=f"Run even when the sweep makes more than {MAX_TRIALS} trials.")]


TableOpt = Annotated[str, typer.Option(
    "--table", "-t", help="compact: one row per arm and setting, one column per N, each cell "
                          "the judged error marked ✓ (as the spec expects), ✗ or · (not "
                          "checked); full: one row per arm of every trial, every column.")]
TABLES = ("compact", "full")


def fail(message: str, code: int = 2) -> typer.Exit:
    one_line = " ".join(message.split())  # an exception's text may hold newlines
    console(stderr=True).print(f"[bold red]error:[/] {escape(one_line)}", highlight=False,
                               soft_wrap=True)
    return typer.Exit(code)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise fail(f"{option} {value}: choose one of {', '.join(choices)}")


class Stop:
    """The stop signal this process received, shared by the handler and the commands."""
    signum: int | None = None
    finishing = False  # writing the end state: a second signal must not cut it short
    reported = False  # the one line is out
    began = False  # a command that writes files has begun: "nothing was written" may be false
    rank = False  # this process is a rank of a data-parallel run
    world: distributed.World | None = None  # ... and the group it joined
    quiet = False  # a rank other than 0: rank 0 speaks for the run, on stderr


def _on_stop_signal(signum, frame):
    if Stop.signum is None:
        Stop.signum = signum
    # a rank's collective fails when the rank at its other end stops first, so a rank's stop
    # often arrives while that error is being handled: the handler sees Stop.signum instead
    handling = Stop.rank and sys.exc_info()[1] is not None
    if not Stop.finishing and not handling:
        # a CSV line is never cut in half; before store is imported nothing can be writing
        store_module = sys.modules.get("gradlab.record.store")
        if store_module is None:
            raise Interrupted(signum)
        store_module.raise_after_write(Interrupted(signum))


def main() -> None:
    """The `gradlab` command: the app, with SIGINT and SIGTERM ending it in one line."""
    Stop.signum, Stop.finishing, Stop.reported, Stop.began = None, False, False, False
    Stop.rank, Stop.world, Stop.quiet = False, None, False
    previous = catch_stop_signals(_on_stop_signal)
    try:
        app()
    except KeyboardInterrupt:  # outside any command, e.g. while typer reads the arguments
        Stop.finishing = True
        raise early_stop(Stop.signum or signal.SIGINT,
                         "" if Stop.began else starting()) from None
    except SystemExit as ended:
        # typer turns a KeyboardInterrupt that leaves a command (or its argument parsing)
        # into a silent exit 130
        if ended.code == 130 and Stop.signum is not None and not Stop.reported:
            Stop.finishing = True
            raise early_stop(Stop.signum, "" if Stop.began else starting()) from None
        raise
    finally:
        restore_signal_handlers(previous)


def script() -> None:
    """The `gradlab` console script and `python -m gradlab`: main(), then a quick exit.

    After a run, Python's teardown of the interpreter (torch's modules and every object
    freed one by one) took 0.8 s, 1.4 s after one with worker processes, before the shell
    got its prompt back. By then every file is closed and every worker gone, so once main()
    is done and its output flushed, the process ends without that teardown (os._exit),
    unless some thread is still running: that exit is left to Python."""
    import threading

    try:
        main()
        code = 0
    except SystemExit as ended:  # as Python itself turns one into an exit status
        code = ended.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # e.g. a closed pipe: Python's own exit says so
        sys.exit(code)
    if threading.active_count() > 1:
        sys.exit(code)
    os._exit(code)


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
    Stop.began = True
    check_choice("--table", table, TABLES)
    rank = world = cost = None
    try:
        from gradlab.lab import parallel

        if "RANK" in os.environ:  # torchrun (or a run's own launch) may have started us
            from gradlab.lab import distributed

            rank = distributed.Rank.from_env()
        Stop.rank = rank is not None
        Stop.quiet = rank is not None and rank.rank != 0  # rank 0 speaks for the run
        loaded, trials = resolve(experiment, set_ or [], yes, rank)
        idle = parallel.idle_cores()  # read before the fork server starts: it counts as busy
        one_process = all(a.settings.world_size == 1 for t in trials for a in t.arms)
        if rank is None and one_process and min(jobs or idle, len(trials)) > 1:
            # workers are likely: the fork server imports torch and what they need on
            # another core while this process imports torch and runs preflight (a run that
            # preflight finds short stays in this process; on CUDA, one GPU: the same)
            parallel.warm_up()
        from gradlab.lab import distributed  # torch: seconds to import

        ranks = distributed.ranks_needed(trials, rank)
        if rank is None and ranks is None:  # (a rank runs preflight once joined)
            cost = spread(trials, jobs, idle)
        elif rank is not None and ranks is not None:
            world = Stop.world = distributed.join(rank, ranks)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM through _on_stop_signal
        signum = getattr(stop, "signum", Stop.signum or signal.SIGINT)
        raise stopped(signum, json_out, None) from None
    except GradlabError as e:
        if Stop.signum is not None:
            raise stopped(Stop.signum, json_out, None) from None
        raise end_run(str(e), 2, "bad-input", json_out) from None
    except Exception as e:
        if Stop.signum is not None:
            raise stopped(Stop.signum, json_out, None) from None
        raise end_run(f"preparing the run failed: {type(e).__name__}: {e} (at "
                      f"{_where(e)})", 1, "failed", json_out) from None
    if ranks is not None and rank is None:  # data-parallel arms: start the ranks, as torchrun
        args = ["run", experiment, *(f"--set={a}" for a in set_ or []), f"--out={out}",
                f"--table={table}", *(["--json"] if json_out else []),
                *(["--yes"] if yes else [])]
        try:
            ended = distributed.launch(ranks.size, args)
        except KeyboardInterrupt as stop:  # before the ranks started (later, they say it)
            raise stopped(getattr(stop, "signum", signal.SIGINT), json_out, None) from None
        except Exception as e:  # no store, no process: nothing started
            raise end_run(f"starting {ranks.size} ranks failed: {type(e).__name__}: {e}", 1,
                          "failed", json_out) from None
        Stop.reported = True  # rank 0 said how the run ended, or:
        if ended.message:
            raise end_run(ended.message, ended.code, "failed", json_out)
        raise typer.Exit(ended.code)
    execute(loaded, trials, cost, world, set_ or [], out, json_out, table)


def spread(trials: list[spec.Trial], jobs: int | None, idle: int) -> runner.Plan:
    """Preflight's plan, with the trials spread over ``jobs`` worker processes (default:
    runner.default_jobs, from the cores the load leaves ``idle``)."""
    from gradlab.lab import runner

    likely = runner.workers_for(trials, jobs or runner.default_jobs(trials, None, idle))
    # timed with the intra-op threads each trial will get: with torch's default (every
    # core) against the fork server's imports, preflight took 2.7 s instead of 1.6 s and
    # estimated the default run at 54 s instead of 19 s
    with runner.torch_threads(likely.threads):
        plan = runner.preflight(trials)
    jobs = jobs or runner.default_jobs(trials, plan, idle)
    return runner.spread(trials, jobs, plan)


def execute(loaded: spec.Spec, trials: list[spec.Trial], cost: runner.Plan | None,
            world: distributed.World | None, assignments: list[str], out: Path,
            json_out: bool, table: str) -> None:
    """Run the prepared trials, write the run directory, judge and show it. On each rank of
    a data-parallel run (``world``) alike, the trials one after another in the rank's own
    process; only rank 0 writes and prints."""
    from gradlab.lab import runner
    from gradlab.readers import compare
    from gradlab.record import store

    writes = world is None or world.rank == 0
    run_dir = None
    try:
        if cost is None:  # a rank: its trials in its own process
            cost = runner.spread(trials, 1, runner.preflight(trials))
        workers = cost.workers
        ranks = world.gather({"rank": world.rank, "pid": os.getpid(),
                              "host": socket.gethostname()}) if world else None
        if writes:
            run_dir = store.RunDir(out, loaded.name, {
                "spec_source": loaded.source, "spec_text": loaded.text,
                "overrides": assignments, "notes": [*loaded.notes, *cost.notes],
                "description": loaded.description,
                "trials": [{"trial": t.index, "swept": t.swept,
                            "arms": {a.name: {"baseline": a.baseline, "expect": a.expect,
                                              "help": a.help,
                                              "settings": dataclasses.asdict(a.settings)}
                                     for a in t.arms}} for t in trials],
                "device": str(runner.resolve_device(trials[0].baseline.settings.device)),
                "environment": [runner.environment(device) for device in dict.fromkeys(
                    runner.resolve_device(a.settings.device) for t in trials for a in t.arms)],
                "jobs": workers.jobs, "workers": workers.processes, "threads": workers.threads,
                **({"ranks": ranks} if ranks else {}),
            })
        if world is not None:  # the ranks agree on the run directory: rank 0's
            world.run_dir = Path(world.share(str(run_dir.path) if run_dir else None))
        for note in [*loaded.notes, *cost.notes]:
            say(note)
        if not json_out:
            say(plan(loaded.name, trials, cost, world))
        total = sum(a.settings.steps for t in trials for a in t.arms)
        with RunProgress(loaded.name, len(trials), total, cost.seconds,
                         shown=not json_out and writes) as progress:
            results = runner.run_trials(trials, run_dir, progress.advance, workers)
        if run_dir is not None:
            run_dir.finish("complete")
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM through _on_stop_signal
        signum = getattr(stop, "signum", Stop.signum or signal.SIGINT)
        raise stopped(signum, json_out, run_dir, world) from None
    except GradlabError as e:  # bad input; during a stop, a factory may have turned it into one
        if Stop.signum is not None:
            raise stopped(Stop.signum, json_out, run_dir, world) from None
        if world is not None:
            raise rank_failed(world, e, str(e), 2, json_out, run_dir) from None
        if run_dir is not None:
            mark(run_dir, "failed", str(e))
        raise end_run(str(e), 2, "bad-input", json_out, run_dir) from None
    except Exception as e:  # a bug or a numerical failure: keep the evidence, say where
        if Stop.signum is not None:
            raise stopped(Stop.signum, json_out, run_dir, world) from None
        if world is not None:
            raise rank_failed(world, e, traceback.format_exc(), 1, json_out, run_dir) from None
        if run_dir is None:
            raise end_run(f"preparing the run failed: {type(e).__name__}: {e} (at "
                          f"{_where(e)})", 1, "failed", json_out) from None
        mark(run_dir, "failed", traceback.format_exc())
        raise end_run(f"run failed: {type(e).__name__}: {e} (traceback in "
                      f"{run_dir.path / 'run.json'})", 1, "failed", json_out, run_dir) from None
    if world is not None:
        world.leave()
    if not writes:
        return  # rank 0 judges and shows the run

    # the run is judged as compare judges it, from what was written: one rule, one table
    comparison = compare.compare(store.load_runs([run_dir.path]))
    summaries = [row for r in results for row in r["summary"]]
    checks = [row for r in results for row in r["checks"]]
    err = console(stderr=True)
    if json_out:
        typer.echo(store.dumps(json_document(run_dir, trials, summaries, checks, comparison)))
    elif table == "full":
        render_comparison(comparison, err)
        render_checks(checks, err)
        render_divergence(summaries, err)
        render_data_parallel(summaries, err)
    else:
        render_pivot(compare.pivot(comparison), err)
        render_divergence(summaries, err, one_line=True)
        render_data_parallel(summaries, err)
    if not json_out:
        traces = [row for r in results for row in r["trace"]]
        if traces and len(traces) <= 64:
            render_trace(traces, [w for r in results for w in r["weights"]], err)
    for line in comparison.failures:
        err.print(f"[bold red]expectation failed:[/] {escape(line)}", highlight=False,
                  soft_wrap=True)
    if not json_out:
        say(f"run directory ({_count(len(trials), 'trial')}, status complete):")
        typer.echo(str(run_dir.path))
    if comparison.failures:
        raise typer.Exit(1)


class RunProgress:
    """A run's progress on stderr, from the optimizer steps done (runner.run_trials calls
    ``advance(n)``). On a terminal: a bar with the time left. Off one (a CI log, a file):
    a line every 10 s and one at the end, so a log shows the run moving without a line per
    step. The time left is the steps left at the pace since the first step (building the
    first models takes a while and says nothing about the pace); before that, preflight's
    estimate."""

    EVERY = 10.0  # seconds between lines off a terminal

    def __init__(self, name: str, trials: int, total: int, estimate: float, shown: bool = True,
                 clock=time.monotonic):
        self.name, self.trials, self.total, self.estimate = name, trials, total, estimate
        self.shown, self.clock = shown, clock
        self.done = 0
        self.first: tuple[float, int] | None = None  # (time, steps done) at the first step
        self.bar = None
        from gradlab.lab.runner import format_seconds  # run has imported runner already

        self.format = format_seconds

    def __enter__(self) -> RunProgress:
        self.started = self.last_line = self.clock()
        err = console(stderr=True)
        if self.shown and err.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("steps"), TimeElapsedColumn(),
                                TextColumn("{task.fields[left]}"), console=err,
                                transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(f"{self.name}: {_count(self.trials, 'trial')}",
                                          total=self.total, left=self.left())
        return self

    def __exit__(self, kind, value, tb) -> None:
        if self.bar is not None:
            self.bar.__exit__(kind, value, tb)
        elif self.shown and kind is None:
            say(f"{self.name}: {self.total} of {self.total} steps done in "
                f"{self.format(self.clock() - self.started)}")

    def seconds_left(self) -> float:
        if self.first is None or self.done == self.first[1]:
            return self.estimate * (self.total - self.done) / max(self.total, 1)
        since, done_then = self.first
        return (self.clock() - since) * (self.total - self.done) / (self.done - done_then)

    def left(self) -> str:
        return f"about {self.format(self.seconds_left())} left" if self.done < self.total else ""

    def line(self) -> str:
        return (f"{self.name}: {self.done} of {self.total} steps "
                f"({100 * self.done // max(self.total, 1)}%), "
                f"{self.format(self.clock() - self.started)} so far, {self.left()}")

    def advance(self, n: int) -> None:
        self.done += n
        if self.first is None:
            self.first = (self.clock(), self.done)
        if self.bar is not None:
            self.bar.update(self.task, advance=n, left=self.left())
        elif self.shown and self.done < self.total and \
                self.clock() - self.last_line >= self.EVERY:
            self.last_line = self.clock()
            say(self.line())


def resolve(experiment: str, assignments: list[str], yes: bool = True,
            rank: distributed.Rank | None = None) -> tuple[spec.Spec, list[spec.Trial]]:
    """The spec with the overrides applied, and its trials (torch-free without ``rank``)."""
    loaded = spec.load_spec(experiment)
    if rank is not None:
        from gradlab.lab import distributed

        distributed.take_world_size(loaded, rank)
    loaded = spec.apply_overrides(loaded, assignments)
    if not loaded.source.startswith(str(spec.builtin_dir())):
        # a spec's own folder is importable: setup = "my_lm:make_setup" finds my_lm.py
        sys.path.insert(0, str(Path(loaded.source).resolve().parent))
    trials = spec.expand(loaded)
    if len(trials) > MAX_TRIALS and not yes:
        axes = " x ".join(f"{k}: {len(v)} values" for k, v in loaded.sweep.items())
        raise GradlabError(f"{len(trials)} trials ({axes}) is more than {MAX_TRIALS}; add "
                           f"--yes to run them all, or sweep fewer values")
    return loaded, trials


def plan(name: str, trials: list[spec.Trial], cost: runner.Plan,
         world: distributed.World | None = None) -> str:
    """What is about to run, and what it will cost, on one line."""
    arms = list(dict.fromkeys(a.name for t in trials for a in t.arms))
    trainings = sum(len(t.arms) for t in trials)
    steps = sum(a.settings.steps for t in trials for a in t.arms)
    ranks = f" on each of {world.size} ranks" if world is not None else ""
    return (f"{name}: {_count(len(trials), 'trial')} x {_count(len(arms), 'arm')} "
            f"({', '.join(arms)}) = {_count(trainings, 'training')}, {steps} optimizer steps "
            f"in all{ranks}; {cost.estimate()}")


def mark(run_dir: store.RunDir, status: str, error: str, rank: int | None = None) -> None:
    """Write how the run ended, if the disk still lets us: the error line matters more."""
    with contextlib.suppress(OSError):  # else run.json stays 'running', and compare says why
        run_dir.finish(status, error, rank)


def rank_failed(world: distributed.World, error: BaseException, details: str, code: int,
                json_out: bool, run_dir: store.RunDir | None) -> typer.Exit:
    """A rank of a data-parallel run failed: this one, or another whose failure made this
    one's collective fail (or brought a stop). Each rank records its own failure; rank 0
    marks the run failed with the first one recorded: which rank, and why."""
    if Stop.signum is not None:  # stopped: the other end of the failed collective stopped too
        return stopped(Stop.signum, json_out, run_dir, world)
    Stop.finishing = True  # the launcher's SIGTERM must not cut the record short
    world.record_failure(f"{type(error).__name__}: {error}" if code == 1 else str(error),
                         details, code)
    return run_failed(world.first_failure() or {"rank": world.rank, "error": str(error),
                                                "details": details, "code": code},
                      json_out, run_dir)


def run_failed(failure: dict, json_out: bool, run_dir: store.RunDir | None) -> typer.Exit:
    """The run failed on the rank ``failure`` names (a record of distributed.World)."""
    Stop.finishing = True
    where = ""
    if run_dir is not None:
        mark(run_dir, "failed", f"rank {failure['rank']}: {failure['details']}",
             failure["rank"])
        where = f" (details in {run_dir.path / 'run.json'})"
    return end_run(f"run failed on rank {failure['rank']}: {failure['error']}{where}",
                   failure["code"], "failed", json_out, run_dir)


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
    if Stop.world is not None and Stop.world.rank == 0:
        Stop.world.record_reported(code)
    if json_out and not Stop.quiet:  # (quiet: a rank other than 0, which rank 0 speaks for)
        # plain json: store (and pandas) may be what was being imported when it stopped
        typer.echo(json.dumps({"status": status, "error": " ".join(message.split()),
                               "run_dir": str(run_dir.path) if run_dir else None}, indent=2))
    return fail(message, code)


def stopped(signum: int, json_out: bool, run_dir: store.RunDir | None,
            world: distributed.World | None = None) -> typer.Exit:
    """SIGINT or SIGTERM: mark the run interrupted (finished trials stay) and say so; unless
    another rank failed first, and torchrun or the launcher stops this one for it."""
    Stop.finishing = True  # a second Ctrl-C must not cut the writing of run.json short
    failure = world.first_failure() if world is not None else None
    if failure is not None:
        return run_failed(failure, json_out, run_dir)
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


def render_divergence(summaries: list[dict], out: Console, one_line: bool = False) -> None:
    diverged = [row for row in summaries if not schema.missing(row["diverged_at_step"])]
    if one_line and diverged:
        where = ", ".join(f"trial {row['trial']} {row['arm']} (step "
                          f"{row['diverged_at_step']:.0f})" for row in diverged)
        out.print(f"[bold]diverged:[/] {_count(len(diverged), 'training')} reached a non-finite "
                  f"loss, gradient or weights, and are judged on the probes before that: "
                  f"{escape(where)}", highlight=False)
        return
    for row in diverged:
        out.print(f"[bold]diverged:[/] trial {row['trial']} arm {escape(row['arm'])}: "
                  f"non-finite loss, gradient or weights from step "
                  f"{row['diverged_at_step']:.0f}; its gradient is judged on the probes "
                  f"before that", highlight=False, soft_wrap=True)


def render_data_parallel(summaries: list[dict], out: Console) -> None:
    """What syncing cost each arm of a run with data-parallel arms: all-reduces and time."""
    from gradlab.readers.compare import fmt

    if not any(row["world_size"] > 1 for row in summaries):
        return
    table = Table(title="data parallel: what syncing cost", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for column in ("trial", "arm", "W", "N", "micro", "all-reduces/step", "ms/step"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for row in summaries:
        table.add_row(str(row["trial"]), Text(row["arm"]), str(row["world_size"]),
                      str(row["accum_steps"]), str(row["micro_batch"]),
                      fmt(row["allreduces_per_step"]), fmt(row["step_seconds"] * 1000))
    out.print(table)
    out.print("all-reduces/step: gradient all-reduces per optimizer step, as DDP's "
              "communication hook counted them (one per bucket); ms/step: median time of a "
              "step on rank 0 (with time_steps = true).", highlight=False, soft_wrap=True)


def render_checks(checks: list[dict], out: Console) -> None:
    from gradlab.readers.compare import fmt

    for c in checks:
        outcome = "[green]passed[/]" if c["passed"] else "[bold red]FAILED[/]"
        out.print(f"check, trial {c['trial']} arm {escape(c['arm'])}: {escape(c['check'])}: "
                  f"max rel err {fmt(c['value'])}, tolerance {fmt(c['tolerance'])}: {outcome}",
                  highlight=False, soft_wrap=True)


def render_trace(traces: list[dict], weights: list[dict], out: Console) -> None:
    table = Table(title="trace: the accumulated .grad after each micro-batch backward, "
                        "and the weights after each step", title_justify="left")
    for column in ("trial", "arm", "step", "after", "param", "value"):
        table.add_column(column)
    for row in traces:
        name = f"{row['param']}[{row['element']}]"
        table.add_row(str(row["trial"]), Text(row["arm"]), str(row["step"]),
                      f"micro-batch {row['micro_batch']}", Text(f"{name}.grad"),
                      f"{row['grad']:.6g}")
    for row in weights:
        if row["step"] > 0:
            table.add_row(str(row["trial"]), Text(row["arm"]), str(row["step"]),
                          "optimizer step", Text(f"{row['param']}[{row['element']}]"),
                          f"{row['value']:.6g}")
    out.print(table)


# ----------------------------------------------------------------------------- specs

@app.command("list")
def list_(json_out: JsonOpt = False) -> None:
    """Show the experiments (and where each spec lives), models, datasets, setups and every
    setting with its default.

    Example: `gradlab list`, then `gradlab show norm`, then `gradlab run norm --set seed=0,1,2`.
    """
    found = spec.findable_specs()
    experiments = {name: _describe(path) for name, path in found.items()}
    settings = [{"name": f.name, "default": f.default, "help": f.metadata["help"]}
                for f in dataclasses.fields(spec.Settings)]
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
            from gradlab.lab import runner

            cost = runner.preflight(trials)
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
        expect = "baseline" if arm.baseline else " or ".join(expects)
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
    out.print(f"{_count(len(trials), 'trial')} x {_count(len(arms), 'arm')} = "
              f"{_count(sum(len(t.arms) for t in trials), 'training')}, {steps} optimizer "
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
        from gradlab.readers import compare
        from gradlab.record import store  # pandas: imported only when a command reads runs

        result = compare.compare(
            store.load_runs(runs), reference=baseline, at_step=at_step,
            tol=compare.Tolerance(rtol, atol), show_all=all_, sort=sort, descending=reverse)
    except GradlabError as e:
        raise fail(str(e)) from None
    out = console()
    if format_ == "json":
        typer.echo(store.dumps({"title": result.title, "columns": result.columns,
                                "grouped_over_seeds": result.grouped, "rows": result.records(),
                                "notes": result.notes, "check_failures": result.failures}))
    elif format_ == "csv":
        import pandas as pd

        typer.echo(pd.DataFrame(result.records()).to_csv(index=False), nl=False)
    elif format_ == "md":
        typer.echo((result if full else compare.pivot(result)).markdown(), nl=False)
    elif full:
        render_comparison(result, out)
    else:
        render_pivot(compare.pivot(result), out)
    for line in result.failures:
        console(stderr=True).print(f"[bold red]expectation failed:[/] {escape(line)}",
                                   highlight=False, soft_wrap=True)
    if check and result.failures:
        raise typer.Exit(1)


# colour says whether the spec's expectation held, not which verdict it is: an arm expected
# to differ that differs is green
OUTCOME_STYLE = {"ok": "green", "FAIL": "bold red", "n/a": "dim", "baseline": "dim"}
# what a reader must see whole; the other columns fold (wrap inside the cell) first
KEY_COLUMNS = ("arm", "accum_steps", "verdict", "check")


def compact_table() -> Table:
    """A table whose columns are one space apart: no rules, no edges, no padding; every
    character goes to the numbers. (Its title is printed above it, on its own: a table
    narrower than its title would wrap the title.)"""
    return Table(box=box.SIMPLE_HEAD, show_edge=False, padding=0)


def render_comparison(result: compare.Comparison, out: Console) -> None:
    """The full table: one row per arm of every trial, then how to read it.

    When it is wider than the terminal, the settings fold first (wrap inside their cells);
    the numbers fold only when even that is not enough; arm, N, verdict and check never do.
    """
    table = compact_table()
    rows = result.cells()
    widest = [max(len(cells[j]) for cells in rows) if rows else 0
              for j in range(len(result.columns))]
    numeric = [result.numeric(c) and c not in KEY_COLUMNS for c in result.columns]
    # a number's header wraps at its spaces to the number's width: "rel grad" over "err"
    headers = [_wrapped(result.header(c), w) if n else result.header(c)
               for c, w, n in zip(result.columns, widest, numeric, strict=True)]
    whole = sum(max(w, *(len(line) for line in h.splitlines()))
                for c, w, h, n in zip(result.columns, widest, headers, numeric, strict=True)
                if n or c in KEY_COLUMNS)
    folded_settings = 3 * sum(1 for c, n in zip(result.columns, numeric, strict=True)
                              if not n and c not in KEY_COLUMNS)
    fits = whole + folded_settings + len(result.columns) - 1 <= out.width
    for column, header, width, number in zip(result.columns, headers, widest, numeric,
                                             strict=True):
        justify = "right" if result.numeric(column) else "left"
        if column in KEY_COLUMNS or (number and fits):
            table.add_column(header, no_wrap=True, justify=justify,
                             min_width=max(width, *(len(line) for line in header.splitlines())))
        else:
            table.add_column(header, overflow="fold", justify=justify)
    for cells in rows:
        table.add_row(*(Text(cell, style=_style(column, cell))
                        for column, cell in zip(result.columns, cells, strict=True)))
    out.print(Text(result.title, style="bold"))
    out.print(table)
    for note in result.notes:  # wrapped at the terminal's width, between words
        out.print(note, markup=False, highlight=False)


def _wrapped(header: str, width: int) -> str:
    """A header broken at its spaces into lines no wider than ``width`` (or its longest
    word)."""
    lines: list[str] = []
    for word in header.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


def _style(column: str, cell: str) -> str:
    if column == "check":
        return OUTCOME_STYLE.get(cell, "")
    return OUTCOME_STYLE["baseline"] if column == "verdict" and cell == "baseline" else ""


def render_pivot(pivot: compare.Pivot, out: Console) -> None:
    """The compact table: one row per arm and setting, one column per N; then the totals
    and how to read a cell. The N columns never shrink; the setting and arm columns fold."""
    table = compact_table()
    header = pivot.header()
    for name, label in zip(pivot.labels, header, strict=False):
        if name == "arm":  # a row's name: whole, like the numbers
            widest = max([len(label), *(len(labels[-1]) for labels, _ in pivot.rows)])
            table.add_column(label, no_wrap=True, min_width=widest)
        else:
            table.add_column(label, overflow="fold")
    for j, label in enumerate(header[len(pivot.labels):]):
        widest = max([len(label), *(len(cells[j].text) for _, cells in pivot.rows)])
        table.add_column(label, justify="right", no_wrap=True, min_width=widest)
    for labels, cells in pivot.rows:
        dim = "dim" if all(c.outcome in ("baseline", "") for c in cells) and \
            any(c.outcome == "baseline" for c in cells) else ""
        table.add_row(*(Text(label, style=dim) for label in labels),
                      *(Text(c.text, style=OUTCOME_STYLE.get(c.outcome, "")) for c in cells))
    out.print(Text(pivot.title, style="bold"))
    out.print(table)
    failed = " 0 fail" not in pivot.totals and "fail" in pivot.totals
    out.print(Text(pivot.totals, style="bold red" if failed else "bold"))
    for note in pivot.notes:  # wrapped at the terminal's width, between words
        out.print(note, markup=False, highlight=False)


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
    Stop.began = True
    try:
        from gradlab.readers import report as reports  # imports matplotlib: slow, so only here
        from gradlab.record import store

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
    Stop.began = True
    err = console(stderr=True)
    try:
        from gradlab.auditing import parent as audits  # starts torch processes: only audit needs it

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

