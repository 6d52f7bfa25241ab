"""The compact table: the answer at a glance, one row per arm and setting, one column per N.

Each cell is the judged number with a mark saying whether the spec's expectation held.
Built from the judged rows of a Comparison (gradlab.readers.compare), so run, compare and
report show the same verdicts as the full table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from gradlab.readers.compare import HEADERS, Comparison, budget_notes, fmt, telling
from gradlab.record.verdict import Verdict, missing

MARKS = {"ok": "✓", "FAIL": "✗", "n/a": "·"}


@dataclass
class PivotCell:
    text: str     # the number, and its mark when something was checked
    outcome: str  # ok | FAIL | n/a (as the check column) | baseline | '' (nothing expected)


@dataclass
class Pivot:
    title: str
    labels: list[str]   # the columns that name a row: settings that tell rows apart, the arm
    ns: list[int]       # one column per N
    rows: list[tuple[list[str], list[PivotCell]]]
    totals: str         # one line: how many expectations held
    notes: list[str]    # how to read a cell

    def header(self) -> list[str]:
        return [HEADERS.get(c, c.replace("_", " ")) for c in self.labels] + \
            [f"N={n}" for n in self.ns]

    def markdown(self) -> str:
        def line(cells):
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
        lines = [line(self.header()),
                 line(["---"] * len(self.labels) + ["---:"] * len(self.ns)),
                 *(line([*labels, *(c.text for c in cells)]) for labels, cells in self.rows)]
        return "\n".join(lines) + "\n" + "".join(f"\n{text}\n"
                                                 for text in [self.totals, *self.notes])


def short(value: Any) -> str:
    """A number in as few characters as a table cell can take: 2 significant digits, the
    exponent without its padding (1.8e-7, not 1.80e-07)."""
    if missing(value):
        return "-"
    text = f"{value:.2g}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.1e}"
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}e{int(exponent)}" if e else text


def cell_n(rows: pd.DataFrame) -> pd.Series:
    """The N a row belongs under: the sweep's N where the sweep sets it (the baseline's own N
    is 1 in every trial), else the arm's own."""
    swept = pd.to_numeric(rows["swept_accum_steps"], errors="coerce")
    return swept.fillna(rows["accum_steps"]).astype(int)


def pivot_labels(comparison: Comparison) -> list[str]:
    """The settings that tell the pivot's rows apart (N and seed aside), then the arm."""
    rows = comparison.judged
    settings = [c for c in telling(rows, comparison.settings)
                if c not in ("accum_steps", "micro_batch", "seed")]
    arms = ["arm"] if rows["arm"].nunique() > 1 or not rows["baseline"].all() else []
    return [*settings, *arms]


def pivot_groups(rows: pd.DataFrame, labels: list[str]):
    """(label values, {N: rows}) per pivot row, in the order the run went: settings as the
    trials came, then the arms as the spec lists them (the arm is the last label)."""
    settings = [c for c in labels if c != "arm"]
    point = [tuple(fmt(row[c]) for c in settings) for _, row in rows.iterrows()]
    rows = rows.assign(_n=cell_n(rows))
    arms = list(dict.fromkeys(rows["arm"])) if "arm" in labels else [None]
    for setting in dict.fromkeys(point):
        at_setting = rows[[p == setting for p in point]]
        for arm in arms:
            group = at_setting if arm is None else at_setting[at_setting["arm"] == arm]
            if len(group):
                yield [*setting, *([arm] if arm else [])], \
                    {int(n): part for n, part in group.groupby("_n")}


def judged_cell(part: pd.DataFrame, measure: str) -> PivotCell:
    """The worst error of the rows under one cell (several when seeds or runs repeat it),
    marked FAIL when any of them failed."""
    checks = set(part["check"])
    outcome = next((c for c in ("FAIL", "ok", "n/a") if c in checks), "")
    if not outcome and part["baseline"].all():
        outcome = Verdict.BASELINE
    # the baseline's own distance from the exact gradient is the floor
    floor = outcome == Verdict.BASELINE and measure == "max_exact_err"
    column = "exact_floor" if floor else measure
    values = pd.to_numeric(part[column], errors="coerce")
    text = short(values.max())
    # the mark right after the number: at 80 columns every character counts
    return PivotCell(f"{text}{MARKS[outcome]}" if outcome in MARKS else text, outcome)


def measured_cell(part: pd.DataFrame, measure: str) -> PivotCell:
    """Mean ± std over the seeds of what a run of one arm measured (a seed repeated across
    runs counts once)."""
    per_seed = pd.to_numeric(part[measure], errors="coerce").groupby(part["seed"]).mean()
    mean, std = per_seed.mean(), per_seed.std() if len(per_seed) > 1 else math.nan
    mean_text = fmt(float(mean)) if not missing(mean) else "-"
    return PivotCell(mean_text if missing(std) else f"{mean_text}±{std:.1g}", "")


def totals(rows: pd.DataFrame) -> str:
    """'50 expectations hold, 10 n/a, 0 fail': one count per arm of each trial."""
    counts = rows["check"].value_counts()
    if not counts.reindex(["ok", "n/a", "FAIL"]).fillna(0).any():
        return "no expectations: the spec promises nothing about these arms"
    held = counts.get("ok", 0)
    return (f"{held} {'expectation holds' if held == 1 else 'expectations hold'}, "
            f"{counts.get('n/a', 0)} n/a, {counts.get('FAIL', 0)} fail")


def pivot(comparison: Comparison) -> Pivot:
    """The compact table of a comparison (see the section comment above)."""
    rows = comparison.judged
    at = f", at step {comparison.at_step}" if comparison.at_step is not None else ""
    if rows["baseline"].all():  # one arm: each trial a training run of its own
        return measured_pivot(comparison, at)
    if "max_exact_err" in rows and rows["max_exact_err"].notna().any():
        measure = "max_exact_err"
        # the floor is recorded on the rows of the arms probed against the baseline: the
        # baseline's own is that of the arms computing in its precision (a trial may mix)
        same = ["precision"] if "precision" in rows and rows["precision"].notna().all() else []
        floors = rows.groupby(["run", "trial", *same])["exact_floor"].transform("max")
        rows = rows.assign(exact_floor=rows["exact_floor"].fillna(floors))
        title = (f"{comparison.experiment}: each arm's distance from the exact gradient "
                 f"({HEADERS[measure]}) by N{at}")
        what = (f"{HEADERS[measure]}: the arm's largest relative distance from the exact "
                f"float64 gradient over the probes (the baseline's row: its own, the floor)")
    else:  # a run made before the exact reference was recorded
        measure = "max_rel_grad_err"
        title = f"{comparison.experiment}: {HEADERS[measure]} by N{at}"
        what = f"{HEADERS[measure]}: the arm's relative distance from the baseline's gradient"
    labels = pivot_labels(comparison)
    groups = list(pivot_groups(rows, labels))
    ns = sorted({n for _, cells in groups for n in cells})
    table = [(names, [judged_cell(cells[n], measure) if n in cells else PivotCell("", "")
                      for n in ns]) for names, cells in groups]
    legend = [f"{MARKS['ok']} as the spec expects", f"{MARKS['FAIL']} not as it expects"]
    if any(c.outcome == "n/a" for _, cells in table for c in cells):
        legend.append(f"{MARKS['n/a']} not checked (expected to differ, at N = 1: nothing to "
                      f"accumulate)")
    note = f"{what}{at}; {', '.join(legend)}."
    if max(len(part) for _, cells in groups for part in cells.values()) > 1:
        note += " A cell holding several seeds or runs shows the worst."
    return Pivot(title, labels, ns, table, totals(rows),
                 [note + " --table full: every column and the rule."])


def measured_pivot(comparison: Comparison, at: str) -> Pivot:
    """The pivot of a run of one arm: what each setting measured, mean ± std over seeds."""
    rows = comparison.judged
    measure = next(m for m in ("final_test_accuracy", "final_test_loss", "final_loss")
                   if m in rows and rows[m].notna().any())
    seeds = rows["seed"].nunique()
    sizes = sorted(set(rows["batch_size"]))
    title = (f"{comparison.experiment}: {HEADERS.get(measure, measure)} by N{at}"
             + (f" (micro-batch B/N, B = {sizes[0]})" if len(sizes) == 1 else "")
             + (f", mean ± std over {seeds} seeds" if seeds > 1 else ""))
    labels = pivot_labels(comparison)
    groups = list(pivot_groups(rows, labels))
    ns = sorted({n for _, cells in groups for n in cells})
    table = [(names, [measured_cell(cells[n], measure) if n in cells else PivotCell("", "")
                      for n in ns]) for names, cells in groups]
    # a memory budget's answer is the point of such a run: the compact table says it too
    return Pivot(title, labels, ns, table,
                 "no expectations: one arm, each trial a training run of its own",
                 budget_notes(rows, comparison.settings))
