"""The verdict words: what gradlab says of an arm's gradient against its baseline's.

A StrEnum, like the policies: each member is its own word, so it compares equal to the
text in summary.csv and run.json and writes there as that text.
"""

from __future__ import annotations

from enum import StrEnum


class Verdict(StrEnum):
    BASELINE = "baseline"  # the arm every other is measured against
    NOT_PROBED = "not probed"  # no finite gradient error was measured: nothing to judge
    EQUIVALENT = "equivalent"  # within the tolerance of its precision and N
    DIFFERS = "differs"  # beyond it (or the step applied another learning rate)
