"""A run's report: report.md and a self-contained index.html, written into the run directory.

Both say the same things in the same order, because both are rendered from one list
of blocks: first the compact table (as `gradlab run` prints it) and the figures (what a
reader came for), then the details (the arms, the full table and how to read it, what
was run, the spec itself). index.html
embeds the figures as base64 PNG and loads nothing else, so it can be mailed or
attached on its own; report.md links to them in figures/.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gradlab.readers import compact, compare, plots
from gradlab.record.store import Run
from gradlab.record.verdict import Verdict

# ----------------------------------------------------------------------------- blocks


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    text: str  # Markdown inline: `code` only
    note: bool = False  # a footnote to the table: smaller, grey


@dataclass
class Items:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: list[bool]      # right-aligned columns
    outcome: list[str] = dataclasses.field(default_factory=list)  # per row: ok, FAIL, n/a, ""
    judged: list[bool] = dataclasses.field(default_factory=list)  # columns coloured by outcome
    # per cell, in place of the rows' outcome (the pivot: each cell judged on its own)
    cell_outcomes: list[list[str]] = dataclasses.field(default_factory=list)


@dataclass
class Figure:
    path: Path
    title: str


@dataclass
class Code:
    text: str
    language: str = ""


Block = Heading | Text | Items | Table | Figure | Code


# ----------------------------------------------------------------------------- content

def summary_table(run: Run) -> compact.Pivot:
    """The table the report opens with, as `gradlab run` and `compare` print it: one row per
    arm and setting, one column per N, each cell the judged error marked by whether the
    spec's expectation held. A run whose only arm is the baseline (each trial a training run
    of its own, like norm-training) shows what it measured instead."""
    return compact.pivot(compare.compare([run]))


def full_table(run: Run) -> compare.Comparison:
    """Every arm of every trial, every key column: compare's full table (for the details).

    A run whose only arm is the baseline has nothing to judge: its table shows what it
    measured, by setting.
    """
    comparison = compare.compare([run])
    if comparison.rows["baseline"].all():
        return measurements(comparison)
    return comparison


def measurements(comparison: compare.Comparison) -> compare.Comparison:
    """The comparison without verdicts, tolerances or differences from the baseline (all of
    them empty or zero when every row is the baseline): the settings and what was measured."""
    judging = {"max_rel_grad_err", "rel_tolerance", "min_grad_cosine", "loss_diff", "expect",
               "verdict", "check"}
    columns = [c for c in comparison.columns if c not in judging]
    if comparison.rows["arm"].nunique() == 1:
        columns.remove("arm")  # the one arm is in the title
    if "accum_steps" in columns and "micro_batch" in comparison.rows and \
            "micro_batch" not in columns:  # the size each setting's micro-batches had
        columns.insert(columns.index("accum_steps") + 1, "micro_batch")
    arm = comparison.rows["arm"].iloc[0]
    title = f"{comparison.title.split(':')[0]}: what each setting measured (arm '{arm}')"
    notes = [n for n in comparison.notes if n.startswith("mean ± std")]
    return dataclasses.replace(comparison, title=title, columns=columns, notes=notes)


def table_block(comparison: compare.Comparison) -> Table:
    outcome = list(comparison.rows["check"].fillna("")) if "check" in comparison.rows else []
    return Table([comparison.header(c) for c in comparison.columns], comparison.cells(),
                 [comparison.numeric(c) for c in comparison.columns],
                 outcome if "check" in comparison.columns else [],
                 [c in ("verdict", "check") for c in comparison.columns])


def pivot_block(pivot: compact.Pivot) -> Table:
    return Table(pivot.header(), [[*labels, *(c.text for c in cells)]
                                  for labels, cells in pivot.rows],
                 [False] * len(pivot.labels) + [True] * len(pivot.ns),
                 cell_outcomes=[[""] * len(labels) + [c.outcome for c in cells]
                                for labels, cells in pivot.rows])


def expectations(comparison: compare.Comparison) -> list[Block]:
    """Whether the spec's expectations held, when it stated any."""
    if "check" not in comparison.columns:
        return []
    if not comparison.failures:
        return [Text("Every arm did what its spec expects (`gradlab compare --check` exits 0).")]
    return [Text(f"{len(comparison.failures)} expectation(s) of the spec failed "
                 f"(`gradlab compare --check` exits 1):"), Items(comparison.failures)]


def facts(run: Run) -> list[tuple[str, str]]:
    """What was run, where and with what, from run.json."""
    meta = run.meta
    versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()
                         if k != "platform")
    pairs = [("run", run.name), ("status", meta["status"]),
             ("started", meta.get("started")), ("ended", meta.get("ended")),
             ("command", " ".join(meta.get("command") or [])),
             ("spec", meta.get("spec_source")),
             ("overrides", " ".join(f"--set {o}" for o in meta.get("overrides") or [])),
             ("trials", str(len(meta["trials"]))), ("device", meta.get("device")),
             ("versions", versions), ("git commit", meta.get("git_commit"))]
    return [(k, str(v)) for k, v in pairs if v]


def trace_table(run: Run) -> Table | None:
    """The toy's numbers: .grad after each micro-batch backward, the weights after each step
    (trace.csv and weights.csv); None without a trace, or with too many rows to read."""
    trace, weights = run.table("trace"), run.table("weights")
    if trace is None or weights is None or len(trace) + len(weights) > 64:
        return None
    rows = [[str(r.trial), r.arm, str(r.step), f"micro-batch {r.micro_batch}",
             f"{r.param}[{r.element}].grad", f"{r.grad:.6g}"] for r in trace.itertuples()]
    rows += [[str(r.trial), r.arm, str(r.step), "optimizer step", f"{r.param}[{r.element}]",
              f"{r.value:.6g}"] for r in weights.itertuples() if r.step > 0]
    return Table(["trial", "arm", "step", "after", "param", "value"], rows,
                 [False, False, True, False, False, True])


def arms(run: Run) -> list[str]:
    """Each arm with what it does (its help text in the spec), as run.json recorded it."""
    seen: dict[str, str] = {}
    for trial in run.meta["trials"]:
        for name, arm in trial["arms"].items():
            role = " (the baseline)" if arm.get("baseline") else ""
            seen.setdefault(name, f"`{name}`{role}: {arm.get('help') or 'no help text'}")
    return list(seen.values())


def blocks(run: Run, figures: dict[Path, str]) -> list[Block]:
    """The report, top to bottom: the compact table and the figures first, then the
    details (the full table among them)."""
    meta = run.meta
    pivot = summary_table(run)
    comparison = full_table(run)
    out: list[Block] = [Heading(1, f"{run.experiment}: gradlab report")]
    if meta.get("description"):
        out.append(Text(meta["description"]))
    out += [Heading(2, pivot.title), *expectations(comparison), pivot_block(pivot),
            Text(pivot.totals), *(Text(note, note=True) for note in pivot.notes)]
    out += [Heading(2, "Figures")]
    out += [Figure(path, title) for path, title in figures.items()]
    trace = trace_table(run)
    if trace is not None:
        out += [Heading(2, "Trace: the numbers of trace.csv and weights.csv"),
                trace]
    out += [Heading(2, "Details"), Heading(3, "The arms"), Items(arms(run)),
            Heading(3, comparison.title), table_block(comparison)]
    if comparison.notes:
        out += [Heading(3, "How to read the table"),
                *(Text(note, note=True) for note in comparison.notes)]
    rows = facts(run)
    out += [Heading(3, "What was run"),
            Table(["", ""], [list(pair) for pair in rows], [False, False])]
    if meta.get("spec_text"):
        out += [Heading(3, f"The spec ({Path(meta.get('spec_source') or 'spec').name})"),
                Code(meta["spec_text"], "toml")]
    return out


# ----------------------------------------------------------------------------- Markdown

def markdown(blocks_: list[Block]) -> str:
    out = []
    for block in blocks_:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            out.append(block.text)
        elif isinstance(block, Items):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            out.append(markdown_table(block))
        elif isinstance(block, Figure):
            out.append(f"### {block.title}\n\n![{block.title}](figures/{block.path.name})")
        elif isinstance(block, Code):
            fence = "````" if "```" in block.text else "```"
            out.append(f"{fence}{block.language}\n{block.text.rstrip()}\n{fence}")
    return "\n\n".join(out) + "\n"


def markdown_table(table: Table) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(table.header), line(["---:" if n else "---" for n in table.numeric]),
                      *map(line, table.rows)])


# ----------------------------------------------------------------------------- HTML

# the colour of a verdict and a check says whether the spec's expectation was met, so an
# expected "differs" is green; the classes are these fixed names, never a cell's text
OUTCOME_CLASS = {"ok": "met", "FAIL": "failed", "n/a": "unchecked", Verdict.BASELINE: "unchecked"}
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { text-align: left; background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.met { color: #070; }
td.failed { color: #b00; font-weight: bold; }
td.unchecked { color: #888; }
code, pre { font-family: ui-monospace, monospace; background: #f6f6f6; }
code { padding: 0 0.2em; }
pre { padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1.5em 0; }
figcaption { font-weight: 600; margin-bottom: 0.4em; }
img { max-width: 100%; border: 1px solid #eee; }
p.note { color: #555; font-size: 0.9em; }
"""
# the page loads nothing: no script, no font, no image that is not inside it
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def inline(text: str) -> str:
    """Markdown inline text as HTML: `code` spans become <code>, everything else is escaped."""
    parts = re.split(r"`([^`]*)`", text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p)
                   for i, p in enumerate(parts))


def html_page(title: str, blocks_: list[Block]) -> str:
    out = ["<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<meta http-equiv='Content-Security-Policy' content=\"{POLICY}\">",
           "<meta name='viewport' content='width=device-width, initial-scale=1'>",
           f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"]
    for block in blocks_:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{inline(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            attribute = " class='note'" if block.note else ""
            out.append(f"<p{attribute}>{inline(block.text)}</p>")
        elif isinstance(block, Items):
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            out.append(html_table(block))
        elif isinstance(block, Figure):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            out.append(f"<figure><figcaption>{html.escape(block.title)}</figcaption>"
                       f"<img alt='{html.escape(block.title, quote=True)}' "
                       f"src='data:image/png;base64,{data}'></figure>")
        elif isinstance(block, Code):
            out.append(f"<pre><code>{html.escape(block.text.rstrip())}</code></pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    lines = [f"<table><tr>{head}</tr>" if any(table.header) else "<table>"]
    for i, cells in enumerate(table.rows):
        outcome = OUTCOME_CLASS.get(table.outcome[i], "") if table.outcome else ""
        tds = []
        for j, cell in enumerate(cells):
            # a table without a header is a list of facts: its first column names them
            tag = "th" if j == 0 and not any(table.header) else "td"
            if table.cell_outcomes:
                judged = OUTCOME_CLASS.get(table.cell_outcomes[i][j], "")
            else:
                judged = outcome if table.judged and table.judged[j] else ""
            classes = " ".join(c for c in ("num" if table.numeric[j] else "", judged) if c)
            attribute = f" class='{classes}'" if classes else ""
            tds.append(f"<{tag}{attribute}>{html.escape(cell)}</{tag}>")
        lines.append("<tr>" + "".join(tds) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files

def write(run: Run, say: Callable[[str], object] = lambda note: None) -> list[Path]:
    """report.md, index.html (and the figures in figures/) in the run directory; ``say``: a
    note for people (plots.write's)."""
    figures = plots.write([run], run.path / "figures", "png", say=say)
    content = blocks(run, figures)
    md_path, html_path = run.path / "report.md", run.path / "index.html"
    md_path.write_text(markdown(content), encoding="utf-8")
    html_path.write_text(html_page(f"{run.experiment}: gradlab report", content),
                         encoding="utf-8")
    return [md_path, html_path]
