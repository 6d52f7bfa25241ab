"""Drawing a figure (matplotlib, Agg: no display needed): what a figure holds (Plot), the words
on it, each line's colour, dash and marker, the panels, the tolerance band and the bounds.

Which figures a run gets, and the data in each, is gradlab.readers.plots.
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # files only: must work on a server with no display

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator  # noqa: E402

from gradlab.errors import GradlabError  # noqa: E402
from gradlab.readers import compare  # noqa: E402
from gradlab.record.verdict import REORDER, UNIT_ROUNDOFF, Verdict  # noqa: E402

LABELS = {
    "step": "optimizer step", "examples": "examples seen",
    "accum_steps": "N, micro-batches per optimizer step", "micro_batch": "micro-batch size B/N",
    "loss": "training loss", "grad_norm": "gradient norm ‖g‖",
    "max_rel_grad_err": "relative gradient error\n‖g − g_base‖ / ‖g_base‖",
    "rel_l2_err": "relative gradient error\n‖g − g_base‖ / ‖g_base‖",
    "max_exact_err": "distance from the exact gradient\n‖g − g_exact‖ / ‖g_exact‖",
    "exact_err": "distance from the exact gradient\n‖g − g_exact‖ / ‖g_exact‖",
    "final_test_accuracy": "test accuracy", "test_accuracy": "test accuracy",
    "test_loss": "test loss", "value": "value", "amount": "",
    "applied_lr": "learning rate the step applied",
}
# errors and distances: drawn on a log axis, where 1e-16 and 1 can both be read
ERROR_METRICS = ("max_rel_grad_err", "rel_l2_err", "max_abs_grad_err", "max_abs_err",
                 "max_exact_err", "exact_err", "exact_floor", "floor_err",
                 "max_rel_loss_diff", "rel_loss_diff", "max_rel_buffer_diff")
# a schedule is read on a linear axis: its 0 (the schedule's end) must show
LINEAR_METRICS = ("applied_lr",)
NORMS = {"bn": "BatchNorm", "gn": "GroupNorm", "ln": "LayerNorm", "in": "InstanceNorm",
         "none": "no norm"}
NORM_COLORS = {"bn": "tab:blue", "gn": "tab:orange", "ln": "tab:green", "in": "tab:purple",
               "none": "tab:gray"}  # BatchNorm with frozen statistics: tab:cyan
# when lines differ only by arm and numbers (N, lr...): a hue per arm, darker for larger values
ARM_COLORMAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "YlOrBr", "PuRd", "Greys")
# when lines differ by something named (norm, model...): a colour per name, a style per arm
ARM_DASHES = ("--", "-", "-.", ":")  # the first arm after the baseline often lies on it
ARM_MARKERS = ("o", "s", "^", "v", "P", "X")
BASELINE_COLOR = (0.0, 0.0, 0.0, 1.0)
FEW_POINTS = 15  # a line with this many points or fewer gets markers
PANEL_SIZE = (4.8, 3.8)
TITLE_WIDTH = 55  # characters of a panel title per line: longer ones wrap, not overlap
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
    tolerance: bool = False  # draw rel_tolerance(dtype, N) and N*u, shade what is equivalent
    annotate: bool = False   # write each point's value next to it (a toy's few numbers)
    held: bool = False       # a value holds until the next point: draw steps, not slopes
    bound: bool = False      # draw each line's exact_floor + accum_bound as a thin line
    arm_styles: dict[str, Style] = field(default_factory=dict)  # lines = ["arm"]: set styles
    log_y: bool = False      # a log y axis whatever the values span (proportions read as slopes)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- words

def word(column: str, value) -> str:
    """One setting's value as a legend or a title says it: "GroupNorm", "N = 4"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = compare.fmt(value)
    if column == "norm":
        return NORMS.get(value, text)
    if column in ("arm", "model", "dtype", "dataset", "optimizer", "quantity"):
        return text
    named = {"accum_steps": "N = {}", "micro_batch": "micro-batch {}", "batch_size": "B = {}",
             "zero_grad": "zero_grad {}", "set_to_none": "set_to_none={}", "seed": "seed {}",
             "loss_scale": "loss scale {}", "precision": "computed in {}"}
    return named.get(column, column.replace("_", " ") + " {}").format(text)


def words(key: dict) -> str:
    """A line's or a panel's settings in words: "BatchNorm, frozen statistics, float32"."""
    parts = []
    for column, value in key.items():
        if column == "bn_mode":  # says something only about BatchNorm
            if key.get("norm", "bn") == "bn":
                parts.append("frozen statistics" if value == "frozen" else "batch statistics")
        elif column == "dropout_mode":
            parts.append(f"dropout in {value} mode")
        elif column == "dropout_masks":  # says something only while dropout drops
            if key.get("dropout_mode", "train") == "train":
                parts.append("nn.Dropout's masks" if value == "stream" else "per-example masks")
        elif column == "mask_draws":  # a check the run made, not how it trained
            continue
        elif value != "-":  # "-": a setting this row does not have
            parts.append(word(column, value))
    return ", ".join(parts)


def arm_label(arm: str, baseline: bool) -> str:
    return f"{arm} (baseline)" if baseline else arm


# ----------------------------------------------------------------------------- styles

@dataclass(frozen=True)
class Style:
    color: tuple | str
    dashes: str = "-"
    marker: str | None = "o"
    baseline: bool = False  # drawn wide and pale under the others, or as a lone marker


def _tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def group_keys(frame: pd.DataFrame, columns: list[str]) -> list[tuple]:
    """The distinct values of columns, as tuples, in order of appearance."""
    return [_tuple(key) for key, _ in frame.groupby(columns, sort=False, dropna=False)]


def _order(key: tuple) -> list:
    """Sort keys with numbers as numbers (N=2 before N=16) and text as text."""
    return [(isinstance(v, str), v) for v in key]


def named_columns(data: pd.DataFrame, lines: list[str]) -> list[str]:
    """The line columns other than arm that hold names (norm, model), not numbers (N, lr)."""
    return [c for c in lines if c != "arm" and not pd.api.types.is_numeric_dtype(data[c])]


def name_colour(values: dict, index: int):
    """A name's colour: each normalisation layer has its own in every figure, others in turn."""
    if set(values) <= {"norm", "bn_mode"} and values.get("norm") in NORM_COLORS:
        frozen = values.get("norm") == "bn" and values.get("bn_mode") == "frozen"
        return "tab:cyan" if frozen else NORM_COLORS[values["norm"]]
    return plt.get_cmap("tab10")(index % 10)


def line_words(line: dict, micro_batch) -> str:
    """A line's settings in words, with the micro-batch size its N gives: "N = 4, micro-batch 8"."""
    if "accum_steps" in line and "micro_batch" not in line and micro_batch is not None:
        line = {**line, "micro_batch": micro_batch}
    return words(line)


def styles(data: pd.DataFrame, lines: list[str], markers: bool, sweep: bool
           ) -> tuple[dict[tuple, Style], dict[str, object]]:
    """A style per line (keyed like group_keys), and the legend that explains them.

    Lines that differ by a name (norm, model...) get a colour per name and a style per arm;
    lines that differ only by arm and numbers (N, lr...) get a hue per arm, darker for
    larger numbers. The legend pictures a line as drawn: with markers only if the figure has
    them, and the baseline of a sweep as the lone marker it is there.
    """
    keys = sorted(group_keys(data, lines), key=_order)
    arms = list(dict.fromkeys(data["arm"])) if "arm" in lines else []
    # a lone arm is the baseline of nothing: it is drawn as an ordinary line
    baselines = set(data.loc[data["baseline"].astype(bool), "arm"]) if len(arms) > 1 else set()
    named = named_columns(data, lines) if arms else list(lines)
    if named:
        out, legend = styles_by_name(keys, lines, named, arms, baselines)
    else:
        out, legend = styles_by_arm(data, keys, lines, arms, baselines)

    def drawn(style: Style) -> Line2D:
        return proxy(Style(style.color, "none" if style.baseline and sweep else style.dashes,
                           style.marker if markers or (style.baseline and sweep) else None,
                           style.baseline))

    return out, {label: drawn(entry) if isinstance(entry, Style) else entry
                 for label, entry in legend.items()}


def styles_by_name(keys: list[tuple], lines: list[str], named: list[str], arms: list[str],
                   baselines: set[str]) -> tuple[dict[tuple, Style], dict[str, object]]:
    """A colour per name, the same in every panel and for every arm; dashes and a marker per
    arm. The legend lists each name (a colour) and each arm (a style, in black) once."""
    others = [arm for arm in arms if arm not in baselines]
    colours: dict[tuple, object] = {}
    out: dict[tuple, Style] = {}
    legend: dict[str, object] = {}
    for key in keys:
        line = dict(zip(lines, key, strict=True))
        names = {c: v for c, v in line.items() if c in named}
        colour = colours.setdefault(tuple(names.values()), name_colour(names, len(colours)))
        arm = line.get("arm")
        if arm in baselines:
            out[key] = Style(colour, "-", "D", baseline=True)
        elif arm in others and len(others) > 1:
            rank = others.index(arm)
            out[key] = Style(colour, ARM_DASHES[rank % len(ARM_DASHES)],
                             ARM_MARKERS[rank % len(ARM_MARKERS)])
        else:
            out[key] = Style(colour)
        legend.setdefault(words(names), Line2D([], [], color=colour, lw=2.5))
    if len(arms) > 1:  # the arms' styles, after the colours
        for arm in arms:
            style = next(s for k, s in out.items() if k[0] == arm)
            legend[arm_label(arm, arm in baselines)] = dataclasses.replace(
                style, color=BASELINE_COLOR)
    return out, legend


def styles_by_arm(data: pd.DataFrame, keys: list[tuple], lines: list[str], arms: list[str],
                  baselines: set[str]) -> tuple[dict[tuple, Style], dict[str, object]]:
    """The baseline black; each other arm its own hue and dashes, darker along its lines
    (larger N); a lone arm's lines a perceptual sequence. A legend entry per line."""
    lone = len(arms) == 1
    micro = {_tuple(k): v.iloc[0] for k, v in data.groupby(lines, sort=False)["micro_batch"]
             } if "micro_batch" in data and data["micro_batch"].notna().all() else {}
    hues, dashes = iter(ARM_COLORMAPS * 4), iter(ARM_DASHES * 8)
    out: dict[tuple, Style] = {}
    legend: dict[str, object] = {}
    for arm in arms:
        arm_keys = [k for k in keys if k[0] == arm]
        if arm in baselines:
            cmap, dash = None, "-"
        elif lone:
            cmap, dash = plt.get_cmap("viridis"), "-"
        else:
            cmap, dash = plt.get_cmap(next(hues)), next(dashes)
        for i, key in enumerate(arm_keys):
            along = i / (len(arm_keys) - 1) if len(arm_keys) > 1 else None
            if cmap is None:
                out[key] = Style(BASELINE_COLOR, "-", "D", baseline=True)
            elif lone:
                out[key] = Style(cmap(0.0 if along is None else 0.85 * along), dash)
            else:
                out[key] = Style(cmap(0.75 if along is None else 0.45 + 0.5 * along), dash)
            settings = line_words(dict(zip(lines[1:], key[1:], strict=True)), micro.get(key))
            # a lone arm is named in the title, not on every line
            label = settings if lone and settings else ", ".join(
                p for p in (arm_label(arm, arm in baselines), settings) if p)
            legend.setdefault(label, out[key])
    return out, legend


# how an arm sums and computes -> its line: the same role looks the same in every panel
PRECISION_STYLES = {
    "float32": Style("black", ":", "o"),
    "native": Style("tab:orange", "-", "o"),
    "float32 buffer": Style("tab:green", "--", "s"),
    "autocast": Style("tab:blue", "-.", "^"),
    "clip before unscale": Style("tab:red", ":", "X"),
}


def precision_style(arm: pd.Series) -> Style:
    if arm.get("clip_at") == "before-unscale":
        return PRECISION_STYLES["clip before unscale"]
    if arm.get("grad_accum_dtype") == "float32" and arm["dtype"] != "float32":
        return PRECISION_STYLES["float32 buffer"]
    if arm.get("autocast", "none") != "none":
        return PRECISION_STYLES["autocast"]
    return PRECISION_STYLES["native" if arm["precision"] != "float32" else "float32"]


def line_kwargs(style: Style, rank: int) -> dict:
    return dict(color=style.color, ls=style.dashes, lw=3.5 if style.baseline else 1.4,
                alpha=0.45 if style.baseline else 1.0,
                # earlier arms on top: the first arm is usually the one that matches
                zorder=1 if style.baseline else 3 - 0.01 * rank)


def proxy(style: Style) -> Line2D:
    """A legend entry drawn in this style."""
    if style.baseline and style.dashes == "none":  # the baseline's lone marker in a sweep
        return Line2D([], [], ls="none", marker="D", ms=7, mec="black", color="0.4")
    return Line2D([], [], marker=style.marker, ms=5, **line_kwargs(style, 0))


# ----------------------------------------------------------------------------- drawing

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
        if data[column].isna().any():
            data[column] = data[column].astype(object).fillna("-")
    panel_keys = group_keys(data, plot.panels) if plot.panels else [()]
    ncols = 2 if len(panel_keys) == 4 else min(3, len(panel_keys))
    nrows = -(-len(panel_keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, sharex=True,
                             figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows))
    sweep = plot.x in ("accum_steps", "micro_batch")
    points = data.groupby([*plot.panels, *plot.lines], dropna=False)[plot.x].nunique().max()
    markers = sweep or points <= FEW_POINTS
    palette, legend = styles(data, plot.lines, markers, sweep)
    if plot.arm_styles:
        palette = {(arm,): style for arm, style in plot.arm_styles.items()}
        legend = {arm: proxy(style) for arm, style in plot.arm_styles.items()
                  if arm in set(data["arm"])}
    footnotes: set[str] = set()
    title_lines = 1
    for ax, panel in zip(axes.flat, panel_keys, strict=False):
        part = data
        for column, value in zip(plot.panels, panel, strict=True):
            part = part[part[column] == value]
        footnotes |= draw_panel(ax, plot, part, palette, legend, markers)
        title = [words(dict(zip(plot.panels, panel, strict=True)))]
        if (plot.tolerance or plot.bound) and part["precision"].nunique() == 1:  # the bounds' u
            dtype = part["precision"].iloc[0]
            if "dtype" not in plot.panels and "precision" not in plot.panels:
                title.append(dtype)
            title.append(f"u = 2^{round(np.log2(UNIT_ROUNDOFF[dtype]))}")
        title = textwrap.fill(", ".join(t for t in title if t), TITLE_WIDTH)
        title_lines = max(title_lines, title.count("\n") + 1)
        ax.set_title(title, fontsize=10)
    for ax in axes.flat[len(panel_keys):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(LABELS.get(plot.x, plot.x))
    for ax in axes[:, 0]:
        ax.set_ylabel(LABELS.get(plot.y, plot.y.replace("_", " ")))
    fig.suptitle(f"{experiment}: {plot.title}", fontsize=12)
    if footnotes:
        fig.text(0.01, -0.01, "\n".join(sorted(footnotes)), fontsize=8, color="0.35", va="top")
    fig.legend(list(legend.values()), list(legend), loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    # room for the figure's title above the panels' (0.17 inch a wrapped line)
    fig.subplots_adjust(top=1 - (0.55 + 0.17 * (title_lines - 1)) / fig.get_figheight())
    return fig


def draw_panel(ax, plot: Plot, part: pd.DataFrame, palette: dict, legend: dict,
               markers: bool) -> set[str]:
    """Draw one panel; returns the footnotes it needs (what a reader cannot see in it)."""
    sweep = plot.x in ("accum_steps", "micro_batch")
    positive = part[plot.y][part[plot.y] > 0]
    log_y = plot.log_y or (plot.y not in LINEAR_METRICS and (
        plot.tolerance or spans_decades(part[plot.y]) or (
            plot.y in ERROR_METRICS and not positive.empty and (part[plot.y] >= 0).all())))
    footnotes = set()
    arm_rank = {arm: i for i, arm in enumerate(dict.fromkeys(plot.data["arm"]))}  # spec order
    lines = [(_tuple(k), line) for k, line in part.groupby(plot.lines, dropna=False)]
    labelled: set[tuple] = set()
    # error bars at the same x hide each other: shift each line a little sideways
    bars = sweep and bool(part.groupby([*plot.lines, plot.x], dropna=False)[plot.y].std()
                          .fillna(0).gt(0).any())
    # the baseline first and wide, so arms that match it are seen lying on it
    for i, (key, line) in enumerate(sorted(lines, key=lambda item: (
            not palette[item[0]].baseline, arm_rank[item[1]["arm"].iloc[0]],
            _order(item[0])))):
        style = palette[key]
        stats = line.groupby(plot.x)[plot.y].agg(["mean", "std", "count"]).reset_index()
        if log_y and (stats["mean"] <= 0).any():
            footnotes.add("A value of exactly 0 (e.g. a bit-identical gradient) cannot be drawn "
                          "on a log axis and is left out.")
            stats = stats[stats["mean"] > 0]
        if stats.empty:
            continue
        kwargs = line_kwargs(style, arm_rank[line["arm"].iloc[0]])
        several = bool((stats["count"] > 1).any() and stats["std"].fillna(0).gt(0).any())
        if several:
            seeds = ",".join(map(str, sorted(set(line["seed"]))))
            spread = "error bars" if sweep else "bands"
            footnotes.add(f"Lines: the mean over runs that differ only by seed (seeds {seeds}); "
                          f"{spread}: ± one standard deviation.")
        if style.baseline and sweep and len(stats) == 1:
            # the baseline at its one N: a marker, not a line of one point
            ax.errorbar(stats[plot.x], stats["mean"], yerr=stats["std"] if several else None,
                        marker="D", ms=8, mec="black", mew=1, color=style.color, ls="none",
                        capsize=3, zorder=5)
        elif sweep:
            shift = 2 ** (0.04 * (i - (len(lines) - 1) / 2)) if bars else 1
            ax.errorbar(stats[plot.x] * shift, stats["mean"],
                        yerr=stats["std"] if several else None, marker=style.marker, ms=4.5,
                        capsize=3, **kwargs)
        else:
            ax.plot(stats[plot.x], stats["mean"], marker=style.marker if markers else None,
                    ms=7 if style.baseline else 4.5,
                    drawstyle="steps-post" if plot.held else "default", **kwargs)
            if several:
                ax.fill_between(stats[plot.x], stats["mean"] - stats["std"],
                                stats["mean"] + stats["std"], color=style.color, alpha=0.15,
                                lw=0)
        if plot.annotate:
            for x, y in zip(stats[plot.x], stats["mean"], strict=True):
                if (x, round(y, 9)) not in labelled:  # arms that agree share one label
                    labelled.add((x, round(y, 9)))
                    ax.annotate(f"{y:.4g}", (x, y), textcoords="offset points", xytext=(6, 4),
                                fontsize=8, color="0.2")
    if log_y:
        ax.set_yscale("log")
    if sweep:
        sweep_axis(ax, sorted(set(part[plot.x])))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if plot.tolerance:
        draw_tolerance(ax, plot, part, legend)
    if plot.bound:
        draw_bounds(ax, part, palette, legend)
    if not sweep and clip_divergence(ax, part, plot.y):
        footnotes.add(f"A line that leaves the top of a panel diverged: it grew past "
                      f"{DIVERGED:g}× the baseline's largest value.")
    if plot.annotate:
        ax.margins(x=0.15, y=0.15)  # room for the numbers
    ax.grid(True, which="major", alpha=0.3)
    return footnotes


def sweep_axis(ax, xs: list) -> None:
    """Ticks at the swept values only; log base 2 when they double (N = 1, 2, 4...). Every
    value keeps its place, even one whose points a log y axis had to leave out (an error of 0
    at N = 1), so the tolerance is drawn from N = 1 on."""
    if len(xs) > 1 and xs[-1] / max(xs[0], 1) >= 4:
        ax.set_xscale("log", base=2)
        ax.set_xlim(xs[0] / 2**0.3, xs[-1] * 2**0.3)
    else:
        margin = 0.05 * (xs[-1] - xs[0]) or 0.5
        ax.set_xlim(xs[0] - margin, xs[-1] + margin)
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(int(v)) for v in xs])


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


def draw_tolerance(ax, plot: Plot, part: pd.DataFrame, legend: dict) -> None:
    """The verdict's tolerance as a labelled line, the region under it shaded
    ("equivalent"), and the measured floor (the baseline's own rounding), per dtype.

    Both come from the run's summary rows (the tolerance is measured, see record/verdict.py):
    at each N the largest of the panel's rows. Against steps they are drawn only when
    every line of the panel has the same dtype and N, so that one tolerance holds.
    """
    if "rel_tolerance" not in part or part["rel_tolerance"].isna().all():
        return
    pairs = part[["precision", "accum_steps"]].drop_duplicates()
    if plot.x != "accum_steps" and len(pairs) != 1:
        return
    ax.autoscale_view()
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    dtypes = list(dict.fromkeys(pairs["precision"]))
    for dtype in dtypes:
        rows = part[part["precision"] == dtype].groupby("accum_steps")
        ns = np.array(sorted(int(n) for n in rows.groups))
        tol = rows["rel_tolerance"].max().loc[ns].to_numpy()
        floor = rows["exact_floor"].max().loc[ns].to_numpy()
        if plot.x == "accum_steps":
            xs = np.concatenate([[left], ns, [right]])  # flat beyond the first and last N
            tol = np.concatenate([[tol[0]], tol, [tol[-1]]])
            floor = np.concatenate([[floor[0]], floor, [floor[-1]]])
        else:
            xs = np.array([left, right])
            tol, floor = np.full(2, tol[0]), np.full(2, floor[0])
        which = f" ({dtype})" if len(dtypes) > 1 else ""  # else the panel's title says
        ax.fill_between(xs, bottom, tol, color="tab:green", alpha=0.09, lw=0, zorder=0)
        ax.plot(xs, tol, ls="-", color="firebrick", lw=1.6, zorder=4)
        ax.annotate(f"tolerance{which}", (xs[1], tol[1]), textcoords="offset points",
                    xytext=(0, 4), va="bottom", fontsize=8, color="firebrick")
        ax.annotate(str(Verdict.EQUIVALENT), (xs[1], tol[1]), textcoords="offset points",
                    xytext=(0, -4), va="top", fontsize=8, color="darkgreen")
        if (floor > 0).any():
            ax.plot(xs, floor, ls=":", color="0.25", lw=1.2, zorder=4)
            ax.annotate(f"floor{which}", (xs[-2], floor[-2]), textcoords="offset points",
                        xytext=(0, 3), ha="right", fontsize=8, color="0.25")
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    legend.setdefault(f"under the tolerance, floor + (N−1)·u + {REORDER}·u_acc: "
                      f"'{Verdict.EQUIVALENT}'",
                      plt.Rectangle((0, 0), 1, 1, color="tab:green", alpha=0.2, lw=0))
    legend.setdefault("floor: the big batch's own distance from the exact gradient",
                      Line2D([], [], ls=":", color="0.25", lw=1.2))


def draw_bounds(ax, part: pd.DataFrame, palette: dict, legend: dict) -> None:
    """Each arm's floor + (N−1)·u·‖Σ|g_i|‖/‖g‖, thin, in the arm's colour: where summing its N
    partial gradients in its precision could take it, to first order."""
    for key, line in part.groupby(["arm"], sort=False):
        ceiling = (line["exact_floor"] + line["accum_bound"]).groupby(line["accum_steps"]).max()
        ceiling = ceiling[ceiling > 0]
        if not ceiling.empty:
            ax.plot(ceiling.index, ceiling.to_numpy(), color=palette[_tuple(key)].color,
                    lw=0.8, alpha=0.6, zorder=2)
    legend.setdefault("thin line: the arm's floor + (N−1)·u·‖Σ|g_i|‖/‖g‖, what summing its N "
                      "partial gradients may add", Line2D([], [], color="0.4", lw=0.8))


