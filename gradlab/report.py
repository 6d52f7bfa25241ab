"""A run's report: report.md and a self-contained index.html, written into the run directory.

Both hold the same things: what was run (run.json), the comparison table with its
verdicts and notes, and the standard figures. index.html embeds the figures as
base64 PNG, so it can be mailed or attached on its own; report.md links to them
in figures/.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from gradlab import compare, plots
from gradlab.store import Run


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


def expectations(comparison: compare.Comparison) -> str:
    if comparison.failures:
        return f"{len(comparison.failures)} expectation(s) of the spec failed:"
    return "Every arm did what its spec expects (`gradlab compare --check` exits 0)."


def markdown(run: Run, comparison: compare.Comparison, figures: dict[Path, str]) -> str:
    meta = run.meta
    lines = [f"# {run.experiment}: gradlab report", ""]
    if meta.get("description"):
        lines += [meta["description"], ""]
    lines += ["| | |", "| --- | --- |"]
    lines += [f"| {k} | {v.replace('|', chr(92) + '|')} |" for k, v in facts(run)]
    lines += ["", "## Each arm against the baseline", "", expectations(comparison), ""]
    lines += [f"- {failure}" for failure in comparison.failures]
    lines += ["", comparison.markdown(), "## Figures", ""]
    for path, title in figures.items():
        lines += [f"### {title}", "", f"![{title}](figures/{path.name})", ""]
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { text-align: left; background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.FAIL, .differs { color: #b00; font-weight: bold; }
.ok, .equivalent { color: #070; }
img { max-width: 100%; border: 1px solid #eee; }
p.note { color: #555; font-size: 0.9em; }
"""


def html_page(run: Run, comparison: compare.Comparison, figures: dict[Path, str]) -> str:
    esc = html.escape
    meta = run.meta
    out = [f"<!doctype html><html><head><meta charset='utf-8'>"
           f"<title>{esc(run.experiment)}: gradlab report</title><style>{STYLE}</style>"
           f"</head><body>", f"<h1>{esc(run.experiment)}: gradlab report</h1>"]
    if meta.get("description"):
        out.append(f"<p>{esc(meta['description'])}</p>")
    out.append("<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
                                   for k, v in facts(run)) + "</table>")
    out += ["<h2>Each arm against the baseline</h2>",
            f"<p>{esc(expectations(comparison))}</p>"]
    if comparison.failures:
        out.append("<ul>" + "".join(f"<li>{esc(f)}</li>" for f in comparison.failures) + "</ul>")
    numeric = [comparison.numeric(c) for c in comparison.columns]
    out.append("<table><tr>" + "".join(f"<th>{esc(comparison.header(c))}</th>"
                                       for c in comparison.columns) + "</tr>")
    for cells in comparison.cells():
        out.append("<tr>" + "".join(
            f"<td class='{'num' if n else esc(cell)}'>{esc(cell)}</td>"
            for cell, n in zip(cells, numeric, strict=True)) + "</tr>")
    out.append("</table>")
    out += [f"<p class='note'>{esc(note)}</p>" for note in comparison.notes]
    out.append("<h2>Figures</h2>")
    for path, title in figures.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        out += [f"<h3>{esc(title)}</h3>",
                f"<img alt='{esc(title)}' src='data:image/png;base64,{data}'>"]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write(run: Run) -> list[Path]:
    """report.md, index.html (and the figures in figures/) in the run directory."""
    comparison = compare.compare([run])
    figures = plots.write([run], run.path / "figures", "png")
    md_path, html_path = run.path / "report.md", run.path / "index.html"
    md_path.write_text(markdown(run, comparison, figures), encoding="utf-8")
    html_path.write_text(html_page(run, comparison, figures), encoding="utf-8")
    return [md_path, html_path]
