"""The run directory's tables: their columns, their labels for people, and the one
summary computed from them (with its verdict), shared by ``gradlab run`` and
``gradlab compare``.

Torch-free and pandas-free, so the CLI can import it without paying for either.
The writers (runner.py) and the readers (store.py, compare.py, plots.py) name
columns through this module; ``store.RunDir.append`` refuses a column that is
not declared here, so the two sides cannot drift apart.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from gradlab.record.verdict import Verdict

# the CSV files of a run directory, in the order a trial's rows are written
TABLES = ("summary", "steps", "probe", "buffers", "eval", "trace", "weights", "checks", "cost")

# what a step costs, in summary.csv of arms with cost = true (absent otherwise)
COST_METRICS = ("step_ms", "example_us", "activation_mb", "memory_mb", "rss_mb")

# every table starts with these, so a file that does not is not ours
KEYS = ("trial", "arm")

# the columns of each table after KEYS (summary also holds the swept settings, see below)
COLUMNS: dict[str, tuple[str, ...]] = {
    "summary": ("baseline", "batch_size", "accum_steps", "micro_batch", "world_size", "dtype",
                "precision", "max_rel_grad_err", "max_abs_grad_err", "min_grad_cosine",
                "max_exact_err", "exact_floor", "accum_rise", "max_sum_condition", "accum_bound",
                "final_loss", "max_rel_loss_diff", "final_weight_dist", "final_test_loss",
                "final_test_accuracy", "max_rel_buffer_diff", "diverged_at_step",
                "skipped_steps", "cuda_peak_bytes", "max_rel_lr_diff", "allreduces_per_step",
                "step_seconds", "max_saved_bytes", "negatives", "rel_tolerance", "expect",
                "verdict", *COST_METRICS,
                # gradlab audit's, of the user's own loop
                "first_difference", "estimate", "diagnosis"),
    # saved_bytes: the most bytes of activations autograd held for backward at once during
    # the step (gradlab.train.memory), for a loss that couples the batch, on the steps the probe
    # runs (empty on the others); negatives: for such a loss, the other examples each
    # example was scored against (B/N - 1 inside micro-batches, B - 1 over the window),
    # empty for a loss computed per example
    "steps": ("step", "examples", "epoch", "window_size", "units", "lr", "loss", "grad_norm",
              "update_norm", "allreduces", "step_seconds", "saved_bytes", "negatives",
              "weight_dist", "rel_loss_diff", "skipped", "grad_scale"),
    "probe": ("step", "param", "max_abs_err", "rel_l2_err", "cosine", "ref_norm", "arm_norm",
              "exact_err", "floor_err", "sum_condition", "lr", "ref_lr"),
    "buffers": ("step", "buffer", "max_abs_err", "rel_l2_err", "cosine", "ref_norm", "arm_norm",
                "test_accuracy", "ref_test_accuracy"),
    "eval": ("step", "examples", "test_loss", "test_accuracy"),
    "trace": ("step", "micro_batch", "param", "element", "grad"),
    "weights": ("step", "param", "element", "value"),
    "checks": ("check", "value", "tolerance", "passed"),
    # cost = true: what each step cost (memory: measured on the first step only)
    "cost": ("step", "seconds", "activation_bytes", "memory_bytes", "rss_bytes"),
    # gradlab audit: one row per optimizer step of the user's loop, both runs side by side
    "audit": ("step", "rel_grad_err", "max_abs_grad_err", "cosine", "grad_norm_big_batch",
              "grad_norm_accumulated", "lr_big_batch", "lr_accumulated", "rel_lr_diff",
              "loss_big_batch", "loss_accumulated", "tolerance", "verdict", "estimate",
              "settings_differ"),
}

# what compare and plots cannot do without; a file lacking one of these is damaged
REQUIRED: dict[str, tuple[str, ...]] = {
    "summary": ("baseline", "accum_steps", "micro_batch", "max_rel_grad_err",
                "max_abs_grad_err", "final_loss", "expect", "verdict"),
    "steps": ("step", "examples", "loss", "grad_norm"),
    "probe": ("step", "param", "max_abs_err", "rel_l2_err", "cosine"),
    "eval": ("step", "examples", "test_loss", "test_accuracy"),
    "checks": ("check", "value", "tolerance", "passed"),
    # cost = true: what each step cost (memory: measured on the first step only)
    "cost": ("step", "seconds", "activation_bytes", "memory_bytes", "rss_bytes"),
}
# columns that hold text; in any other required column, text means the file was damaged
TEXT_COLUMNS = ("arm", "param", "buffer", "expect", "verdict", "check", "dtype", "precision",
                "diagnosis", "settings_differ")

# the summary metrics, in the order summary.csv and --json give them
METRICS = ("max_rel_grad_err", "max_abs_grad_err", "min_grad_cosine", "max_exact_err",
           "exact_floor", "accum_rise", "max_sum_condition", "final_loss", "max_rel_loss_diff",
           "final_weight_dist", "final_test_loss", "final_test_accuracy", "max_rel_buffer_diff",
           "diverged_at_step", "skipped_steps", "max_rel_lr_diff", "allreduces_per_step",
           "step_seconds", "max_saved_bytes", "negatives")

# short labels for tables meant for people (CSV and JSON keep the column names)
HEADERS = {"accum_steps": "N", "micro_batch": "micro", "max_rel_grad_err": "rel grad err",
           "max_abs_grad_err": "abs grad err", "rel_tolerance": "tolerance",
           "min_grad_cosine": "min cos", "final_test_accuracy": "test acc",
           "final_test_loss": "test loss", "final_weight_dist": "weight dist",
           "max_rel_loss_diff": "max rel loss diff", "loss_diff": "loss diff",
           "max_rel_buffer_diff": "rel BN stats diff", "max_exact_err": "vs exact",
           "exact_floor": "floor", "diverged_at_step": "diverged at", "world_size": "W",
           "allreduces_per_step": "all-reduces/step", "step_seconds": "s/step",
           "accum_rise": "rise over N=1", "max_sum_condition": "Σ|g_i|/‖g‖",
           "accum_bound": "bound", "skipped_steps": "skipped", "cuda_peak_bytes": "CUDA bytes",
           "max_rel_lr_diff": "lr diff", "max_saved_bytes": "saved bytes", "negatives": "negatives",
           "step_ms": "ms/step", "example_us": "µs/example", "activation_mb": "activations MB",
           "memory_mb": "step MB", "rss_mb": "peak RSS MB"}


def allowed_columns(table: str, settings: Iterable[str] = ()) -> set[str]:
    """The columns a writer may put in ``table`` (summary: plus the swept settings)."""
    extra = set(settings) if table == "summary" else set()
    return {*KEYS, *COLUMNS[table], *extra}


# ----------------------------------------------------------------------------- verdict
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
# Measured on the built-in experiments (README): exact arms in float64 land up to
# 12 u away from the reference (tokens, N = 2), in float32 up to ... above the floor.
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


def verdict(baseline: bool, rel_err: float | None, rel_tol: float, abs_err: float = math.nan,
            abs_tol: float | None = None, lr_diff: float = math.nan) -> Verdict:
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


def rel_diff(value: float, reference: float) -> float:
    """|value - reference| / |reference|; 0 when equal (0 too), inf against a reference 0."""
    if value == reference:
        return 0.0
    return abs(value - reference) / abs(reference) if reference else math.inf


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


# ----------------------------------------------------------------------------- summary

def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _worst(rows: Iterable[Mapping], column: str, pick=max) -> float:
    values = [r[column] for r in rows if not missing(r.get(column))]
    return pick(values) if values else math.nan


def _last(rows: list[Mapping], column: str) -> float:
    return rows[-1][column] if rows and not missing(rows[-1].get(column)) else math.nan


def _mean(rows: Iterable[Mapping], column: str) -> float:
    values = [r[column] for r in rows if not missing(r.get(column))]
    return sum(values) / len(values) if values else math.nan


def _median(rows: Iterable[Mapping], column: str) -> float:
    values = sorted(r[column] for r in rows if not missing(r.get(column)))
    if not values:
        return math.nan
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def summarise(steps: list[Mapping], probes: list[Mapping] = (), evals: list[Mapping] = (),
              buffers: list[Mapping] = ()) -> dict[str, float]:
    """The summary metrics of one arm from its rows (each list in step order).

    Gradient errors are the worst over the probes (all parameters together, the
    '*' rows) whose gradients were finite; losses and accuracies are those of the
    last step given. compare passes the rows up to a step to read the metrics
    there (--at-step).
    """
    overall = [r for r in probes if r["param"] == "*"]
    # a step the GradScaler skipped held inf/NaN on purpose: it applied nothing
    # (update_norm is NaN when not measured; weights a step made non-finite show in the
    # next step's loss)
    skipped = [r["step"] for r in steps if is_true(r.get("skipped"))]
    diverged = [r["step"] for r in steps if r["step"] not in skipped and not all(
        math.isfinite(r[c]) for c in ("loss", "grad_norm") if c in r)]
    rises = [r["exact_err"] - r["floor_err"] for r in overall
             if not missing(r.get("exact_err")) and not missing(r.get("floor_err"))]
    return {
        "max_rel_grad_err": _worst(overall, "rel_l2_err"),
        "max_abs_grad_err": _worst(overall, "max_abs_err"),
        "min_grad_cosine": _worst(overall, "cosine", min),
        "max_exact_err": _worst(overall, "exact_err"),
        "exact_floor": _worst(overall, "floor_err"),
        # the share of the distance that accumulating adds: the arm against one big batch
        # in its own precision at the same weights, i.e. its rise over N = 1
        "accum_rise": max(rises) if rises else math.nan,
        "max_sum_condition": _worst(overall, "sum_condition"),
        "final_loss": _last(steps, "loss"),
        "max_rel_loss_diff": _worst(steps, "rel_loss_diff"),
        "final_weight_dist": _last(steps, "weight_dist"),
        "final_test_loss": _last(list(evals), "test_loss"),
        "final_test_accuracy": _last(list(evals), "test_accuracy"),
        "max_rel_buffer_diff": _worst([r for r in buffers if r["buffer"] == "*"], "rel_l2_err"),
        "diverged_at_step": diverged[0] if diverged else math.nan,
        "skipped_steps": len(skipped) if any("skipped" in r for r in steps) else math.nan,
        "max_rel_lr_diff": max((rel_diff(r["lr"], r["ref_lr"]) for r in overall
                                if not missing(r.get("lr"))), default=math.nan),
        # what data parallelism costs: the all-reduces DDP's hook counted, and the time
        "allreduces_per_step": _mean(steps, "allreduces"),
        "step_seconds": _median(steps, "step_seconds"),
        "max_saved_bytes": _worst(steps, "saved_bytes"),
        "negatives": _last(steps, "negatives"),
    }


def is_true(value: Any) -> bool:
    """A flag as a row holds it: True, or 'True' from a CSV that pandas read as text."""
    return value is True or (not missing(value) and str(value).lower() in ("true", "1", "1.0"))


MB = 1e6  # the cost columns' megabyte: 10^6 bytes, as budget_mb


def summarise_cost(costs: list[Mapping], batch_size: int) -> dict[str, float]:
    """The cost metrics of one arm from its cost.csv rows (in step order): the median time
    of the steps after the first (which warms up and measures memory), and the memory
    measured on the first."""
    timed = [r["seconds"] for r in costs[1:] or costs if not missing(r.get("seconds"))]
    seconds = statistics.median(timed) if timed else math.nan
    first = costs[0] if costs else {}

    def mb(column: str) -> float:
        value = first.get(column)
        return math.nan if missing(value) else value / MB

    return {"step_ms": 1e3 * seconds, "example_us": 1e6 * seconds / batch_size,
            "activation_mb": mb("activation_bytes"), "memory_mb": mb("memory_bytes"),
            "rss_mb": mb("rss_bytes")}


def judge(baseline: bool, dtype: str, accum_steps: int, metrics: Mapping,
          rtol: float | None = None, atol: float | None = None) -> tuple[float, str]:
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
    return (math.nan if baseline else tol), verdict(baseline, err, tol,
                                                    metrics.get("max_abs_grad_err", math.nan),
                                                    atol, metrics.get("max_rel_lr_diff",
                                                                      math.nan))
