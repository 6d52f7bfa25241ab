"""The run directory's tables: their columns, their labels for people, and the one
summary computed from them, shared by ``gradlab run`` and ``gradlab compare`` (the
verdict on that summary: record/verdict.py).

Torch-free and pandas-free, so the CLI can import it without paying for either.
The writers (lab/) and the readers (store.py, readers/) name
columns through this module; ``store.RunDir.append`` refuses a column that is
not declared here, so the two sides cannot drift apart.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from gradlab.record.verdict import missing

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
                "skipped_steps", "cuda_peak_bytes", "rank_state_bytes", "rank_drift",
                "max_rel_lr_diff",
                "allreduces_per_step",
                "allreduce_bytes_per_step", "reduce_scatters_per_step",
                "reduce_scatter_bytes_per_step", "step_seconds", "max_saved_bytes", "negatives",
                "rel_tolerance", "expect", "verdict", *COST_METRICS,
                # gradlab audit's, of the user's own loop
                "first_difference", "estimate", "diagnosis"),
    # saved_bytes: the most bytes of activations autograd held for backward at once during
    # the step (gradlab.train.memory), for a loss that couples the batch, on the steps the probe
    # runs (empty on the others); negatives: for such a loss, the other examples each
    # example was scored against (B/N - 1 inside micro-batches, B - 1 over the window),
    # empty for a loss computed per example
    "steps": ("step", "examples", "epoch", "window_size", "units", "lr", "loss", "grad_norm",
              "update_norm", "allreduces", "allreduce_bytes", "reduce_scatters",
              "reduce_scatter_bytes", "step_seconds", "saved_bytes",
              "negatives", "weight_dist", "rel_loss_diff", "skipped", "grad_scale"),
    "probe": ("step", "param", "max_abs_err", "rel_l2_err", "cosine", "ref_norm", "arm_norm",
              "exact_err", "floor_err", "sum_condition", "lr", "ref_lr",
              "scale"),  # gradlab audit's: <g, g_ref> / |g_ref|^2, per parameter
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
              "settings_differ", "rank_grad_spread", "syncs_big_batch", "syncs_accumulated",
              "scale", "scaler_updates_big_batch", "scaler_updates_accumulated"),
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
           "allreduce_bytes_per_step", "reduce_scatters_per_step", "reduce_scatter_bytes_per_step",
           "step_seconds", "max_saved_bytes", "negatives")

# short labels for tables meant for people (CSV and JSON keep the column names)
HEADERS = {"accum_steps": "N", "micro_batch": "micro", "max_rel_grad_err": "rel grad err",
           "max_abs_grad_err": "abs grad err", "rel_tolerance": "tolerance",
           "min_grad_cosine": "min cos", "final_test_accuracy": "test acc",
           "final_test_loss": "test loss", "final_weight_dist": "weight dist",
           "max_rel_loss_diff": "max rel loss diff", "loss_diff": "loss diff",
           "max_rel_buffer_diff": "rel BN stats diff", "max_exact_err": "vs exact",
           "exact_floor": "floor", "diverged_at_step": "diverged at", "world_size": "W",
           "allreduces_per_step": "all-reduces/step",
           "allreduce_bytes_per_step": "all-reduced bytes/step",
           "reduce_scatters_per_step": "reduce-scatters/step",
           "reduce_scatter_bytes_per_step": "reduce-scattered bytes/step", "step_seconds": "s/step",
           "accum_rise": "rise over N=1", "max_sum_condition": "Σ|g_i|/‖g‖",
           "accum_bound": "bound", "skipped_steps": "skipped", "cuda_peak_bytes": "CUDA bytes",
           "rank_state_bytes": "state bytes/rank", "rank_drift": "drift across ranks",
           "max_rel_lr_diff": "lr diff", "max_saved_bytes": "saved bytes", "negatives": "negatives",
           "step_ms": "ms/step", "example_us": "µs/example", "activation_mb": "activations MB",
           "memory_mb": "step MB", "rss_mb": "peak RSS MB"}


def fmt(value: Any) -> str:
    """A number as a person reads it: 3 significant digits, scientific when tiny or huge."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


def allowed_columns(table: str, settings: Iterable[str] = ()) -> set[str]:
    """The columns a writer may put in ``table`` (summary: plus the swept settings)."""
    extra = set(settings) if table == "summary" else set()
    return {*KEYS, *COLUMNS[table], *extra}


def rel_diff(value: float, reference: float) -> float:
    """|value - reference| / |reference|; 0 when equal (0 too), inf against a reference 0."""
    if value == reference:
        return 0.0
    return abs(value - reference) / abs(reference) if reference else math.inf


# ----------------------------------------------------------------------------- summary

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
        "allreduce_bytes_per_step": _mean(steps, "allreduce_bytes"),
        "reduce_scatters_per_step": _mean(steps, "reduce_scatters"),
        "reduce_scatter_bytes_per_step": _mean(steps, "reduce_scatter_bytes"),
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

