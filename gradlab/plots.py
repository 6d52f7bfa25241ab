"""Figures from the CSVs of finished runs (matplotlib, Agg: no display needed).

Which figures a run gets depends on what it recorded, not on its name:

    loss            loss against step, every arm overlaid (always)
    grad-error      relative gradient error against N, log axes, with the dtype's
                    tolerance c*max(N,2)*u and the N*u rounding bound drawn (when N varies)
    grad-error-by-norm  the same, one line per normalisation layer (when `norm` varies)
    grad-norm       gradient norm against step (when arms differ in `zero_grad`)
    accuracy        test accuracy against micro-batch size, error bars over seeds
                    (when the run evaluated and the micro-batch size varies)

Panels split the figure by the swept settings a line cannot show (dtype, model...);
lines are arms, labelled with whatever else differs. Rows that differ only by
seed are drawn as their mean, with the std as a band or an error bar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: must work on a server with no display

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator  # noqa: E402

from gradlab import compare, schema  # noqa: E402
from gradlab.errors import GradlabError  # noqa: E402
from gradlab.store import Run  # noqa: E402

X_AXES = {"step": "step", "examples": "examples", "N": "accum_steps",
          "micro_batch": "micro_batch"}
DEFAULT_Y = {"step": "loss", "examples": "loss", "N": "max_rel_grad_err",
             "micro_batch": "final_test_accuracy"}
FORMATS = ("png", "svg")
LABELS = {
    "step": "optimizer step", "examples": "examples seen",
    "accum_steps": "N, micro-batches per optimizer step", "micro_batch": "micro-batch size B/N",
    "loss": "training loss", "grad_norm": "gradient norm ‖g‖",
    "max_rel_grad_err": "relative gradient error\n‖g − g_base‖ / ‖g_base‖",
    "rel_l2_err": "relative gradient error\n‖g − g_base‖ / ‖g_base‖",
    "final_test_accuracy": "test accuracy", "test_accuracy": "test accuracy",
}
# a sequential colormap per arm: lines of one arm share a hue, darker for larger N
ARM_COLORMAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "YlOrBr", "PuRd", "Greys")
ARM_DASHES = ("--", "-", "-.", ":")  # the first arm after the baseline often lies on it
PANEL_SIZE = (4.8, 3.8)
DIVERGED = 1000  # a curve this many times above the baseline's largest value has diverged


@dataclass
class Plot:
    """One figure to draw: which column goes where."""
    name: str            # file name stem, after the experiment's name
    title: str
    data: pd.DataFrame   # one row per point (per seed: drawing averages them)
    x: str
    y: str
    panels: list[str]    # columns that split the figure into panels
    lines: list[str]     # columns that split a panel into lines (arm first)
    tolerance: bool = False  # draw rel_tolerance(dtype, N) and N*u
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- data

def per_step(runs: list[Run], rows: pd.DataFrame) -> pd.DataFrame:
    """steps.csv, eval.csv and the all-parameter rows of probe.csv, joined with the settings."""
    frames = []
    for run in runs:
        keys = ["trial", "arm", "step"]
        frame = run.table("steps")
        evals = run.table("eval")
        if evals is not None:
            frame = frame.merge(evals.drop(columns="examples"), on=keys, how="left")
        probes = run.table("probe")
        if probes is not None:
            overall = probes[probes["param"] == "*"].drop(columns="param")
            frame = frame.merge(overall, on=keys, how="left")
        frames.append(frame.assign(run=run.name))
    describing = ["run", "trial", "arm", "baseline", "micro_batch", "sweep_point",
                  *compare.setting_columns(runs, rows)]
    return pd.concat(frames, ignore_index=True).merge(rows[describing],
                                                      on=["run", "trial", "arm"])


def layout(runs: list[Run], rows: pd.DataFrame, x: str, panels: list[str] | None = None
           ) -> tuple[list[str], list[str]]:
    """Panel and line columns: every setting that differs, except the x axis and the seed."""
    settings = compare.setting_columns(runs, rows)
    telling = [c for c in compare.telling(rows, settings) if c != "seed"]
    beside_x = {"accum_steps": ("accum_steps", "micro_batch", "batch_size"),
                "micro_batch": ("accum_steps", "micro_batch", "batch_size")}.get(x, ())
    if panels is None:  # curves: a panel per sweep point, lines for the arms and their N
        swept = {k for run in runs for k in run.swept_keys()}
        panels = [c for c in telling if c in swept and c not in ("accum_steps", "micro_batch")]
    panels = [c for c in panels if c in rows and (c == "arm" or c in telling)]
    lines = ["arm", *(c for c in telling if c not in panels and c not in beside_x)]
    lines = [c for c in dict.fromkeys(lines) if c not in panels]
    return panels, compare.told_apart(rows, lines, known=panels)


def curve_plot(runs, steps, y: str, x: str = "step", name: str | None = None,
               title: str | None = None) -> Plot:
    data = steps.dropna(subset=[y])
    panels, lines = layout(runs, data, x)
    label = LABELS.get(y, y.replace("_", " ")).split("\n")[0]
    return Plot(name or f"{y}-vs-{x}", title or f"{label} against {LABELS.get(x, x)}",
                data, x, y, panels, lines)


def sweep_plot(runs, rows, y: str, x: str, panels: list[str], name: str | None = None,
               title: str | None = None) -> Plot:
    tolerance = y == "max_rel_grad_err" and x == "accum_steps"
    data = rows[~rows["baseline"]] if tolerance else rows  # the baseline has no error to show
    data = data.dropna(subset=[y])
    panels, lines = layout(runs, data, x, panels)
    label = LABELS.get(y, y.replace("_", " ")).split("\n")[0]
    return Plot(name or f"{y}-vs-{'N' if x == 'accum_steps' else x}",
                title or f"{label} against {LABELS.get(x, x)}",
                data, x, y, panels, lines, tolerance)


def standard_plots(runs: list[Run]) -> list[Plot]:
    rows = compare.arm_rows(runs)
    steps = per_step(runs, rows)
    settings = compare.setting_columns(runs, rows)
    varies = set(compare.differing(rows, settings))
    dtype = ["dtype"]
    plots = [curve_plot(runs, steps, "loss", name="loss",
                        title="Training loss of each arm")]
    probed = rows[rows["max_rel_grad_err"].notna()]
    if swept_within_an_arm(probed, "accum_steps"):
        plots.append(sweep_plot(runs, rows, "max_rel_grad_err", "accum_steps", dtype,
                                name="grad-error",
                                title="Gradient error against N, at the baseline's weights"))
        if "norm" in varies:
            plots.append(sweep_plot(runs, rows, "max_rel_grad_err", "accum_steps",
                                    ["arm", *dtype], name="grad-error-by-norm",
                                    title="Gradient error against N, by normalisation layer"))
    if "zero_grad" in varies:
        plots.append(curve_plot(runs, steps, "grad_norm", name="grad-norm",
                                title="Gradient norm: where zero_grad() runs"))
    evaluated = rows[rows["final_test_accuracy"].notna()]
    if swept_within_an_arm(evaluated, "micro_batch"):
        plots.append(sweep_plot(runs, rows, "final_test_accuracy", "micro_batch", dtype,
                                name="accuracy",
                                title="Test accuracy against micro-batch size"))
    return plots


def swept_within_an_arm(rows: pd.DataFrame, column: str) -> bool:
    """Does some arm take several values of column? (Else 'against column' draws only dots.)"""
    return not rows.empty and rows.groupby("arm")[column].nunique().max() > 1


def requested_plots(runs: list[Run], ys: list[str], x: str | None) -> list[Plot]:
    """One figure per metric named with -y, against -x (default: step, or N for summaries)."""
    rows = compare.arm_rows(runs)
    steps = per_step(runs, rows)
    not_metrics = {"trial", "step", "examples", "baseline", "micro_batch", "batch_size",
                   *compare.setting_columns(runs, rows)}
    metrics = {per: [c for c in frame if c not in not_metrics
                     and pd.api.types.is_numeric_dtype(frame[c])]
               for per, frame in (("step", steps), ("summary", rows))}
    plots = []
    for y in ys or [None]:
        axis = x or ("step" if y is None or y in metrics["step"] else "N")
        per = "step" if axis in ("step", "examples") else "summary"
        y = y or DEFAULT_Y[axis]
        if y not in metrics[per]:
            raise GradlabError(
                f"-y {y}: not a metric to draw against {axis}; against step or examples: "
                f"{', '.join(metrics['step'])}; against N or micro_batch: "
                f"{', '.join(metrics['summary'])}")
        if per == "step":
            plots.append(curve_plot(runs, steps, y, X_AXES[axis]))
        else:
            plots.append(sweep_plot(runs, rows, y, X_AXES[axis], ["dtype"]))
    return plots


# ----------------------------------------------------------------------------- drawing

def line_label(key: dict, baseline: bool) -> str:
    parts = [f"{'N' if k == 'accum_steps' else k}={v}" for k, v in key.items() if k != "arm"]
    if "arm" in key:
        parts.insert(0, f"{key['arm']}{' (baseline)' if baseline else ''}")
    return ", ".join(parts)


def _tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def group_keys(frame: pd.DataFrame, columns: list[str]) -> list[tuple]:
    """The distinct values of columns, as tuples, in order of appearance."""
    return [_tuple(key) for key, _ in frame.groupby(columns, sort=False, dropna=False)]


def _order(key: tuple) -> list:
    """Sort keys with numbers as numbers (N=2 before N=16) and text as text."""
    return [(isinstance(v, str), v) for v in key]


def styles(data: pd.DataFrame, lines: list[str]) -> dict[tuple, tuple]:
    """(colour, dashes) per line. The baseline is black; each other arm has its own hue,
    darker along its lines (e.g. larger N), and its own dashes, so that an arm lying exactly
    on the baseline or on another arm still shows."""
    if "arm" not in lines or data["arm"].nunique() == 1:
        # the arms are panels, or there is one arm: lines are other settings, one colour each
        keys = sorted(group_keys(data, lines), key=_order)
        return {key: (plt.get_cmap("tab10")(i % 10), "-") for i, key in enumerate(keys)}
    out = {}
    hues, dashes = iter(ARM_COLORMAPS * 4), iter(ARM_DASHES * 8)
    for _, arm in data.groupby("arm", sort=False):
        keys = sorted(group_keys(arm, lines), key=_order)
        if arm["baseline"].iloc[0]:
            out.update({key: ((0.0, 0.0, 0.0, 1.0), "-") for key in keys})
            continue
        cmap, dash = plt.get_cmap(next(hues)), next(dashes)
        for i, key in enumerate(keys):
            out[key] = (cmap(0.75 if len(keys) == 1 else 0.45 + 0.5 * i / (len(keys) - 1)), dash)
    return out


def spans_decades(values: pd.Series) -> bool:
    positive = values[values > 0]
    # zeros (a bit-identical gradient) do not stop a log axis: they are left out, with a note
    return len(positive) > 1 and positive.max() / positive.min() > 100 and (values >= 0).all()


def draw(plot: Plot, experiment: str) -> plt.Figure:
    data = plot.data.copy()
    if data.empty:
        raise GradlabError(f"nothing to plot for {plot.y} against {plot.x}: the runs recorded "
                           f"no values of it")
    for column in plot.panels + plot.lines:  # NaN keys would fall out of groupby
        data[column] = data[column].fillna("-")
    panel_keys = group_keys(data, plot.panels) if plot.panels else [()]
    ncols = 2 if len(panel_keys) == 4 else min(3, len(panel_keys))
    nrows = -(-len(panel_keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, sharex=True,
                             figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows))
    palette = styles(data, plot.lines)
    handles: dict[str, object] = {}
    footnotes: set[str] = set()
    for ax, panel in zip(axes.flat, panel_keys, strict=False):
        part = data
        for column, value in zip(plot.panels, panel, strict=True):
            part = part[part[column] == value]
        footnotes |= draw_panel(ax, plot, part, palette, handles)
        title = [f"{k}={v}" for k, v in zip(plot.panels, panel, strict=True)]
        if plot.tolerance and part["dtype"].nunique() == 1:  # the u of the bounds drawn
            dtype = part["dtype"].iloc[0]
            if "dtype" not in plot.panels:
                title.append(f"dtype={dtype}")
            title.append(f"u = 2^{round(np.log2(schema.UNIT_ROUNDOFF[dtype]))}")
        ax.set_title(", ".join(title), fontsize=10)
    for ax in axes.flat[len(panel_keys):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(LABELS.get(plot.x, plot.x))
    for ax in axes[:, 0]:
        ax.set_ylabel(LABELS.get(plot.y, plot.y.replace("_", " ")))
    fig.suptitle(f"{experiment}: {plot.title}", fontsize=12)
    if footnotes:
        fig.text(0.01, -0.01, "\n".join(sorted(footnotes)), fontsize=8, color="0.35", va="top")
    fig.legend(list(handles.values()), list(handles), loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def draw_panel(ax, plot: Plot, part: pd.DataFrame, palette: dict, handles: dict) -> set[str]:
    """Draw one panel; returns the footnotes it needs (what a reader cannot see in it)."""
    sweep = plot.x in ("accum_steps", "micro_batch")
    log_y = plot.tolerance or spans_decades(part[plot.y])
    footnotes = set()
    arm_rank = {arm: i for i, arm in enumerate(dict.fromkeys(plot.data["arm"]))}  # spec order
    lines = [(_tuple(k), line) for k, line in part.groupby(plot.lines, dropna=False)]
    # the baseline first and wide, so arms that match it are seen lying on it
    for key, line in sorted(lines, key=lambda item: (not item[1]["baseline"].iloc[0],
                                                      arm_rank[item[1]["arm"].iloc[0]],
                                                      _order(item[0]))):
        # a lone arm is the baseline of nothing: draw it like any other line
        baseline = bool(line["baseline"].iloc[0]) and len(arm_rank) > 1
        rank = arm_rank[line["arm"].iloc[0]]
        stats = line.groupby(plot.x)[plot.y].agg(["mean", "std", "count"]).reset_index()
        if log_y and (stats["mean"] <= 0).any():
            footnotes.add("A value of exactly 0 (e.g. a bit-identical gradient) cannot be drawn "
                          "on a log axis and is left out.")
            stats = stats[stats["mean"] > 0]
        if stats.empty:
            continue
        label = line_label(dict(zip(plot.lines, key, strict=True)), baseline)
        color, dashes = palette[key]
        style = dict(color=color, ls=dashes, lw=3.5 if baseline else 1.4,
                     alpha=0.45 if baseline else 1.0,
                     # earlier arms on top: the first arm is usually the one that matches
                     zorder=1 if baseline else 3 - 0.01 * rank)
        several = bool((stats["count"] > 1).any() and stats["std"].fillna(0).gt(0).any())
        if several:
            seeds = ",".join(map(str, sorted(set(line["seed"]))))
            spread = "error bars" if sweep else "bands"
            footnotes.add(f"Lines: the mean over runs that differ only by seed (seeds {seeds}); "
                          f"{spread}: ± one standard deviation.")
        if sweep:
            handle = ax.errorbar(stats[plot.x], stats["mean"],
                                 yerr=stats["std"] if several else None, marker="o", ms=4,
                                 capsize=3, **style)
        else:
            (handle,) = ax.plot(stats[plot.x], stats["mean"], **style)
            if several:
                ax.fill_between(stats[plot.x], stats["mean"] - stats["std"],
                                stats["mean"] + stats["std"], color=color, alpha=0.15, lw=0)
        handles.setdefault(label, handle)
    if plot.tolerance:
        draw_bounds(ax, part, handles)
    if log_y:
        ax.set_yscale("log")
    if not sweep and clip_divergence(ax, part, plot.y):
        footnotes.add(f"A line that leaves the top of a panel diverged: it grew past "
                      f"{DIVERGED:g}× the baseline's largest value.")
    if sweep:
        xs = sorted(set(part[plot.x]))
        if len(xs) > 1 and xs[-1] / max(xs[0], 1) >= 4:
            ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(int(v)) for v in xs])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="major", alpha=0.3)
    return footnotes


def clip_divergence(ax, part: pd.DataFrame, y: str) -> bool:
    """Keep a diverging arm (loss 1e24, then inf) from squashing every other line flat."""
    base = part.loc[part["baseline"], y]
    finite = part[y][np.isfinite(part[y])]
    if base.empty or finite.empty or base.max() <= 0 or finite.max() <= DIVERGED * base.max():
        return False
    top, low = DIVERGED * base.max(), finite.min()
    # autoscaling saw the huge values too, so the bottom needs setting as well
    ax.set_ylim(low / 2 if ax.get_yscale() == "log" else low - 0.05 * (top - low), top)
    return True


def draw_bounds(ax, part: pd.DataFrame, handles: dict) -> None:
    """The verdict's tolerance c*max(N,2)*u and the N*u summation bound, per dtype."""
    ns = np.array(sorted(set(part["accum_steps"].astype(int))))
    dtypes = list(dict.fromkeys(part["dtype"]))
    for dtype in dtypes:
        which = f" ({dtype})" if len(dtypes) > 1 else ""  # else the panel's title says
        u = schema.UNIT_ROUNDOFF[dtype]
        tol = [schema.rel_tolerance(dtype, int(n)) for n in ns]
        (t,) = ax.plot(ns, tol, ls="-", color="firebrick", lw=1.6, zorder=4)
        (b,) = ax.plot(ns, ns * u, ls=":", color="0.25", lw=1.2, zorder=4)
        c = f"{schema.TOLERANCE_FACTOR:g}"
        handles.setdefault(f"tolerance {c}·max(N,2)·u{which}: above it, 'differs'", t)
        handles.setdefault(f"N·u, the rounding bound of summing N terms{which}", b)


# ----------------------------------------------------------------------------- files

def default_out(runs: list[Run]) -> Path:
    """One run: its figures/ folder, next to its data. Several: ./figures."""
    return runs[0].path / "figures" if len(runs) == 1 else Path("figures")


def write(runs: list[Run], out: Path | None = None, fmt: str = "png",
          ys: list[str] | None = None, x: str | None = None) -> dict[Path, str]:
    """Draw the standard figures (or the requested ones) and save them: {path: title}."""
    if fmt not in FORMATS:
        raise GradlabError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if x is not None and x not in X_AXES:
        raise GradlabError(f"-x {x}: choose one of {', '.join(X_AXES)}")
    plots = requested_plots(runs, ys or [], x) if ys or x else standard_plots(runs)
    out = out or default_out(runs)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for plot in plots:
        fig = draw(plot, runs[0].experiment)
        path = out / f"{runs[0].experiment}-{plot.name}.{fmt}"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written[path] = plot.title
    return written
