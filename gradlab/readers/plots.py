"""Figures from the CSVs of finished runs: which figures, and the data each draws (drawing
them is gradlab.readers.drawing; matplotlib, Agg: no display needed).

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

import functools
import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: must work on a server with no display

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import font_manager, ft2font  # noqa: E402

from gradlab.errors import GradlabError  # noqa: E402
from gradlab.readers import compare
from gradlab.readers.drawing import LABELS, Plot, draw, precision_style  # noqa: E402
from gradlab.record.store import Run  # noqa: E402

X_AXES = {"step": "step", "examples": "examples", "N": "accum_steps",
          "micro_batch": "micro_batch"}
DEFAULT_Y = {"step": "loss", "examples": "loss", "N": "max_exact_err",
             "micro_batch": "final_test_accuracy"}
FORMATS = ("png", "svg")
# what the verdict judges: its tolerance is drawn with them
RELATIVE_ERRORS = ("max_exact_err", "exact_err")
TRACE_ELEMENTS = 3  # draw the trace of a model with at most this many weights
# DejaVu Sans ships with matplotlib and has every glyph used here (‖ − · ×): the figures look
# the same on every machine, and no fallback font (a CJK one, say) is searched or warned about
RC = {"font.family": "DejaVu Sans", "svg.hashsalt": "gradlab", "svg.fonttype": "path"}


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


# ----------------------------------------------------------------------------- files

def default_out(runs: list[Run]) -> Path:
    """One run: its figures/ folder, next to its data. Several: ./figures."""
    return runs[0].path / "figures" if len(runs) == 1 else Path("figures")


def write(runs: list[Run], out: Path | None = None, fmt: str = "png",
          ys: list[str] | None = None, x: str | None = None,
          say: Callable[[str], object] = lambda note: None) -> dict[Path, str]:
    """Draw the standard figures (or the requested ones) and save them: {path: title}.
    ``say``: a note for people, once, when the labels hold characters DejaVu Sans lacks
    (arm names in CJK, say) and no installed font has them either."""
    if fmt not in FORMATS:
        raise GradlabError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if x is not None and x not in X_AXES:
        raise GradlabError(f"-x {x}: choose one of {', '.join(X_AXES)}")
    plots = requested_plots(runs, ys or [], x) if ys or x else standard_plots(runs)
    out = out or default_out(runs)
    out.mkdir(parents=True, exist_ok=True)
    written, lacking = {}, set()
    for plot in plots:
        with plt.rc_context(RC), warnings.catch_warnings():
            # a glyph no font has is drawn as a box, and said once below, not once a glyph
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig = draw(plot, runs[0].experiment)
            lacking |= fall_back_for_missing_glyphs(fig)
            path = out / f"{runs[0].experiment}-{plot.name}.{fmt}"
            # no date in the file: the same run gives the same bytes
            fig.savefig(path, dpi=110, bbox_inches="tight",
                        metadata={"Date": None} if fmt == "svg" else None)
        plt.close(fig)
        written[path] = plot.title
    if lacking:
        shown = "".join(sorted(lacking)[:8]) + ("…" if len(lacking) > 8 else "")
        say(f"note: no installed font has the characters {shown} of the figures' labels; "
            f"they show as boxes. Install a font that has them (e.g. Noto Sans CJK: "
            f"apt install fonts-noto-cjk) and plot again")
    return written


def fall_back_for_missing_glyphs(fig: plt.Figure) -> set[str]:
    """Give every text of ``fig`` that holds characters DejaVu Sans lacks a fallback font
    that has them, if one is installed; the characters that no installed font has."""
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    missing = {c for t in texts for c in t.get_text() if ord(c) not in glyphs(DEJAVU)}
    if not missing:
        return set()
    fallback = next((path for path in installed_fonts() if missing <= {
        chr(code) for code in glyphs(path)}), None)
    if fallback is None:
        return missing
    name = font_manager.FontProperties(fname=fallback).get_name()
    for text in texts:  # per glyph: DejaVu's where it has one, the fallback's otherwise
        if set(text.get_text()) & missing:
            text.set_fontfamily([RC["font.family"], name])
    return set()


DEJAVU = font_manager.findfont(RC["font.family"], fallback_to_default=False)


@functools.cache
def glyphs(path: str) -> frozenset[int]:
    """The code points the font at ``path`` has glyphs for."""
    try:
        return frozenset(ft2font.FT2Font(path).get_charmap())
    except (OSError, RuntimeError):  # a font file matplotlib cannot read
        return frozenset()


def installed_fonts() -> list[str]:
    """The font files matplotlib knows, once each, but DejaVu's own and the Last Resort font
    matplotlib ships (a box for every code point: it has every glyph and shows none)."""
    return sorted({f.fname for f in font_manager.fontManager.ttflist
                   if "lastresort" not in f.fname.lower()} - {DEJAVU})
