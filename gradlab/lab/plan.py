"""What a run will cost and how it spreads its trials: preflight's Plan, the worker processes
and threads of --jobs, and the default number of jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gradlab.config.settings import Settings
from gradlab.config.spec import Trial
from gradlab.lab.device import resolve_device


@dataclass(frozen=True)
class Workers:
    """How a run spreads its trials: worker processes, and the threads each trial gets."""
    jobs: int  # what --jobs asked for
    processes: int  # worker processes; 1: the trials run one by one in this process
    threads: int  # torch intra-op threads per trial on CPU, unless its `threads` setting says
    # the trials' positions in the order workers take them: the longest first (preflight's
    # estimate), so that no worker starts a long one while the other has nothing left
    order: list[int] | None = None  # None: as listed

    def threads_of(self, trial: Trial) -> int:
        return trial.baseline.settings.threads or self.threads


@dataclass
class Plan:
    """What a run will cost, estimated in preflight from one timed step of each setup."""
    trials: int
    arms: int  # in all trials together
    seconds: float  # one trial after another
    memory_bytes: int  # the largest trial's
    available_bytes: int | None  # what the machine has free (None: unknown)
    notes: list[str] = dataclasses.field(default_factory=list)  # what the user should know
    trial_seconds: list[float] = dataclasses.field(default_factory=list)  # each trial's
    workers: Workers | None = None  # how the trials will run (see spread)

    def estimate(self) -> str:
        processes = self.workers.processes if self.workers else 1
        memory = memory_text(self.memory_bytes * processes)
        where = f" in {processes} worker processes" if processes > 1 else ""
        return (f"about {format_seconds(self.seconds / processes)}{where} and {memory} "
                f"(estimated from one timed step of each model)")


def memory_text(held: float) -> str:
    if held >= 2**30:
        return f"{held / 2**30:.1f} GiB"
    if held >= 2**20:
        return f"{held / 2**20:.0f} MiB"
    return "under 1 MiB"


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# a run estimated shorter than this runs in the gradlab process: starting worker processes
# (a fork server importing torch: benchmarks/RESULTS.md, "Start-up costs") would cost more
# than they save
WORTH_WORKERS_SECONDS = 10.0


def default_jobs(trials: list[Trial], plan: Plan | None, idle: int) -> int:
    """One job per usable core that other work leaves ``idle`` (parallel.idle_cores()); on CUDA, one
    per GPU visible; one for a run that preflight's ``plan`` found short (None: before
    preflight, what the jobs will be unless the run is short). On 2 cores with 2 busy loops
    beside it, 2 workers made the default run slower than 1: benchmarks/RESULTS.md."""
    if plan is not None and plan.seconds < WORTH_WORKERS_SECONDS:
        return 1
    if any(resolve_device(a.settings.device).type == "cuda" for t in trials for a in t.arms):
        return max(1, torch.cuda.device_count())
    return idle


# what a worker process holds before its first trial (Python, torch, gradlab imported)
PROCESS_BYTES = 400 * 2**20


def spread(trials: list[Trial], jobs: int, plan: Plan) -> Plan:
    """The plan, with how K jobs run its trials (workers_for)."""
    return dataclasses.replace(plan, workers=workers_for(trials, jobs, plan))


def workers_for(trials: list[Trial], jobs: int, plan: Plan | None = None) -> Workers:
    """How K jobs run the trials: at most K worker processes, no more than there are trials
    or than fit in memory (known once preflight's ``plan`` is); each trial gets one intra-op
    thread, or the cores left over when there are fewer trials than jobs (one trial alone
    gets them all)."""
    processes = max(1, min(jobs, len(trials)))
    if plan is not None and plan.available_bytes is not None and processes > 1:
        fit = int(0.8 * plan.available_bytes // (plan.memory_bytes + PROCESS_BYTES))
        processes = max(1, min(processes, fit))
    order = sorted(range(len(trials)), key=lambda i: -plan.trial_seconds[i]) \
        if plan is not None and len(plan.trial_seconds) == len(trials) else None
    return Workers(jobs, processes, max(1, jobs // processes), order)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def probe_due(s: Settings, step: int) -> bool:
    """Is step ``step`` (from 1) one the probe measures? The first, then every probe_every."""
    return step == 1 or (s.probe_every > 0 and (step - 1) % s.probe_every == 0)
