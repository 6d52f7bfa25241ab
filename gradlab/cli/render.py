"""What the commands print: the judged tables (compact and full), a run's checks, divergence,
data-parallel cost and trace, the --json document of a run, and a run's progress."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gradlab.cli.shared import console, say
from gradlab.lab.experiment import count
from gradlab.record.verdict import Verdict, missing

if TYPE_CHECKING:
    from gradlab.api import RunResult
    from gradlab.readers import compact, compare


class RunProgress:
    """A run's progress on stderr, from the optimizer steps done (trial.run_trials calls
    ``advance(n)``). On a terminal: a bar with the time left. Off one (a CI log, a file):
    a line every 10 s and one at the end, so a log shows the run moving without a line per
    step. The time left is the steps left at the pace since the first step (building the
    first models takes a while and says nothing about the pace); before that, preflight's
    estimate."""

    EVERY = 10.0  # seconds between lines off a terminal

    def __init__(self, name: str, trials: int, total: int, estimate: float, shown: bool = True,
                 clock=time.monotonic):
        self.name, self.trials, self.total, self.estimate = name, trials, total, estimate
        self.shown, self.clock = shown, clock
        self.done = 0
        self.first: tuple[float, int] | None = None  # (time, steps done) at the first step
        self.bar = None
        from gradlab.lab.plan import format_seconds  # a run has imported the lab already

        self.format = format_seconds

    def __enter__(self) -> RunProgress:
        self.started = self.last_line = self.clock()
        err = console(stderr=True)
        if self.shown and err.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("steps"), TimeElapsedColumn(),
                                TextColumn("{task.fields[left]}"), console=err,
                                transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(f"{self.name}: {count(self.trials, 'trial')}",
                                          total=self.total, left=self.left())
        return self

    def __exit__(self, kind, value, tb) -> None:
        if self.bar is not None:
            self.bar.__exit__(kind, value, tb)
        elif self.shown and kind is None:
            say(f"{self.name}: {self.total} of {self.total} steps done in "
                f"{self.format(self.clock() - self.started)}")

    def seconds_left(self) -> float:
        if self.first is None or self.done == self.first[1]:
            return self.estimate * (self.total - self.done) / max(self.total, 1)
        since, done_then = self.first
        return (self.clock() - since) * (self.total - self.done) / (self.done - done_then)

    def left(self) -> str:
        return f"about {self.format(self.seconds_left())} left" if self.done < self.total else ""

    def line(self) -> str:
        return (f"{self.name}: {self.done} of {self.total} steps "
                f"({100 * self.done // max(self.total, 1)}%), "
                f"{self.format(self.clock() - self.started)} so far, {self.left()}")

    def advance(self, n: int) -> None:
        self.done += n
        if self.first is None:
            self.first = (self.clock(), self.done)
        if self.bar is not None:
            self.bar.update(self.task, advance=n, left=self.left())
        elif self.shown and self.done < self.total and \
                self.clock() - self.last_line >= self.EVERY:
            self.last_line = self.clock()
            say(self.line())



def json_document(result: RunResult) -> dict:
    """`gradlab run --json`: the run, its trials and each arm's summary row with its checks."""
    by_trial: dict[int, list] = {t.index: [] for t in result.trials}
    for row in result.summary:
        arm_checks = [{k: v for k, v in c.items() if k not in ("trial", "arm")}
                      for c in result.checks
                      if (c["trial"], c["arm"]) == (row["trial"], row["arm"])]
        by_trial[row["trial"]].append({**{k: v for k, v in row.items() if k != "trial"},
                                       "check": result.comparison.check_of(row["trial"],
                                                                           row["arm"]),
                                       "checks": arm_checks})
    return {"run_dir": str(result.run_dir), "status": result.status,
            "experiment": result.experiment,
            "trials": [{"trial": t.index, "settings": t.swept, "arms": by_trial[t.index]}
                       for t in result.trials],
            "check_failures": result.failures}


def render_divergence(summaries: list[dict], out: Console, one_line: bool = False) -> None:
    diverged = [row for row in summaries if not missing(row["diverged_at_step"])]
    if one_line and diverged:
        where = ", ".join(f"trial {row['trial']} {row['arm']} (step "
                          f"{row['diverged_at_step']:.0f})" for row in diverged)
        out.print(f"[bold]diverged:[/] {count(len(diverged), 'training')} reached a non-finite "
                  f"loss, gradient or weights, and are judged on the probes before that: "
                  f"{escape(where)}", highlight=False)
        return
    for row in diverged:
        out.print(f"[bold]diverged:[/] trial {row['trial']} arm {escape(row['arm'])}: "
                  f"non-finite loss, gradient or weights from step "
                  f"{row['diverged_at_step']:.0f}; its gradient is judged on the probes "
                  f"before that", highlight=False, soft_wrap=True)


def render_data_parallel(summaries: list[dict], out: Console) -> None:
    """What syncing cost each arm of a run with data-parallel arms: the gradient reductions
    (DDP's all-reduces, FSDP's reduce-scatters), their bytes, and time."""
    from gradlab.readers.compare import fmt

    if not any(row["world_size"] > 1 for row in summaries):
        return

    def per_step(row: dict, column: str) -> float:
        value = row.get(column, math.nan)  # (a run before FSDP arms has no reduce-scatters)
        return 0.0 if value is None or math.isnan(value) else value

    sharded = any(per_step(row, "reduce_scatters_per_step") for row in summaries)
    table = Table(title="data parallel: what syncing cost", title_justify="left",
                  box=box.SIMPLE_HEAD)
    columns = ["trial", "arm", "W", "N", "micro", "all-reduces/step",
               *(["reduce-scatters/step"] if sharded else []), "KiB/step", "ms/step"]
    for column in columns:
        table.add_column(column, justify="left" if column == "arm" else "right")
    for row in summaries:
        sent = per_step(row, "allreduce_bytes_per_step") \
            + per_step(row, "reduce_scatter_bytes_per_step")
        table.add_row(str(row["trial"]), Text(row["arm"]), str(row["world_size"]),
                      str(row["accum_steps"]), str(row["micro_batch"]),
                      fmt(row["allreduces_per_step"]),
                      *([fmt(row["reduce_scatters_per_step"])] if sharded else []),
                      fmt(sent / 1024), fmt(row["step_seconds"] * 1000))
    out.print(table)
    scattered = ("; reduce-scatters/step: FSDP's gradient reduce-scatters per optimizer step "
                 "(one per synced backward: the model is one parameter group)") if sharded else ""
    out.print(f"all-reduces/step: gradient all-reduces per optimizer step, as DDP's "
              f"communication hook counted them (one per bucket){scattered}; KiB/step: the "
              f"bytes of the gradients they reduced; ms/step: median time of a step on rank 0 "
              f"(with time_steps = true).", highlight=False, soft_wrap=True)


def render_checks(checks: list[dict], out: Console) -> None:
    from gradlab.readers.compare import fmt

    for c in checks:
        outcome = "[green]passed[/]" if c["passed"] else "[bold red]FAILED[/]"
        out.print(f"check, trial {c['trial']} arm {escape(c['arm'])}: {escape(c['check'])}: "
                  f"max rel err {fmt(c['value'])}, tolerance {fmt(c['tolerance'])}: {outcome}",
                  highlight=False, soft_wrap=True)


def render_trace(traces: list[dict], weights: list[dict], out: Console) -> None:
    table = Table(title="trace: the accumulated .grad after each micro-batch backward, "
                        "and the weights after each step", title_justify="left")
    for column in ("trial", "arm", "step", "after", "param", "value"):
        table.add_column(column)
    for row in traces:
        name = f"{row['param']}[{row['element']}]"
        table.add_row(str(row["trial"]), Text(row["arm"]), str(row["step"]),
                      f"micro-batch {row['micro_batch']}", Text(f"{name}.grad"),
                      f"{row['grad']:.6g}")
    for row in weights:
        if row["step"] > 0:
            table.add_row(str(row["trial"]), Text(row["arm"]), str(row["step"]),
                          "optimizer step", Text(f"{row['param']}[{row['element']}]"),
                          f"{row['value']:.6g}")
    out.print(table)


# ----------------------------------------------------------------------------- specs

OUTCOME_STYLE = {"ok": "green", "FAIL": "bold red", "n/a": "dim", Verdict.BASELINE: "dim"}
# what a reader must see whole; the other columns fold (wrap inside the cell) first
KEY_COLUMNS = ("arm", "accum_steps", "verdict", "check")
# the fewest characters a setting of the compact table folds to before the table gives way
# to one line per cell
FOLDED_SETTING = 4


def compact_table() -> Table:
    """A table whose columns are one space apart: no rules, no edges, no padding; every
    character goes to the numbers. (Its title is printed above it, on its own: a table
    narrower than its title would wrap the title.)"""
    return Table(box=box.SIMPLE_HEAD, show_edge=False, padding=0)


def render_comparison(result: compare.Comparison, out: Console) -> None:
    """The full table: one row per arm of every trial, then how to read it.

    When it is wider than the terminal, the settings fold first (wrap inside their cells);
    the numbers fold only when even that is not enough; arm, N, verdict and check never do.
    """
    table = compact_table()
    rows = result.cells()
    widest = [max(len(cells[j]) for cells in rows) if rows else 0
              for j in range(len(result.columns))]
    numeric = [result.numeric(c) and c not in KEY_COLUMNS for c in result.columns]
    # a number's header wraps at its spaces to the number's width: "rel grad" over "err"
    headers = [_wrapped(result.header(c), w) if n else result.header(c)
               for c, w, n in zip(result.columns, widest, numeric, strict=True)]
    whole = sum(max(w, *(len(line) for line in h.splitlines()))
                for c, w, h, n in zip(result.columns, widest, headers, numeric, strict=True)
                if n or c in KEY_COLUMNS)
    folded_settings = 3 * sum(1 for c, n in zip(result.columns, numeric, strict=True)
                              if not n and c not in KEY_COLUMNS)
    fits = whole + folded_settings + len(result.columns) - 1 <= out.width
    if not fits:  # the numbers would fold inside their cells: one "column: value" a line
        labels = [" ".join(result.header(c).split()) for c in result.columns]
        render_as_lines(out, result.title, [
            ([f"{label} {cell}" for label, cell, column in zip(labels, cells, result.columns,
                                                                strict=True)
              if column in ("trial", "arm")],
             [(label, cell) for label, cell, column in zip(labels, cells, result.columns,
                                                           strict=True)
              if column not in ("trial", "arm")]) for cells in rows])
        for note in result.notes:
            out.print(note, markup=False, highlight=False)
        return
    for column, header, width, number in zip(result.columns, headers, widest, numeric,
                                             strict=True):
        justify = "right" if result.numeric(column) else "left"
        if column in KEY_COLUMNS or (number and fits):
            table.add_column(header, no_wrap=True, justify=justify,
                             min_width=max(width, *(len(line) for line in header.splitlines())))
        else:
            table.add_column(header, overflow="fold", justify=justify)
    for cells in rows:
        table.add_row(*(Text(cell, style=_style(column, cell))
                        for column, cell in zip(result.columns, cells, strict=True)))
    out.print(Text(result.title, style="bold"))
    out.print(table)
    for note in result.notes:  # wrapped at the terminal's width, between words
        out.print(note, markup=False, highlight=False)


def render_as_lines(out: Console, title: str,
                    rows: list[tuple[list[str], list[tuple[str, str]]]]) -> None:
    """A table too wide for the terminal, as lines: each row's name, then one "column: value"
    line per cell, so that no number is cut or folded however narrow the terminal is."""
    out.print(Text(title, style="bold"))
    for name, cells in rows:
        out.print(Text(", ".join(part for part in name if part.strip()), style="bold"))
        for label, value in cells:
            if value.strip():
                out.print(Text(f"  {label}: {value}"), overflow="ignore", crop=False)


def _wrapped(header: str, width: int) -> str:
    """A header broken at its spaces into lines no wider than ``width`` (or its longest
    word)."""
    lines: list[str] = []
    for word in header.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


def _style(column: str, cell: str) -> str:
    if column == "check":
        return OUTCOME_STYLE.get(cell, "")
    return OUTCOME_STYLE[Verdict.BASELINE] if column == "verdict" and cell == Verdict.BASELINE \
        else ""


def render_pivot(pivot: compact.Pivot, out: Console) -> None:
    """The compact table: one row per arm and setting, one column per N; then the totals
    and how to read a cell. The N columns never shrink; the setting and arm columns fold."""
    header = pivot.header()
    # the arm and the numbers whole, each setting folded to FOLDED_SETTING characters at least
    widths = [max([len(label), *(len(c) for c in column)]) for label, column in zip(
        header, zip(*([*labels, *(c.text for c in cells)] for labels, cells in pivot.rows),
                    strict=True), strict=True)] if pivot.rows else []
    least = sum(w if j >= len(pivot.labels) or pivot.labels[j] == "arm" else
                min(w, FOLDED_SETTING) for j, w in enumerate(widths)) + len(widths) - 1
    if least > out.width:  # too narrow for the table: "N=2: 9.0e-16✓", a line each
        n_labels = header[len(pivot.labels):]
        render_as_lines(out, pivot.title, [
            ([f"{h} {v}" if h != "arm" else v for h, v in zip(header, labels, strict=False)],
             [(h, c.text) for h, c in zip(n_labels, cells, strict=True)])
            for labels, cells in pivot.rows])
        out.print(Text(pivot.totals, style="bold"))
        for note in pivot.notes:
            out.print(note, markup=False, highlight=False)
        return
    table = compact_table()
    for name, label in zip(pivot.labels, header, strict=False):
        if name == "arm":  # a row's name: whole, like the numbers
            widest = max([len(label), *(len(labels[-1]) for labels, _ in pivot.rows)])
            table.add_column(label, no_wrap=True, min_width=widest)
        else:
            table.add_column(label, overflow="fold")
    for j, label in enumerate(header[len(pivot.labels):]):
        widest = max([len(label), *(len(cells[j].text) for _, cells in pivot.rows)])
        table.add_column(label, justify="right", no_wrap=True, min_width=widest)
    for labels, cells in pivot.rows:
        dim = "dim" if all(c.outcome in (Verdict.BASELINE, "") for c in cells) and \
            any(c.outcome == Verdict.BASELINE for c in cells) else ""
        table.add_row(*(Text(label, style=dim) for label in labels),
                      *(Text(c.text, style=OUTCOME_STYLE.get(c.outcome, "")) for c in cells))
    out.print(Text(pivot.title, style="bold"))
    out.print(table)
    failed = " 0 fail" not in pivot.totals and "fail" in pivot.totals
    out.print(Text(pivot.totals, style="bold red" if failed else "bold"))
    for note in pivot.notes:  # wrapped at the terminal's width, between words
        out.print(note, markup=False, highlight=False)


