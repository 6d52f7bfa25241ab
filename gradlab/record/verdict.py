"""The verdict: what gradlab says of an arm's gradient against its baseline's, and the one
rule that says it, for run, compare and audit alike.

The words are a StrEnum, like the policies: each member is its own word, so it compares
equal to the text in summary.csv and run.json and writes there as that text. The rule
lives here, beside them, so that the tolerance, its terms and the text explaining it
under a table cannot drift apart. Torch-free and pandas-free, like the schema.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any


class Verdict(StrEnum):
    BASELINE = "baseline"  # the arm every other is measured against
    NOT_PROBED = "not probed"  # no finite gradient error was measured: nothing to judge
    EQUIVALENT = "equivalent"  # within the tolerance of its precision and N
    DIFFERS = "differs"  # beyond it (or the step applied another learning rate)


def missing(value: Any) -> bool:
    """A value a row does not hold: None, or NaN (an empty CSV cell as pandas reads it)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


# ----------------------------------------------------------------------------- the rule
#
# At every probe the run also takes the *exact* gradient: the big batch's, in
# float64, at the same weights on the same window. An arm is judged by its distance
# from that exact gradient, against the distance of one big batch computed in the
# arm's own precision:
#
#     equivalent  when  max_exact_err <= exact_floor + (N - 1) * u + REORDER * u_acc
#
# exact_floor is what one big batch rounds in the arm's precision, on this model,
# measured at the same weights (the baseline's own distance when the arm computes as
# the baseline does). An exact arm does the same per-example arithmetic, so it
# rounds the same way: only two things may add to its distance. Its N partial
# gradients are each rounded to, and summed in, the precision the micro-batch
# computes in: that adds up to (N - 1) * u. And splitting the batch changes the order
# of the kernels' reductions over examples, which accumulate in float32 (float64 for
# float64 arms): REORDER * u_acc covers that. A float64 baseline computes exactly what
# the reference computes, so its floor is 0 and the last term is all that is left.
#
# u is the unit roundoff of the arm's *precision* (compute_dtype): autocast's dtype
# when autocast is on, else the parameters' dtype. Under autocast the parameters and
# .grad stay float32, but each partial gradient is computed, and rounded, in bfloat16
# or float16 before it reaches .grad. A float32 accumulation buffer does not change u
# either: it removes the rounding of the sum, not that of the partial gradients, so
# the verdict holds a buffered arm and its native twin to the same line, and the
# measured error tells them apart.
#
# A step applies the gradient times the learning rate, so an arm whose step applies
# another learning rate than the baseline's at a probed step differs, however close
# its gradient (max_rel_lr_diff > 0: an LR scheduler stepped per micro-batch). Both
# rates are computed by the same Python code, so an equivalent arm's are equal.

UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}
# the precision the kernels reduce in (matmul and convolution accumulate in float32 for
# float32, bfloat16 and float16 operands)
ACCUMULATOR = {"float64": "float64", "float32": "float32", "float16": "float32",
               "bfloat16": "float32"}
# in units of u_acc: what reordering the kernels' sums may add, with headroom over the most
# the built-in experiments' exact arms measure (README, the verdict's margins), so that an
# exact arm is never called different for the order its kernels summed in
REORDER = 32


def compute_dtype(dtype: str, autocast: str | None = None) -> str:
    """The precision a micro-batch's gradient is computed in, whose u the verdict uses:
    autocast's dtype when it is on, else the parameters' dtype."""
    return dtype if missing(autocast) or autocast in ("", "none") else str(autocast)


def precision_of(row: Mapping) -> str:
    """A summary row's precision (runs made before it was recorded: their dtype)."""
    value = row.get("precision")
    return str(row["dtype"]) if missing(value) or value == "" else str(value)


def accumulation_bound(precision: str, accum_steps: int, condition: float) -> float:
    """What summing N partial gradients can add to the relative error, to first order:
    (N - 1) * u * ‖Σ|g_i|‖ / ‖Σ g_i‖ (recursive summation), u the precision's. Reported beside
    accum_rise, the measured share; the verdict's (N - 1) * u leaves out the condition."""
    if missing(condition):
        return math.nan
    return (accum_steps - 1) * UNIT_ROUNDOFF[precision] * condition


def rel_tolerance(dtype: str, accum_steps: int, floor: float) -> float:
    """Largest relative distance from the exact gradient still called equivalent."""
    return floor + (accum_steps - 1) * UNIT_ROUNDOFF[dtype] \
        + REORDER * UNIT_ROUNDOFF[ACCUMULATOR[dtype]]


def sum_tolerance(dtype: str, terms: int) -> float:
    """A float64 sum of ``terms`` gradients against the same sum kept in ``dtype``: each
    addition rounds by at most u, with the headroom the built-in models need (16)."""
    return 16.0 * max(terms, 2) * UNIT_ROUNDOFF[dtype]


def verdict_of(baseline: bool, rel_err: float | None, rel_tol: float,
               abs_err: float = math.nan, abs_tol: float | None = None,
               lr_diff: float = math.nan) -> Verdict:
    """baseline | not probed | equivalent | differs: the one rule, for run and compare alike.

    Equivalent when the relative error is within rel_tol, or (only when an
    absolute tolerance is given) the largest absolute error is within abs_tol, and
    the step applies the baseline's learning rate (lr_diff 0, or not recorded).
    """
    if baseline:
        return Verdict.BASELINE
    if missing(rel_err):
        return Verdict.NOT_PROBED
    if not missing(lr_diff) and lr_diff > 0:
        return Verdict.DIFFERS
    if rel_err <= rel_tol or (abs_tol is not None and abs_err <= abs_tol):
        return Verdict.EQUIVALENT
    return Verdict.DIFFERS


def judge(baseline: bool, dtype: str, accum_steps: int, metrics: Mapping,
          rtol: float | None = None, atol: float | None = None) -> tuple[float, Verdict]:
    """(tolerance, verdict) of an arm from its summary metrics: the one rule.

    ``rtol`` replaces the measured tolerance; ``atol`` also accepts an arm whose
    largest absolute error against the baseline is within it. A run with no exact
    reference (gradlab audit, which runs the user's own loop; or a run made by gradlab
    0.1) is judged on its distance from the baseline, with a floor of 0. A data-parallel
    arm (``metrics`` holds its world_size W) adds up N partial gradients on each of W
    ranks, so it is judged as W·N micro-batches.
    """
    ranks = metrics.get("world_size")
    accum_steps = int(accum_steps) * (1 if missing(ranks) else int(ranks))
    err = metrics.get("max_exact_err")
    if missing(err):
        err = metrics.get("max_rel_grad_err")
    floor = metrics.get("exact_floor")
    tol = rel_tolerance(dtype, accum_steps, 0.0 if missing(floor) else floor)
    tol = tol if rtol is None else rtol
    return (math.nan if baseline else tol), verdict_of(
        baseline, err, tol, metrics.get("max_abs_grad_err", math.nan), atol,
        metrics.get("max_rel_lr_diff", math.nan))


def explain(rows: Iterable[Mapping], rtol: float | None = None,
            atol: float | None = None) -> str:
    """The rule under a table, with the floors and tolerances its rows were judged by."""
    rows = list(rows)
    fmt = "{:.2g}".format
    if rtol is not None:
        rule = f"vs exact <= {fmt(rtol)} (--rtol, in place of the measured tolerance)"
    else:
        rule = f"vs exact <= tolerance = floor + (N−1)·u + {REORDER}·u_acc"
    if atol is not None:
        rule += f", or abs grad err <= {fmt(atol)} (--atol)"
    by_dtype: dict[str, list[Mapping]] = {}
    for row in rows:
        if not row.get("baseline"):
            by_dtype.setdefault(precision_of(row), []).append(row)
    def span(values: list[float]) -> str:
        low, high = fmt(min(values)), fmt(max(values))
        return low if low == high else f"{low}…{high}"

    here = []
    for dtype, part in by_dtype.items():
        floors = [r["exact_floor"] for r in part if not missing(r.get("exact_floor"))]
        tols = [r["rel_tolerance"] for r in part if not missing(r.get("rel_tolerance"))]
        u = f"u = 2^{round(math.log2(UNIT_ROUNDOFF[dtype]))}"
        text = f"{dtype} ({u}"
        text += f", floor {span(floors)}" if floors else ""
        text += f", tolerance {span(tols)})" if tols else ")"
        here.append(text)
    lr = " and the arm's step applies the baseline's learning rate (lr diff: their largest " \
         "relative difference at a probe; any makes the arm differ)" \
        if any(not missing(r.get("max_rel_lr_diff")) and r["max_rel_lr_diff"] > 0
               for r in rows) else ""
    return (f"verdict: equivalent when {rule}{lr}. vs exact: the arm's largest relative "
            f"distance, over the probes, from the exact gradient (the baseline's, in float64, "
            f"at the same weights on the same window); floor: one big batch's own distance "
            f"from it in the arm's precision, what one big batch rounds there; u: the unit "
            f"roundoff of that precision (autocast's dtype, else the parameters'), u_acc: that "
            f"of the kernels' sums (float32, or float64 for float64). Here: "
            f"{'; '.join(here) or '-'}.")
