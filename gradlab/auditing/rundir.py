"""The run directory an audit writes: the tables `gradlab run` writes (summary, steps, probe,
checks) plus audit.csv, so that compare, plot and report read it like any other run's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradlab.auditing.result import LR_RTOL
from gradlab.record.meta import RunMeta, Status
from gradlab.record.verdict import Verdict

if TYPE_CHECKING:
    from gradlab.auditing.result import AuditResult

WEIGHTS_NOTE = {
    True: "both at the big batch's weights: after each optimizer step the accumulated run "
          "takes the big batch's weights (gradlab audit)",
    False: "each at its own run's weights, which drift apart by rounding from step to step "
           "(gradlab audit: the weights were too large to pass along)",
}


def write_run(result: AuditResult, out: Path) -> Path:
    """A run directory that compare, plot and report read like any other run's."""
    from gradlab.record import store  # pandas: only the parent needs it

    module = result.entrypoint.partition(":")[0].rsplit(".", 1)[-1]
    arms = (result.base, result.arm)
    settings = {a.name: {"entrypoint": result.entrypoint, "batch_size": a.batch_size,
                         "accum_steps": a.accum_steps, "micro_batch_size": a.micro_batch_size,
                         "dtype": result.dtype, "steps": result.max_steps,
                         "seed": "set by train()"} for a in arms}
    run_dir = store.RunDir(out, RunMeta(
        experiment="audit",
        description=f"gradlab audit {result.entrypoint}: {result.arm.call(result.max_steps)}"
                    f" against {result.base.call(result.max_steps)}, each in its own process,"
                    f" compared at every optimizer step",
        entrypoint=result.entrypoint,
        gradients_at=WEIGHTS_NOTE[result.same_weights],
        device=result.captures["accumulated"]["device"],
        trials=[{"trial": 0, "swept": {},
                 "arms": {a.name: {"baseline": a is result.base,
                                   "expect": "" if a is result.base else Verdict.EQUIVALENT,
                                   "settings": settings[a.name]} for a in arms}}],
        audit={"verdict": result.verdict, "estimate": result.estimate,
               "first_difference": (result.first_difference or {}).get("step"),
               "diagnosis": result.diagnosis, "determinism_rechecked": result.rechecked,
               "seconds": result.seconds},
        notes=None,  # an audit tells the user nothing before it runs
    ), name=f"audit-{module}")
    for table, rows in (("summary", summary_rows(result)), ("steps", step_rows(result)),
                        ("probe", result.params), ("checks", check_rows(result)),
                        ("audit", result.steps)):
        run_dir.append(table, rows)
    run_dir.finish(Status.COMPLETE)
    return run_dir.path


def step_rows(result: AuditResult) -> list[dict[str, Any]]:
    rows = []
    for s in result.steps:
        ref_loss = s["loss_big_batch"]
        for a in (result.base, result.arm):
            key = "big_batch" if a is result.base else "accumulated"
            loss = s[f"loss_{key}"]
            rows.append({"trial": 0, "arm": a.name, "step": s["step"],
                         "examples": s["step"] * a.batch_size, "loss": loss,
                         "grad_norm": s[f"grad_norm_{key}"], "lr": s[f"lr_{key}"],
                         "weight_dist": math.nan,
                         "rel_loss_diff": abs(loss - ref_loss) / abs(ref_loss) if ref_loss
                         else math.nan})
    return sorted(rows, key=lambda r: (r["arm"] != result.base.name, r["step"]))


def summary_rows(result: AuditResult) -> list[dict[str, Any]]:
    steps, last = result.steps, result.steps[-1]
    rows = []
    for a in (result.base, result.arm):
        is_base = a is result.base
        rows.append({
            "trial": 0, "arm": a.name, "baseline": is_base, "batch_size": a.batch_size,
            "accum_steps": a.accum_steps, "micro_batch": a.micro_batch_size,
            "dtype": result.dtype,
            "max_rel_grad_err": math.nan if is_base else max(s["rel_grad_err"] for s in steps),
            "max_abs_grad_err": math.nan if is_base else max(s["max_abs_grad_err"]
                                                             for s in steps),
            "min_grad_cosine": math.nan if is_base else min(s["cosine"] for s in steps),
            "final_loss": last["loss_big_batch" if is_base else "loss_accumulated"],
            "max_rel_loss_diff": 0.0 if is_base else max(
                abs(s["loss_accumulated"] - s["loss_big_batch"]) / abs(s["loss_big_batch"])
                if s["loss_big_batch"] else math.nan for s in steps),
            "final_weight_dist": math.nan, "final_test_loss": math.nan,
            "final_test_accuracy": math.nan, "max_rel_buffer_diff": math.nan,
            "max_rel_lr_diff": math.nan if is_base else max(s["rel_lr_diff"] for s in steps),
            "first_difference": math.nan if is_base or not result.first_difference
            else result.first_difference["step"],
            "rel_tolerance": math.nan if is_base else steps[0]["tolerance"],
            "estimate": result.estimate,
            "expect": "" if is_base else Verdict.EQUIVALENT,
            "verdict": Verdict.BASELINE if is_base else result.verdict,
            "diagnosis": "" if is_base else result.diagnosis or "",
        })
    return rows


def check_rows(result: AuditResult) -> list[dict[str, Any]]:
    worst = max(s["rel_lr_diff"] for s in result.steps)
    differing = sum(bool(s["settings_differ"]) for s in result.steps)
    return [{"trial": 0, "arm": result.arm.name, "check": "learning rate = big batch's",
             "value": worst, "tolerance": LR_RTOL, "passed": worst <= LR_RTOL},
            {"trial": 0, "arm": result.arm.name, "check": "steps whose optimizer settings differ",
             "value": float(differing), "tolerance": 0.0, "passed": differing == 0}]
