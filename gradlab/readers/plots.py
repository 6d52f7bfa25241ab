"""Figures from the CSVs of finished runs (matplotlib, Agg: no display needed).

Which figures a run gets depends on what it recorded, not on its name:

    loss        training loss of every arm, overlaid (unless every arm made one step)
    trace       the accumulated .grad after each micro-batch backward and the weights after
                each step (runs with trace = true on a model of a few weights, like the toy)
    grad-error  relative gradient error against N, log axis, with the dtype's tolerance
                c*max(N,2)*u as a labelled line over a shaded "equivalent" region, and the
                N*u rounding bound (when N varies)
    precision   in its place when the arms compute in different precisions (or sum in a
                float32 buffer): the distance from the exact gradient against N, a panel per
                precision, each arm with its floor + bound (N-1)*u*‖Σ|g_i|‖/‖g‖ as a thin line
    grad-norm   gradient norm (when arms differ in `zero_grad`)
    cost        time per example and activation memory against micro-batch size (runs with
                cost = true whose micro-batch size varies: the cost experiment)
    lr          the learning rate each step applied (when an arm's changes: a schedule;
                steps.csv's lr, drawn as applied_lr beside the setting lr)
    held-out    held-out accuracy (or loss) during training (when eval.csv has a curve)
    accuracy    final held-out accuracy against micro-batch size, error bars over seeds
                (when the micro-batch size varies)

Curves run against optimizer steps, or against examples seen when the arms' batch
sizes differ (a step of 16 examples is not a step of 64). Panels split the figure by
the swept settings a line cannot show (dtype, model...); lines are arms, labelled in
words with whatever else differs. Rows that differ only by seed are drawn as their
mean, with the std as a band or an error bar.
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: must work on a server with no display

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator  # noqa: E402

from gradlab.errors import GradlabError  # noqa: E402
from gradlab.readers import compare
from gradlab.record import schema  # noqa: E402
from gradlab.record.store import Run  # noqa: E402

X_AXES = {"step": "step", "examples": "examples", "N": "accum_steps",
          "micro_batch": "micro_batch"}
DEFAULT_Y = {"step": "loss", "examples": "loss", "N": "max_exact_err",
             "micro_batch": "final_test_accuracy"}
FORMATS = ("png", "svg")
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
# what the verdict judges: its tolerance is drawn with them
RELATIVE_ERRORS = ("max_exact_err", "exact_err")
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
TRACE_ELEMENTS = 3  # draw the trace of a model with at most this many weights
PANEL_SIZE = (4.8, 3.8)
TITLE_WIDTH = 55  # characters of a panel title per line: longer ones wrap, not overlap
DIVERGED = 1000  # a curve this many times above the baseline's largest value has diverged
# DejaVu Sans ships with matplotlib and has every glyph used here (‖ − · ×): the figures look
# the same on every machine, and no fallback font (a CJK one, say) is searched or warned about
RC = {"font.family": "DejaVu Sans", "svg.hashsalt": "gradlab", "svg.fonttype": "path"}


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


# ----------------------------------------------------------------------------- data

def with_settings(frames: list[pd.DataFrame], runs: list[Run], rows: pd.DataFrame
                  ) -> pd.DataFrame:
    """Per-run tables (with a `run` column) as one, each row joined with its arm's settings."""
    describing = ["run", "trial", "arm", "baseline", "micro_batch", "sweep_point", "precision",
                  *compare.setting_columns(runs, rows)]
    return pd.concat(frames, ignore_index=True).merge(rows[describing],
                                                      on=["run", "trial", "arm"])


def per_step(runs: list[Run], rows: pd.DataFrame) -> pd.DataFrame:
    """steps.csv, eval.csv and the all-parameter rows of probe.csv, joined with the settings."""
    frames = []
    for run in runs:
        keys = ["trial", "arm", "step"]
        # steps.csv's lr (what each step applied) is not the setting lr (the arm's base rate)
        frame = run.table("steps").rename(columns={"lr": "applied_lr"})
        evals = run.table("eval")
        if evals is not None:
            frame = frame.merge(evals.drop(columns="examples"), on=keys, how="left")
        probes = run.table("probe")
        if probes is not None:
            # the learning rate is steps.csv's (the probe's copy is for the verdict)
            overall = probes[probes["param"] == "*"].drop(columns=["param", "lr", "ref_lr"],
                                                          errors="ignore")
            frame = frame.merge(overall, on=keys, how="left")
        frames.append(frame.assign(run=run.name))
    return with_settings(frames, runs, rows)


def per_eval(runs: list[Run], rows: pd.DataFrame) -> pd.DataFrame | None:
    """eval.csv joined with the settings; None when no run evaluated."""
    frames = [run.table("eval").assign(run=run.name) for run in runs
              if run.table("eval") is not None]
    if not frames:
        return None
    return with_settings(frames, runs, rows)


def examples_after(step: pd.Series, micro_batch: pd.Series, batch_size: pd.Series,
                   accum_steps: pd.Series) -> pd.Series:
    """Examples seen after micro-batch m of a step: the engine splits B like torch.tensor_split,
    so the first B mod N micro-batches hold one example more."""
    size, extra = batch_size // accum_steps, batch_size % accum_steps
    return (step - 1) * batch_size + micro_batch * size + np.minimum(micro_batch, extra)


def per_trace(runs: list[Run], rows: pd.DataFrame) -> pd.DataFrame | None:
    """trace.csv and weights.csv as one long table: `quantity` (e.g. "weight[0].grad") and
    its `value` against examples seen; None without a trace or with too many weights to draw."""
    frames = []
    for run in runs:
        trace, weights = run.table("trace"), run.table("weights")
        if trace is None or weights is None or \
                len(trace[["param", "element"]].drop_duplicates()) > TRACE_ELEMENTS:
            continue  # a trace of many weights is data to read, not a figure
        sizes = rows.loc[rows["run"] == run.name, ["trial", "arm", "batch_size", "accum_steps"]]
        trace = trace.merge(sizes, on=["trial", "arm"])
        weights = weights.merge(sizes, on=["trial", "arm"])
        frames += [
            pd.DataFrame({"trial": trace["trial"], "arm": trace["arm"], "run": run.name,
                          "quantity": trace["param"] + "[" + trace["element"].astype(str)
                          + "].grad after each backward",
                          "examples": examples_after(trace["step"], trace["micro_batch"],
                                                     trace["batch_size"], trace["accum_steps"]),
                          "value": trace["grad"]}),
            pd.DataFrame({"trial": weights["trial"], "arm": weights["arm"], "run": run.name,
                          "quantity": weights["param"] + "[" + weights["element"].astype(str)
                          + "] after each optimizer step",
                          "examples": weights["step"] * weights["batch_size"],
                          "value": weights["value"]})]
    if not frames:
        return None
    return with_settings(frames, runs, rows)


def layout(runs: list[Run], rows: pd.DataFrame, x: str, panels: list[str] | None = None
           ) -> tuple[list[str], list[str]]:
    """Panel and line columns: every setting that differs, except the x axis and the seed."""
    settings = compare.setting_columns(runs, rows)
    telling = [c for c in compare.telling(rows, settings) if c != "seed"]
    beside_x = {"accum_steps": ("accum_steps", "micro_batch", "batch_size"),
                "micro_batch": ("accum_steps", "micro_batch", "batch_size"),
                # examples seen already tells the batch sizes apart: lines need not
                "examples": ("batch_size", "micro_batch")}.get(x, ())
    if panels is None:  # curves: a panel per sweep point, lines for the arms and their N
        swept = {k for run in runs for k in run.swept_keys()}
        panels = [c for c in telling if c in swept and c not in ("accum_steps", "micro_batch")]
    panels = [c for c in panels if c in rows and (c == "arm" or c in telling)]
    lines = ["arm", *(c for c in telling if c not in panels and c not in beside_x)]
    lines = [c for c in dict.fromkeys(lines) if c not in panels]
    return panels, compare.told_apart(rows, lines, known=panels)


def curve_plot(runs, data: pd.DataFrame, y: str, x: str = "step", name: str | None = None,
               title: str | None = None) -> Plot:
    tolerance = y in RELATIVE_ERRORS
    if tolerance:  # the baseline's error against itself is 0: nothing to show
        data = data[~data["baseline"]]
    data = data.dropna(subset=[y])
    panels, lines = layout(runs, data, x)
    label = LABELS.get(y, y.replace("_", " ")).split("\n")[0]
    return Plot(name or f"{y}-vs-{x}", title or f"{label} against {LABELS.get(x, x)}",
                data, x, y, panels, lines, tolerance)


def sweep_plot(runs, rows, y: str, x: str, panels: list[str], name: str | None = None,
               title: str | None = None) -> Plot:
    tolerance = y in RELATIVE_ERRORS and x == "accum_steps"
    data = rows[~rows["baseline"]] if tolerance else rows  # the baseline has no error to show
    data = data.dropna(subset=[y])
    panels, lines = layout(runs, data, x, panels)
    label = LABELS.get(y, y.replace("_", " ")).split("\n")[0]
    return Plot(name or f"{y}-vs-{'N' if x == 'accum_steps' else x}",
                title or f"{label} against {LABELS.get(x, x)}",
                data, x, y, panels, lines, tolerance)


def precision_plot(runs: list[Run], rows: pd.DataFrame) -> Plot:
    """Arms in different precisions: a panel per precision (and per swept model...), so each
    arm is read against the floor of its own precision and the bound of its own u. Arms are
    styled by how they sum and compute, so a native arm and its float32-buffer twin, side
    by side in a panel, read as such in every panel."""
    data = rows[~rows["baseline"]].dropna(subset=["max_exact_err"])
    panels, _ = layout(runs, data, "accum_steps")
    arms = data.drop_duplicates("arm").set_index("arm")
    return Plot("precision", "Distance from the exact gradient against N, by precision", data,
                "accum_steps", "max_exact_err", [*panels, "precision"], ["arm"], bound=True,
                arm_styles={arm: precision_style(row) for arm, row in arms.iterrows()})
# what the cost figure draws, in its panels' words
COSTS = {"example_us": "time per example (µs)",
         "activation_mb": "activations saved for backward (MB)"}


def cost_plot(runs: list[Run], rows: pd.DataFrame) -> Plot:
    """Time per example and activation memory against micro-batch size, a line per setup
    (the cost experiment): one falls as the other rises."""
    measured = rows.dropna(subset=list(COSTS))
    data = pd.concat([measured.assign(quantity=label, amount=measured[column])
                      for column, label in COSTS.items()], ignore_index=True)
    _, lines = layout(runs, data, "micro_batch", panels=[])
    return Plot("cost", "What accumulation costs and saves, against micro-batch size", data,
                "micro_batch", "amount", ["quantity"], lines, log_y=True)


def trace_plot(runs: list[Run], trace: pd.DataFrame) -> Plot:
    panels, lines = layout(runs, trace, "examples")
    return Plot("trace", "The accumulated .grad after each backward, and the weights",
                trace, "examples", "value", ["quantity", *panels], lines, annotate=True, held=True)


def step_axis(rows: pd.DataFrame) -> str:
    """Steps, or examples seen when the arms' batch sizes differ."""
    return "examples" if rows["batch_size"].nunique() > 1 else "step"


def standard_plots(runs: list[Run]) -> list[Plot]:
    rows = compare.arm_rows(runs)
    steps = per_step(runs, rows)
    settings = compare.setting_columns(runs, rows)
    varies = set(compare.differing(rows, settings))
    x = step_axis(rows)
    plots = []
    trace = per_trace(runs, rows)
    if trace is None or steps.groupby(["run", "trial", "arm"]).size().max() > 1:
        # one step is one point per arm: the trace tells it, a loss "curve" would not
        plots.append(curve_plot(runs, steps, "loss", x, name="loss",
                                title="Training loss of each arm"))
    if trace is not None:
        plots.append(trace_plot(runs, trace))
    judged = "max_exact_err" if "max_exact_err" in rows else "max_rel_grad_err"  # old runs
    probed = rows[rows[judged].notna()]
    if swept_within_an_arm(probed, "accum_steps") and compare.mixed_precision(rows) \
            and "accum_bound" in rows:
        plots.append(precision_plot(runs, rows))
    elif swept_within_an_arm(probed, "accum_steps"):
        plots.append(sweep_plot(runs, rows, judged, "accum_steps", ["dtype"],
                                name="grad-error",
                                title="Gradient error against N, at the baseline's weights"))
    if "zero_grad" in varies:
        plots.append(curve_plot(runs, steps, "grad_norm", x, name="grad-norm",
                                title="Gradient norm: where zero_grad() runs"))
    if "applied_lr" in steps and \
            steps.groupby(["run", "trial", "arm"])["applied_lr"].nunique().max() > 1:
        plots.append(curve_plot(runs, steps, "applied_lr", x, name="lr",
                                title="Learning rate each step applied"))
    evals = per_eval(runs, rows)
    # a curve: one evaluation at the end is in the table (and in the accuracy figure)
    if evals is not None and evals.groupby(["run", "trial", "arm"]).size().max() > 1:
        y = "test_accuracy" if evals["test_accuracy"].notna().any() else "test_loss"
        plots.append(curve_plot(runs, evals, y, x, name="held-out",
                                title=f"Held-out {LABELS[y]} during training"))
    if "activation_mb" in rows and swept_within_an_arm(
            rows.dropna(subset=["activation_mb"]), "micro_batch"):
        plots.append(cost_plot(runs, rows))
    evaluated = rows[rows["final_test_accuracy"].notna()]
    if swept_within_an_arm(evaluated, "micro_batch"):
        plots.append(sweep_plot(runs, rows, "final_test_accuracy", "micro_batch", ["dtype"],
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
        if y == "lr" and "applied_lr" in metrics["step"]:  # steps.csv's lr, as -y names it
            axis = x or "step"
            if axis in ("step", "examples"):
                plots.append(curve_plot(runs, steps, "applied_lr", X_AXES[axis],
                                        name=f"lr-vs-{X_AXES[axis]}"))
                continue
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
            title.append(f"u = 2^{round(np.log2(schema.UNIT_ROUNDOFF[dtype]))}")
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

    Both come from the run's summary rows (the tolerance is measured, see schema.py):
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
        ax.annotate("equivalent", (xs[1], tol[1]), textcoords="offset points",
                    xytext=(0, -4), va="top", fontsize=8, color="darkgreen")
        if (floor > 0).any():
            ax.plot(xs, floor, ls=":", color="0.25", lw=1.2, zorder=4)
            ax.annotate(f"floor{which}", (xs[-2], floor[-2]), textcoords="offset points",
                        xytext=(0, 3), ha="right", fontsize=8, color="0.25")
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    legend.setdefault(f"under the tolerance, floor + (N−1)·u + {schema.REORDER}·u_acc: "
                      f"'equivalent'",
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
        with plt.rc_context(RC):
            fig = draw(plot, runs[0].experiment)
            path = out / f"{runs[0].experiment}-{plot.name}.{fmt}"
            # no date in the file: the same run gives the same bytes
            fig.savefig(path, dpi=110, bbox_inches="tight",
                        metadata={"Date": None} if fmt == "svg" else None)
        plt.close(fig)
        written[path] = plot.title
    return written
