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
from collections.abc import Iterable, Mapping
from typing import Any

# the CSV files of a run directory, in the order a trial's rows are written
TABLES = ("summary", "steps", "probe", "buffers", "eval", "trace", "weights", "checks")

# every table starts with these, so a file that does not is not ours
KEYS = ("trial", "arm")

# the columns of each table after KEYS (summary also holds the swept settings, see below)
COLUMNS: dict[str, tuple[str, ...]] = {
    "summary": ("baseline", "batch_size", "accum_steps", "micro_batch", "dtype",
                "max_rel_grad_err", "max_abs_grad_err", "min_grad_cosine", "final_loss",
                "max_rel_loss_diff", "final_weight_dist", "final_test_loss",
                "final_test_accuracy", "max_rel_buffer_diff", "rel_tolerance", "expect",
                "verdict"),
    "steps": ("step", "examples", "units", "loss", "grad_norm", "update_norm", "weight_dist",
              "rel_loss_diff"),
    "probe": ("step", "param", "max_abs_err", "rel_l2_err", "cosine", "ref_norm", "arm_norm"),
    "buffers": ("step", "buffer", "max_abs_err", "rel_l2_err", "cosine", "ref_norm", "arm_norm",
                "test_accuracy", "ref_test_accuracy"),
    "eval": ("step", "examples", "test_loss", "test_accuracy"),
    "trace": ("step", "micro_batch", "param", "element", "grad"),
    "weights": ("step", "param", "element", "value"),
    "checks": ("check", "value", "tolerance", "passed"),
}

# what compare and plots cannot do without; a file lacking one of these is damaged
REQUIRED: dict[str, tuple[str, ...]] = {
    "summary": ("baseline", "accum_steps", "micro_batch", "max_rel_grad_err",
                "max_abs_grad_err", "final_loss", "expect", "verdict"),
    "steps": ("step", "examples", "loss", "grad_norm"),
    "probe": ("step", "param", "max_abs_err", "rel_l2_err", "cosine"),
    "eval": ("step", "examples", "test_loss", "test_accuracy"),
    "checks": ("check", "value", "tolerance", "passed"),
}
# columns that hold text; in any other required column, text means the file was damaged
TEXT_COLUMNS = ("arm", "param", "buffer", "expect", "verdict", "check", "dtype")

# the summary metrics, in the order summary.csv and --json give them
METRICS = ("max_rel_grad_err", "max_abs_grad_err", "min_grad_cosine", "final_loss",
           "max_rel_loss_diff", "final_weight_dist", "final_test_loss", "final_test_accuracy",
           "max_rel_buffer_diff")

# short labels for tables meant for people (CSV and JSON keep the column names)
HEADERS = {"accum_steps": "N", "micro_batch": "micro", "max_rel_grad_err": "rel grad err",
           "max_abs_grad_err": "abs grad err", "rel_tolerance": "tolerance",
           "min_grad_cosine": "min cos", "final_test_accuracy": "test acc",
           "final_test_loss": "test loss", "final_weight_dist": "weight dist",
           "max_rel_loss_diff": "max rel loss diff", "loss_diff": "loss diff",
           "max_rel_buffer_diff": "rel BN stats diff"}


def allowed_columns(table: str, settings: Iterable[str] = ()) -> set[str]:
    """The columns a writer may put in ``table`` (summary: plus the swept settings)."""
    extra = set(settings) if table == "summary" else set()
    return {*KEYS, *COLUMNS[table], *extra}


# ----------------------------------------------------------------------------- verdict

UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}

# Headroom over N*u. The two arms do not differ only in how the N micro-batch
# gradients are summed: the big batch itself reduces over B examples inside its
# matmuls and convolutions in a blocked order, and every layer's backward rounds
# again. A factor of 16 covers that for the built-in models (measured worst case
# 3.3 N u, at N=2 with GroupNorm, see README) and still sits orders of magnitude below the
# errors of a real mistake (loss not scaled: N-1; BatchNorm: >1e-2).
TOLERANCE_FACTOR = 16.0


def rel_tolerance(dtype: str, accum_steps: int) -> float:
    """Largest relative L2 gradient error still called equivalent: c * max(N, 2) * u.

    Summing N partial gradients in floating point errs by up to about (N-1)*u
    relative to the sum of magnitudes; max(N, 2) keeps N=1 from demanding
    bit-identical results against a baseline that rounds in its own order.
    """
    return TOLERANCE_FACTOR * max(accum_steps, 2) * UNIT_ROUNDOFF[dtype]


def verdict(baseline: bool, rel_err: float | None, rel_tol: float, abs_err: float = math.nan,
            abs_tol: float | None = None) -> str:
    """baseline | not probed | equivalent | differs: the one rule, for run and compare alike.

    Equivalent when the relative error is within rel_tol, or (only when an
    absolute tolerance is given) the largest absolute error is within abs_tol.
    """
    if baseline:
        return "baseline"
    if missing(rel_err):
        return "not probed"
    if rel_err <= rel_tol or (abs_tol is not None and abs_err <= abs_tol):
        return "equivalent"
    return "differs"


# ----------------------------------------------------------------------------- summary

def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _worst(rows: Iterable[Mapping], column: str, pick=max) -> float:
    values = [r[column] for r in rows if not missing(r.get(column))]
    return pick(values) if values else math.nan


def _last(rows: list[Mapping], column: str) -> float:
    return rows[-1][column] if rows and not missing(rows[-1].get(column)) else math.nan


def summarise(steps: list[Mapping], probes: list[Mapping] = (), evals: list[Mapping] = (),
              buffers: list[Mapping] = ()) -> dict[str, float]:
    """The summary metrics of one arm from its rows (each list in step order).

    Gradient errors are the worst over the probes (all parameters together, the
    '*' rows); losses and accuracies are those of the last step given. compare
    passes the rows up to a step to read the metrics there (--at-step).
    """
    overall = [r for r in probes if r["param"] == "*"]
    return {
        "max_rel_grad_err": _worst(overall, "rel_l2_err"),
        "max_abs_grad_err": _worst(overall, "max_abs_err"),
        "min_grad_cosine": _worst(overall, "cosine", min),
        "final_loss": _last(steps, "loss"),
        "max_rel_loss_diff": _worst(steps, "rel_loss_diff"),
        "final_weight_dist": _last(steps, "weight_dist"),
        "final_test_loss": _last(list(evals), "test_loss"),
        "final_test_accuracy": _last(list(evals), "test_accuracy"),
        "max_rel_buffer_diff": _worst([r for r in buffers if r["buffer"] == "*"], "rel_l2_err"),
    }
