"""gradlab as a library: run an experiment, audit a training loop, read a run.

    import gradlab

    result = gradlab.run("toy")                       # a built-in spec, a name or a .toml
    result.run_dir, result.status, result.held        # held: every expectation of the spec
    result = gradlab.run("equivalence", {"accum_steps": [2, 4], "dtype": "float64"})

    audited = gradlab.audit("experiments.tutorial_loop:train", accum_steps=4)
    audited.verdict, audited.diagnosis, audited.run_dir

    run = gradlab.load_run(result.run_dir)            # run.meta, run.table("summary")

The command line is a thin adapter over these: `gradlab run` calls run() and renders
what it returns. Bad input raises GradlabError (its message names what is wrong and how
to fix it); a run that does not complete raises RunEnded, its run directory marked.
Torch, pandas and matplotlib are imported by the calls that need them, not here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradlab.record.meta import STOPPED, Status

if TYPE_CHECKING:
    from gradlab.auditing.result import AuditResult
    from gradlab.config.spec import Trial
    from gradlab.lab.distributed import Ended
    from gradlab.lab.experiment import Hooks
    from gradlab.readers.compare import Comparison
    from gradlab.record.store import Run


@dataclass
class RunResult:
    """What a completed run left and how it was judged (as `gradlab compare` judges it)."""
    run_dir: Path | None  # None on a data-parallel rank other than 0
    status: Status
    experiment: str = ""
    trials: list[Trial] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)  # summary.csv's rows
    checks: list[dict[str, Any]] = field(default_factory=list)  # checks.csv's rows
    failures: list[str] = field(default_factory=list)  # expectations of the spec that failed
    comparison: Comparison | None = None  # the judged table compare prints
    results: list[dict[str, list[dict]]] = field(default_factory=list)  # rows per trial
    launched: Ended | None = None  # the ranks this call started (given rank_args), and how
    #                                they ended: rank 0 wrote, judged and reported the run

    @property
    def held(self) -> bool:
        """The run completed and every arm did what its spec expects."""
        return self.status == Status.COMPLETE and not self.failures


def assignments(overrides: Mapping[str, Any] | Iterable[str]) -> list[str]:
    """--set assignments from ``{"key": value or [values]}`` or from "key=value" strings."""
    if isinstance(overrides, Mapping):
        return [f"{key}={','.join(map(str, value)) if isinstance(value, list | tuple) else value}"
                for key, value in overrides.items()]
    return [str(item) for item in overrides]


def run(experiment: str = "equivalence",
        overrides: Mapping[str, Any] | Iterable[str] = (), *,
        out: str | Path = "results", jobs: int | None = None,
        progress: Callable[[int, int], None] | None = None, yes: bool = True,
        hooks: Hooks | None = None, rank_args: list[str] | None = None) -> RunResult:
    """Run an experiment (a built-in name, ./experiments/NAME.toml, or a path to a spec) and
    judge it. ``overrides`` sets or sweeps settings as `--set` does (a list of values
    sweeps). ``jobs``: trials at once in worker processes (default: the idle cores).
    ``progress(done, total)``: called as optimizer steps finish (e.g. to drive a notebook's
    bar). ``hooks``: messages, progress and stop signals in full (gradlab.lab.experiment.Hooks;
    what `gradlab run` uses); ``rank_args``: the command line a data-parallel run's ranks
    start with."""
    from gradlab.lab.experiment import Hooks, RunEnded, run_experiment, signal_of

    if progress is not None:
        hooks = dataclasses.replace(hooks or Hooks(), progress=_counting(progress))

    executed = run_experiment(experiment, assignments(overrides), out=Path(out), jobs=jobs,
                              yes=yes, hooks=hooks, rank_args=rank_args)
    name, launched = executed.experiment, executed.launched
    if launched is not None and rank_args is not None:  # the caller renders rank 0's run
        return RunResult(None, Status.COMPLETE, name, executed.trials, launched=launched)
    if launched is not None and launched.code != 0:
        raise RunEnded(launched.message or f"the ranks ended with exit code {launched.code}",
                       launched.code, Status.FAILED)
    if executed.run_dir is None:  # a rank other than 0
        return RunResult(None, Status.COMPLETE, name, executed.trials, results=executed.results)
    try:
        # only now: pandas takes a while to import, and a stop before this point is the run's
        # to report ("before the run started", or the trials kept)
        from gradlab.readers import compare
        from gradlab.record import store

        written = store.load_run(executed.run_dir)
        comparison = compare.compare([written])
    except KeyboardInterrupt as stop:  # a stop now leaves the run complete, and says so
        signum = signal_of(stop, hooks or Hooks())
        raise RunEnded(f"{STOPPED[signum]} after the run completed; its results are in "
                       f"{executed.run_dir}", 128 + signum, Status.COMPLETE,
                       executed.run_dir) from None
    if launched is None:
        summary = [row for r in executed.results for row in r["summary"]]
        checks = [row for r in executed.results for row in r["checks"]]
    else:  # the ranks ran it: read what rank 0 wrote
        summary, checks = records(written, "summary"), records(written, "checks")
    return RunResult(executed.run_dir, Status(written.meta["status"]), written.experiment,
                     executed.trials, summary, checks, comparison.failures, comparison,
                     executed.results)


def _counting(progress: Callable[[int, int], None]):
    """Hooks.progress for a plain ``progress(done, total)`` callback."""

    @contextlib.contextmanager
    def steps(name: str, trials: int, total: int, seconds: float):
        done = 0
        progress(done, total)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            progress(done, total)

        yield advance

    return steps


def records(run: Run, table: str) -> list[dict[str, Any]]:
    frame = run.table(table)
    return [] if frame is None else frame.to_dict("records")


def audit(entrypoint: str | Callable, accum_steps: int, *, micro_batch_size: int = 8,
          steps: int = 5, out: str | Path = "results", **options: Any) -> AuditResult:
    """Audit a training loop: ``train(micro_batch_size, accum_steps, max_steps)`` (given as
    'pkg.module:train' or as the function) against its big-batch twin, step by step. The
    result has the verdict, the first difference and its measured diagnosis, and the run
    directory. ``options``: copy_limit, parallel, nproc_per_node, timeout (see
    gradlab.auditing.parent.audit)."""
    from gradlab import auditing

    return auditing.audit(entrypoint, accum_steps, micro_batch_size=micro_batch_size,
                          steps=steps, out=Path(out), **options)


def load_run(path: str | Path) -> Run:
    """A finished run directory, read back (run.json as ``.meta``, a CSV by ``.table(name)``);
    GradlabError if it is missing, incomplete or still running."""
    from gradlab.record import store

    return store.load_run(Path(path))
