"""`gradlab audit`'s output: on the terminal the step table, the first difference and its
diagnosis (rich), or with --json one document. The audit itself is gradlab.auditing; this
only shows its AuditResult."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradlab.auditing.result import LR_RTOL, PROJECTIONS, cosine_text, difference_text
from gradlab.auditing.rundir import WEIGHTS_NOTE
from gradlab.record.meta import Status
from gradlab.record.schema import fmt
from gradlab.record.verdict import REORDER, Verdict

if TYPE_CHECKING:
    from gradlab.auditing.result import AuditResult


def render(result: AuditResult, console) -> None:
    """The step table, the first difference and its diagnosis, on the given rich console."""
    from rich.table import Table
    from rich.text import Text

    estimate = " (estimated)" if result.estimate else ""
    title = (f"audit {result.entrypoint}: {result.arm.call(result.max_steps)} against "
             f"{result.base.call(result.max_steps)}, {result.dtype}")
    console.print(title, highlight=False, soft_wrap=True, markup=False, emoji=False)
    table = Table()
    # two-line headers, so the table fits 80 columns with every cell whole
    for header in ("step", f"rel grad\nerr{estimate}", "tolerance", "cosine",
                   "lr\nbig-batch", "lr\naccumulated", "verdict"):
        table.add_column(header, justify="left" if header == "verdict" else "right",
                         no_wrap=True, min_width=len(Verdict.EQUIVALENT) if header == "verdict"
                         else None)
    for s in shown_steps(result.steps):
        if s is None:
            table.add_row("...", "", "", "", "", "", "")
            continue
        style = "green" if s["verdict"] == Verdict.EQUIVALENT else "red"
        table.add_row(str(s["step"]), fmt(s["rel_grad_err"]), fmt(s["tolerance"]),
                      cosine_text(s["cosine"]), fmt(s["lr_big_batch"]), fmt(s["lr_accumulated"]),
                      f"[{style}]{s['verdict']}[/]")
    console.print(table)
    worst = max(s["rel_grad_err"] for s in result.steps)
    plain = {"highlight": False, "soft_wrap": True, "markup": False, "emoji": False}
    pieces = "N·W - 1" if result.arm.ranks > 1 else "N - 1"  # N pieces a rank, then W ranks
    console.print(f"verdict: equivalent when rel grad err = ||g_acc - g_big|| / ||g_big|| <= "
                  f"tolerance = ({pieces})·u + {REORDER}·u_acc ({result.dtype}; your loop "
                  f"gives no float64 reference, so the floor is 0) "
                  f"and the learning rates and optimizer settings agree (to {LR_RTOL:g}); "
                  f"gradients {WEIGHTS_NOTE[result.same_weights].split(' (')[0]}", **plain)
    if result.arm.ranks > 1:
        console.print(ranks_text(result), **plain)
    if result.estimate:
        console.print(f"estimate: parameters x steps > {result.copy_limit:g} elements, too many to "
                      f"copy: the errors are estimated from the norm and {PROJECTIONS} random "
                      f"projections of each parameter's gradient", **plain)
    if not result.failed:
        console.print(Text.assemble(
            (Verdict.EQUIVALENT, "bold green"),
            f" at every one of the {len(result.steps)} steps: the accumulated loop hands the "
            f"optimizer the big batch's gradient (max rel grad err {fmt(worst)} <= "
            f"{fmt(result.steps[0]['tolerance'])}) and learning rate"), soft_wrap=True)
        return
    first = result.first_difference
    console.print(Text.assemble((Verdict.DIFFERS, "bold red"), f" from step {first['step']}: "
                                f"{difference_text(first)}"), soft_wrap=True)
    if result.diagnosis:
        console.print(f"diagnosis: {result.diagnosis}", **plain)


def ranks_text(result: AuditResult) -> str:
    """What the ranks did, measured: did they step on one gradient, and how often did a
    backward() reduce gradients across them (once a window saves the communication)."""
    steps, n = result.steps, result.arm.accum_steps
    spread = max(s["rank_grad_spread"] for s in steps)
    syncs = sorted({s["syncs_accumulated"] for s in steps})
    backwards = sorted({w["backwards"] for w in result.captures["accumulated"]["steps"]})
    agree = ("the ranks' gradients agreed at every step" if spread == 0 else
             f"the ranks' gradients lay up to {fmt(spread)} apart (rel err)")
    said = (f"ranks: {result.arm.call(result.max_steps)} (torch's launcher) against the big "
            f"batch on one; {agree}; backward() calls that reduced gradients across the ranks, "
            f"per step: {'/'.join(map(str, syncs))} of "
            f"{'/'.join(map(str, backwards))}")
    if syncs == [n] and n > 1:
        said += (" (every micro-batch reduced: the accumulation saves no communication; run "
                 "the first N - 1 backward() calls under no_sync(), or FSDP2's "
                 "set_requires_gradient_sync(False))")
    return said


def shown_steps(steps: list[dict], keep: int = 12) -> list[dict | None]:
    """All steps when few; else the first ones, the first difference and the last (None: ...)."""
    if len(steps) <= keep:
        return steps
    wanted = {1, 2, 3, len(steps)}
    first = next((s["step"] for s in steps if s["verdict"] != Verdict.EQUIVALENT), None)
    if first:
        wanted |= {first - 1, first, first + 1}
    out: list[dict | None] = []
    for s in steps:
        if s["step"] in wanted:
            if out and out[-1] is not None and out[-1]["step"] != s["step"] - 1:
                out.append(None)
            out.append(s)
    return out


def json_document(result: AuditResult) -> dict:
    """`gradlab audit --json`: the verdict, the two calls, the first difference and its
    diagnosis, and every step's row of audit.csv."""
    return {"run_dir": str(result.run_dir), "status": Status.COMPLETE,
            "entrypoint": result.entrypoint, "verdict": result.verdict,
            "calls": {a.name: a.call(result.max_steps) for a in (result.base, result.arm)},
            "dtype": result.dtype, "estimate": result.estimate,
            "first_difference": result.first_difference, "diagnosis": result.diagnosis,
            "steps": result.steps}
