"""run.json: how a run stands (Status) and what it was (RunMeta)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """A run directory's status in run.json, and the outcome a --json document reports."""
    RUNNING = "running"  # being written (or its process died: compare checks the pid)
    COMPLETE = "complete"  # every trial written, judged
    FAILED = "failed"  # an error ended it; run.json holds why
    INTERRUPTED = "interrupted"  # a stop signal ended it; the trials finished are kept
    BAD_INPUT = "bad-input"  # only in a --json error document: the input was refused, and no
    #                          run directory was made


# what run.json's status can say (bad-input never gets a run directory)
RUN_STATUSES = frozenset(Status) - {Status.BAD_INPUT}

# how a stop signal is named in the line that reports it (SIGINT, SIGTERM)
STOPPED = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "stopped by SIGTERM"}


@dataclass
class RunMeta:
    """What run.json says a run was, for `gradlab run` and `gradlab audit` alike. The store adds
    how it went (status, start and end time, versions, command, pid, host)."""
    experiment: str  # the spec's name, or "audit"
    description: str
    trials: list[dict[str, Any]]  # each trial's index, swept settings and arms
    device: str
    # what the user was told before it ran; None for an audit, whose run.json has no notes
    notes: list[str] | None = field(default_factory=list)
    # a spec's run
    spec_source: str | None = None
    spec_text: str | None = None
    overrides: list[str] | None = None  # the --set assignments, as given
    environment: list[dict[str, Any]] | None = None  # per device: versions, threads, determinism
    jobs: int | None = None  # what --jobs asked for (or its default)
    workers: int | None = None  # worker processes the trials ran in
    threads: int | None = None  # torch intra-op threads per trial
    ranks: list[dict[str, Any]] | None = None  # a data-parallel run's ranks: rank, pid, host
    # an audit
    entrypoint: str | None = None
    gradients_at: str | None = None  # whose weights the gradients were compared at
    audit: dict[str, Any] | None = None  # its verdict, diagnosis and times

    def as_dict(self) -> dict[str, Any]:
        """run.json's keys, in its order; the keys of the other kind of run left out."""
        order = ("spec_source", "spec_text", "overrides", "notes", "description", "trials",
                 "device", "environment", "jobs", "workers", "threads", "ranks", "entrypoint",
                 "gradients_at", "audit")
        return {"experiment": self.experiment,
                **{key: getattr(self, key) for key in order if getattr(self, key) is not None}}
