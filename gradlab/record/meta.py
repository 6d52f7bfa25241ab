"""run.json: how a run stands (Status) and what it was (RunMeta)."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """A run directory's status in run.json, and the outcome a --json document reports."""
    RUNNING = "running"  # being written (or its process died: compare checks the pid)
    COMPLETE = "complete"  # every trial written, judged
    FAILED = "failed"  # an error ended it; run.json holds why
    INTERRUPTED = "interrupted"  # a stop signal ended it; the trials finished are kept
    BAD_INPUT = "bad-input"  # only in a --json error document: the input was refused, and no
    #                          run directory was made
