"""Running an experiment, start to end: the spec resolved into trials, preflight, the run
directory, the trials (in this process, in worker processes, or on the ranks of a
data-parallel run), and how the run ended.

``gradlab.run()`` and ``gradlab run`` both come here; nothing here renders: a caller
follows the run through ``Hooks`` (messages, the plan line, progress, its stop signals).
A run that does not complete ends in ``RunEnded``, its run directory (if one was made)
already marked failed or interrupted; bad input found before anything was written is a
GradlabError, as everywhere in gradlab.

This module imports only the spec layer at the top: torch comes with the first run, so
that ``gradlab show --no-estimate`` (which resolves specs here) stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradlab import entrypoints
from gradlab.config import spec
from gradlab.errors import GradlabError, out_of_memory, where
from gradlab.record.meta import STOPPED, RunMeta, Status

if TYPE_CHECKING:
    from gradlab.lab.distributed import Ended, Rank, World
    from gradlab.lab.plan import Plan
    from gradlab.record.store import RunDir

# above this many trials a run needs yes=True (--yes): a typo in a sweep should not start
# hours of work
MAX_TRIALS = 1000


class RunEnded(Exception):
    """The run did not complete: the one line that says why, the exit code, the status, and
    the run directory if one was made (marked with that status already; a path when the run
    completed and a stop came while it was being read back)."""

    def __init__(self, message: str, code: int, status: Status,
                 run_dir: RunDir | Path | None = None):
        super().__init__(message)
        self.message, self.code, self.status, self.run_dir = message, code, status, run_dir


@contextlib.contextmanager
def _no_progress(name: str, trials: int, steps: int, seconds: float
                 ) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


@dataclass
class Hooks:
    """How a caller follows and steers a run; the defaults are silent, with no stop signals."""
    say: Callable[[str], None] = lambda message: None  # a note for people
    plan: Callable[[str], None] = lambda line: None  # what is about to run, and its cost
    # (experiment, trials, optimizer steps, estimated seconds) -> a context giving advance(n)
    progress: Callable[[str, int, int, float],
                       contextlib.AbstractContextManager[Callable[[int], None]]] = _no_progress
    stop_signal: Callable[[], int | None] = lambda: None  # the stop signal received, if any
    finishing: Callable[[], None] = lambda: None  # the end is being written: hold off stops
    # this process is a rank of torchrun's (world None), then has joined its group
    ranked: Callable[[Rank, World | None], None] = lambda rank, world: None


@dataclass
class Executed:
    """What a run that completed left behind."""
    experiment: str  # the spec's name
    run_dir: Path | None  # None on a rank other than 0, and where ranks were launched
    trials: list[spec.Trial]
    results: list[dict[str, list[dict]]]  # each trial's rows, table by table
    launched: Ended | None = None  # ranks started here: how they ended (rank 0 reported it)


def resolve(experiment: str, assignments: list[str], yes: bool = True,
            rank: Rank | None = None) -> tuple[spec.Spec, list[spec.Trial]]:
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


def spread(trials: list[spec.Trial], jobs: int | None, idle: int) -> Plan:
    """Preflight's plan, with the trials spread over ``jobs`` worker processes (default:
    plan.default_jobs, from the cores the load leaves ``idle``)."""
    from gradlab.lab import plan, preflight

    likely = plan.workers_for(trials, jobs or plan.default_jobs(trials, None, idle))
    # timed with the intra-op threads each trial will get: with torch's default (every
    # core) against the fork server's imports, preflight times a step several times too slow
    with plan.torch_threads(likely.threads):
        estimate = preflight.preflight(trials)
    return plan.spread(trials, jobs or plan.default_jobs(trials, estimate, idle), estimate)


def run_experiment(experiment: str, overrides: list[str] = (), *, out: Path = Path("results"),
                   jobs: int | None = None, yes: bool = True, hooks: Hooks | None = None,
                   rank_args: list[str] | None = None) -> Executed:
    """Prepare and run an experiment; see the module's docstring. ``rank_args``: the
    ``gradlab`` arguments the ranks of a data-parallel run are started with (default: this
    run's, with --json)."""
    hooks = hooks or Hooks()
    overrides = list(overrides)
    rank = world = estimate = ranks = None
    try:  # from the first import on: a stop signal during any of it ends in one line
        from gradlab.lab import parallel

        if "RANK" in os.environ:  # torchrun (or a run's own launch) may have started us
            from gradlab.lab import distributed

            rank = distributed.Rank.from_env()
            if rank is not None:
                hooks.ranked(rank, None)
        loaded, trials = resolve(experiment, overrides, yes, rank)
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
            estimate = spread(trials, jobs, idle)
        elif rank is not None and ranks is not None:
            world = distributed.join(rank, ranks)
            hooks.ranked(rank, world)
    except KeyboardInterrupt as stop:  # Ctrl-C, or a caller's stop signal raised as one
        raise stopped(signal_of(stop, hooks), None, hooks) from None
    except GradlabError:
        if hooks.stop_signal() is not None:  # a factory may have turned the stop into one
            raise stopped(hooks.stop_signal(), None, hooks) from None
        raise
    except SystemExit as e:  # the user's code, checked before the run, called sys.exit()
        raise RunEnded(exited(e), 2, Status.BAD_INPUT) from None
    except Exception as e:
        if hooks.stop_signal() is not None:
            raise stopped(hooks.stop_signal(), None, hooks) from None
        if (memory := out_of_memory(e)) is not None:
            raise RunEnded(memory_advice(memory, None), 1, Status.FAILED) from None
        raise RunEnded(f"preparing the run failed: {type(e).__name__}: {e} (at {place(e)})",
                       1, Status.FAILED) from None
    if ranks is not None and rank is None:  # data-parallel arms: start the ranks, as torchrun
        # rank 0's standard output, kept and handed back: a library call reads its --json
        # document for the run directory, the command line passes it on to its own stdout
        args = rank_args or ["run", experiment, *(f"--set={a}" for a in overrides),
                             f"--out={out}", "--json", "--yes"]
        try:
            with tempfile.TemporaryFile("w+", encoding="utf-8") as document:
                ended = distributed.launch(ranks.size, args, stdout=document)
                document.seek(0)
                said = document.read()
                ended = dataclasses.replace(ended, stdout=said)
        except KeyboardInterrupt as stop:  # before the ranks started (later, they say it)
            raise stopped(getattr(stop, "signum", signal.SIGINT), None, hooks) from None
        except Exception as e:  # no store, no process: nothing started
            raise RunEnded(f"starting {ranks.size} ranks failed: {type(e).__name__}: {e}", 1,
                           Status.FAILED) from None
        run_dir = None
        with contextlib.suppress(ValueError, AttributeError):
            run_dir = json.loads(said).get("run_dir")
        return Executed(loaded.name, Path(run_dir) if run_dir else None, trials, [],
                        launched=ended)
    return execute(loaded, trials, estimate, world, overrides, Path(out), hooks)


def execute(loaded: spec.Spec, trials: list[spec.Trial], estimate: Plan | None,
            world: World | None, overrides: list[str], out: Path, hooks: Hooks) -> Executed:
    """Run the prepared trials and write the run directory. On each rank of a data-parallel
    run (``world``) alike, the trials one after another in the rank's own process; only
    rank 0 writes."""
    from gradlab.lab import plan, preflight, trial
    from gradlab.record import store

    writes = world is None or world.rank == 0
    run_dir = None
    try:
        if estimate is None:  # a rank: its trials in its own process
            estimate = plan.spread(trials, 1, preflight.preflight(trials))
        ranks = world.gather({"rank": world.rank, "pid": os.getpid(),
                              "host": socket.gethostname()}) if world else None
        if hooks.stop_signal() is not None:  # one held until an import was done (cli.signals)
            raise KeyboardInterrupt
        if writes:
            run_dir = store.RunDir(out, run_meta(loaded, trials, overrides, estimate, ranks))
        if world is not None:  # the ranks agree on the run directory: rank 0's
            world.run_dir = Path(world.share(str(run_dir.path) if run_dir else None))
        for note in [*loaded.notes, *(world.notes if world else []), *estimate.notes]:
            hooks.say(note)
        hooks.plan(plan_line(loaded.name, trials, estimate, world))
        steps = sum(a.settings.steps for t in trials for a in t.arms)
        with hooks.progress(loaded.name, len(trials), steps, estimate.seconds) as advance:
            results = trial.run_trials(trials, run_dir, advance, estimate.workers)
        if hooks.stop_signal() is not None:  # received during the run, held until now
            raise KeyboardInterrupt
        if run_dir is not None:
            run_dir.finish(Status.COMPLETE)
    except KeyboardInterrupt as stop:  # Ctrl-C, or a caller's stop signal raised as one
        raise stopped(signal_of(stop, hooks), run_dir, hooks, world) from None
    except GradlabError as e:  # bad input; during a stop, a factory may have turned it into one
        if hooks.stop_signal() is not None:
            raise stopped(hooks.stop_signal(), run_dir, hooks, world) from None
        if world is not None:
            raise rank_failed(world, e, str(e), 2, run_dir, hooks) from None
        if run_dir is not None:
            mark(run_dir, Status.FAILED, str(e))
        raise RunEnded(str(e), 2, Status.BAD_INPUT, run_dir) from None
    except SystemExit as e:  # the user's code (a loss, a setup's method) called sys.exit()
        said = exited(e)
        if world is not None:
            raise rank_failed(world, GradlabError(said), said, 2, run_dir, hooks) from None
        if run_dir is not None:
            mark(run_dir, Status.FAILED, said)
        raise RunEnded(said, 2, Status.BAD_INPUT, run_dir) from None
    except Exception as e:  # a bug or a numerical failure: keep the evidence, say where
        if hooks.stop_signal() is not None:
            raise stopped(hooks.stop_signal(), run_dir, hooks, world) from None
        if world is not None:
            raise rank_failed(world, e, traceback.format_exc(), 1, run_dir, hooks) from None
        if (memory := out_of_memory(e)) is not None:
            said = memory_advice(memory, estimate)
            if run_dir is not None:
                mark(run_dir, Status.FAILED, f"{said}\n{traceback.format_exc()}")
            raise RunEnded(said, 1, Status.FAILED, run_dir) from None
        if run_dir is None:
            raise RunEnded(f"preparing the run failed: {type(e).__name__}: {e} (at "
                           f"{place(e)})", 1, Status.FAILED) from None
        mark(run_dir, Status.FAILED, traceback.format_exc())
        raise RunEnded(f"run failed: {type(e).__name__}: {e} (traceback in "
                       f"{run_dir.path / 'run.json'})", 1, Status.FAILED, run_dir) from None
    if world is not None:
        world.leave()
    return Executed(loaded.name, run_dir.path if run_dir else None, trials, results)


def memory_advice(memory: str, estimate: Plan | None) -> str:
    """The one line of a run that ran out of memory: what it was estimated to need, and what
    to lower."""
    from gradlab.lab.plan import memory_text

    need = ""
    if estimate is not None and estimate.memory_bytes:
        workers = estimate.workers.processes if estimate.workers else 1
        need = (f"; preflight estimated {memory_text(estimate.memory_bytes)} a trial"
                f"{f', {workers} trials at once' if workers > 1 else ''}")
    return (f"the run stopped: {memory}{need}. Lower batch_size (the big-batch arm holds a "
            f"whole window at once), use a smaller model, or run fewer trials at once "
            f"(--jobs 1)")


def run_meta(loaded: spec.Spec, trials: list[spec.Trial], overrides: list[str],
             estimate: Plan, ranks: list[dict[str, Any]] | None) -> RunMeta:
    """What run.json records of a spec's run before it starts."""
    from gradlab.lab import device

    devices = dict.fromkeys(device.resolve_device(a.settings.device)
                            for t in trials for a in t.arms)
    workers = estimate.workers
    return RunMeta(
        experiment=loaded.name, description=loaded.description,
        spec_source=loaded.source, spec_text=loaded.text, overrides=overrides,
        notes=[*loaded.notes, *estimate.notes],
        trials=[{"trial": t.index, "swept": t.swept,
                 "arms": {a.name: {"baseline": a.baseline, "expect": a.expect, "help": a.help,
                                   "settings": dataclasses.asdict(a.settings)}
                          for a in t.arms}} for t in trials],
        device=str(device.resolve_device(trials[0].baseline.settings.device)),
        environment=[device.environment(d) for d in devices],
        jobs=workers.jobs, workers=workers.processes, threads=workers.threads, ranks=ranks)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def plan_line(name: str, trials: list[spec.Trial], estimate: Plan,
              world: World | None = None) -> str:
    """What is about to run, and what it will cost, on one line."""
    arms = list(dict.fromkeys(a.name for t in trials for a in t.arms))
    trainings = sum(len(t.arms) for t in trials)
    steps = sum(a.settings.steps for t in trials for a in t.arms)
    ranks = f" on each of {world.size} ranks" if world is not None else ""
    return (f"{name}: {count(len(trials), 'trial')} x {count(len(arms), 'arm')} "
            f"({', '.join(arms)}) = {count(trainings, 'training')}, {steps} optimizer steps "
            f"in all{ranks}; {estimate.estimate()}")


def exited(e: SystemExit) -> str:
    """The one line for user code that called sys.exit() inside gradlab: bad input."""
    return (f"your code {entrypoints.failure(e).removeprefix('it ')} during the run; gradlab "
            f"runs it in its own process: raise an exception instead")


def place(e: BaseException) -> str:
    """'FILE, line N' where an exception was raised."""
    found = where(e)
    return f"{found[0]}, line {found[1]}" if found else "unknown place"


def signal_of(stop: KeyboardInterrupt, hooks: Hooks) -> int:
    return getattr(stop, "signum", None) or hooks.stop_signal() or signal.SIGINT


def mark(run_dir: RunDir, status: Status, error: str, rank: int | None = None) -> None:
    """Write how the run ended, if the disk still lets us: the error line matters more."""
    with contextlib.suppress(OSError):  # else run.json stays 'running', and compare says why
        run_dir.finish(status, error, rank)


def rank_failed(world: World, error: BaseException, details: str, code: int,
                run_dir: RunDir | None, hooks: Hooks) -> RunEnded:
    """A rank of a data-parallel run failed: this one, or another whose failure made this
    one's collective fail (or brought a stop). Each rank records its own failure; rank 0
    marks the run failed with the first one recorded: which rank, and why."""
    if hooks.stop_signal() is not None:  # stopped: the other end of the collective stopped too
        return stopped(hooks.stop_signal(), run_dir, hooks, world)
    hooks.finishing()  # the launcher's SIGTERM must not cut the record short
    world.record_failure(f"{type(error).__name__}: {error}" if code == 1 else str(error),
                         details, code)
    return run_failed(world.first_failure() or {"rank": world.rank, "error": str(error),
                                                "details": details, "code": code},
                      run_dir, hooks)


def run_failed(failure: dict, run_dir: RunDir | None, hooks: Hooks) -> RunEnded:
    """The run failed on the rank ``failure`` names (a record of distributed.World)."""
    hooks.finishing()
    at = ""
    if run_dir is not None:
        mark(run_dir, Status.FAILED, f"rank {failure['rank']}: {failure['details']}",
             failure["rank"])
        at = f" (details in {run_dir.path / 'run.json'})"
    return RunEnded(f"run failed on rank {failure['rank']}: {failure['error']}{at}",
                    failure["code"], Status.FAILED, run_dir)


def stopped(signum: int, run_dir: RunDir | None, hooks: Hooks,
            world: World | None = None) -> RunEnded:
    """SIGINT or SIGTERM: mark the run interrupted (finished trials stay) and say so; unless
    another rank failed first, and torchrun or the launcher stops this one for it."""
    hooks.finishing()  # a second Ctrl-C must not cut the writing of run.json short
    failure = world.first_failure() if world is not None else None
    if failure is not None:
        return run_failed(failure, run_dir, hooks)
    word = STOPPED.get(signum, f"stopped by signal {signum}")
    if run_dir is None:
        message = f"{word} before the run started; nothing was written"
    elif run_dir.meta["status"] == Status.COMPLETE:
        message = f"{word} after the run completed; its results are in {run_dir.path}"
    else:
        total = len(run_dir.meta["trials"])
        done = len(run_dir.finished_trials)
        mark(run_dir, Status.INTERRUPTED, f"{signal.Signals(signum).name}: {done} of {total} "
                                          f"trials finished before it arrived")
        message = (f"{word}; {done} of {total} trials finished and are kept in "
                   f"{run_dir.path} (run.json says interrupted)")
    return RunEnded(message, 128 + signum, Status.INTERRUPTED, run_dir)
