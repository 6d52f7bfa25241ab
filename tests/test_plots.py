"""gradlab plot: which figures, what they draw (checked on the figure objects), written where."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib import font_manager
from matplotlib.colors import to_rgba
from torch.testing import assert_close

from conftest import gradlab
from gradlab.readers import compare, drawing, plots
from gradlab.record import store
from minirun import MINI, run_dir

PNG = b"\x89PNG\r\n\x1a\n"

# a zero_grad experiment in miniature: the arm that never zeroes keeps adding old gradients
ZERO_GRAD_SPEC = """
name = "zero-grad-mini"
[settings]
batch_size = 16
steps = 4
accum_steps = 4
[arms.big-batch]
baseline = true
accum_steps = 1
[arms.accumulated]
expect = "equivalent"
[arms.never-zeroed]
zero_grad = "never"
[sweep]
seed = [0, 1]
"""

# batch-lr in miniature: arms of different batch sizes, evaluated along the way
BATCH_LR_SPEC = """
name = "batch-lr-mini"
[settings]
model = "mlp"
dataset = "digits"
batch_size = 32
steps = 4
eval_every = 2
[arms.big-batch]
baseline = true
[arms.small-batch]
batch_size = 8
steps = 16
eval_every = 8
"""


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    return run_dir("equivalence", *MINI, "--out", tmp_path_factory.mktemp("mini"))


def spec_run(tmp_path_factory, text: str, *args) -> Path:
    folder = tmp_path_factory.mktemp("spec")
    (folder / "spec.toml").write_text(text)
    return run_dir(folder / "spec.toml", *args, "--out", folder)


@pytest.fixture(scope="module")
def zero_grad(tmp_path_factory) -> Path:
    return spec_run(tmp_path_factory, ZERO_GRAD_SPEC)


@pytest.fixture(scope="module")
def batch_lr(tmp_path_factory) -> Path:
    return spec_run(tmp_path_factory, BATCH_LR_SPEC)


@pytest.fixture(scope="module")
def norm(tmp_path_factory) -> Path:
    """The norm experiment cut down: 6 norm cases x N = 1, 2, 4 at float32, two steps."""
    return run_dir("norm", "--set", "dtype=float32", "--set", "accum_steps=1,2,4",
                   "--set", "steps=2", "--set", "probe_every=1",
                   "--out", tmp_path_factory.mktemp("norm"))


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return run_dir("toy", "--out", tmp_path_factory.mktemp("toy"))


def standard(path: Path) -> dict[str, drawing.Plot]:
    return {p.name: p for p in plots.standard_plots([store.load_run(path)])}


def figure(plot: drawing.Plot) -> plt.Figure:
    with plt.rc_context(plots.RC):
        return drawing.draw(plot, "test")


def legend(fig: plt.Figure) -> dict[str, object]:
    [box] = fig.legends
    return dict(zip((t.get_text() for t in box.get_texts()), box.legend_handles, strict=True))


def written(result) -> list[Path]:
    """The paths plot printed, each checked to be a non-empty file."""
    assert result.exit_code == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    for path in paths:
        assert path.is_file() and path.stat().st_size > 5000, path
    return paths


def test_standard_figures_of_the_equivalence_run(equivalence_dir, tmp_path):
    paths = written(gradlab("plot", equivalence_dir, "--out", tmp_path))
    # one gradient error figure: norm goes with the model there, a second would repeat it
    assert [p.name for p in paths] == [
        "equivalence-loss.png", "equivalence-grad-error.png", "equivalence-accuracy.png"]
    assert all(p.parent == tmp_path and p.read_bytes().startswith(PNG) for p in paths)


def test_one_run_gets_its_figures_folder_and_nothing_else_changes(mini, tmp_path):
    run = tmp_path / mini.name
    shutil.copytree(mini, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    paths = written(gradlab("plot", run))
    assert [p.name for p in paths] == ["equivalence-loss.png", "equivalence-grad-error.png"]
    assert {p.parent for p in paths} == {run / "figures"}
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_layout_splits_by_dtype_and_labels_lines_by_what_differs(equivalence_dir):
    runs = [store.load_run(equivalence_dir)]
    rows = compare.arm_rows(runs)
    errors = plots.sweep_plot(runs, rows, "max_exact_err", "accum_steps", ["dtype"])
    assert errors.panels == ["dtype"]
    assert errors.lines == ["arm", "model", "norm"]  # dataset follows from the model
    assert errors.tolerance and not errors.data["baseline"].any()
    loss = plots.curve_plot(runs, plots.per_step(runs, rows), "loss")
    assert loss.panels == ["model", "norm", "dtype"] and loss.lines == ["arm", "accum_steps"]


def test_the_toy_draws_its_trace_not_a_one_step_loss(toy):
    figures = standard(toy)
    assert list(figures) == ["trace"]  # one step: a loss "curve" would be one dot per arm
    trace = figures["trace"]
    assert (trace.x, trace.y, trace.panels, trace.lines) == (
        "examples", "value", ["quantity"], ["arm"])
    values = {(q.split(" ")[0], arm, x): v for q, arm, x, v in
              trace.data[["quantity", "arm", "examples", "value"]].itertuples(index=False)}
    # .grad after the first example (x = 4) and after both; w after the step, from 1
    assert values == {("weight[0].grad", "accumulated", 1): -16.0,
                      ("weight[0].grad", "accumulated", 2): -20.0,
                      ("weight[0].grad", "big-batch", 2): -20.0,
                      ("weight[0]", "accumulated", 0): 1.0,
                      ("weight[0]", "big-batch", 0): 1.0,
                      ("weight[0]", "accumulated", 2): pytest.approx(1.2, abs=1e-12),
                      ("weight[0]", "big-batch", 2): pytest.approx(1.2, abs=1e-12)}
    fig = figure(trace)
    grad_panel = fig.axes[0]
    labels = {t.get_text() for t in grad_panel.texts}
    assert {"-16", "-20"} <= labels and "-18" not in labels  # each point's value, written
    assert grad_panel.get_title() == "weight[0].grad after each backward"
    plt.close(fig)


def test_a_run_with_a_trace_and_several_steps_keeps_its_loss_figure(tmp_path):
    path = run_dir("zero-grad-toy", "--out", tmp_path)
    assert list(standard(path)) == ["loss", "trace", "grad-norm"]


def test_error_figure_has_log_axis_labelled_tolerance_and_shaded_equivalent_region(mini):
    fig = figure(standard(mini)["grad-error"])
    [ax] = fig.axes
    assert ax.get_yscale() == "log"
    assert {t.get_text() for t in ax.texts} >= {"tolerance", "equivalent", "floor"}
    [tolerance] = [line for line in ax.get_lines() if line.get_color() == "firebrick"]
    ns, tol = tolerance.get_data()
    inside = (ns >= 1) & (ns <= 4)  # the line runs flat on to the panel's edges
    # the tolerance the run measured and judged by, at each N (the largest of its arms)
    summary = pd.read_csv(mini / "summary.csv")
    recorded = summary[~summary.baseline].groupby("accum_steps").rel_tolerance.max()
    assert_close(tol[inside], recorded.loc[[1, 2, 4]].to_numpy(), rtol=1e-12, atol=0)
    [shade] = ax.collections[-1:]
    assert shade.get_facecolor()[0][3] == pytest.approx(0.09)  # the pale green region
    assert "under the tolerance, floor + (N−1)·u + 32·u_acc: 'equivalent'" in legend(fig)
    plt.close(fig)


def test_norm_run_one_error_figure_legend_in_words_and_a_colour_per_norm(norm):
    figures = standard(norm)
    assert list(figures) == ["loss", "grad-error", "accuracy"]
    fig = figure(figures["accuracy"])
    entries = legend(fig)
    # six norms once each, then the two arms: not twelve arm-and-norm lines
    assert list(entries) == ["BatchNorm, frozen statistics", "BatchNorm, batch statistics",
                             "GroupNorm", "InstanceNorm", "LayerNorm", "no norm",
                             "big-batch (baseline)", "accumulated"]
    assert not any("=" in label for label in entries)
    assert to_rgba(entries["BatchNorm, batch statistics"].get_color()) == to_rgba("tab:blue")
    assert to_rgba(entries["GroupNorm"].get_color()) == to_rgba("tab:orange")
    [ax] = fig.axes
    # the baseline has one micro-batch size (B/1): six diamonds, no line
    diamonds = [line for line in ax.get_lines() if line.get_marker() == "D"]
    assert len(diamonds) == 6
    assert all(line.get_linestyle() == "None" and list(line.get_xdata()) == [64]
               for line in diamonds)
    plt.close(fig)
    fig = figure(figures["loss"])
    assert fig.axes[0].get_title() == "BatchNorm, batch statistics"
    assert "accumulated, N = 2, micro-batch 32" in legend(fig)
    plt.close(fig)


def test_arms_of_different_batch_sizes_are_drawn_against_examples_seen(batch_lr):
    figures = standard(batch_lr)
    assert list(figures) == ["loss", "held-out"]
    loss, held_out = figures["loss"], figures["held-out"]
    assert loss.x == held_out.x == "examples" and held_out.y == "test_accuracy"
    fig = figure(held_out)
    [ax] = fig.axes
    ends = {tuple(line.get_xdata()) for line in ax.get_lines() if len(line.get_xdata())}
    # both arms see 128 examples and are evaluated every 64: 4 steps of 32, 16 steps of 8
    assert ends == {(64, 128)}
    assert ax.get_xlabel() == "examples seen"
    plt.close(fig)


def test_same_batch_size_stays_against_steps_and_gets_no_held_out_without_a_curve(mini):
    figures = standard(mini)
    assert figures["loss"].x == "step" and "held-out" not in figures


def test_markers_only_where_there_are_few_points(mini, equivalence_dir):
    few = figure(standard(mini)["loss"])  # 3 steps
    many = figure(standard(equivalence_dir)["loss"])  # 20 steps
    assert all(line.get_marker() not in (None, "None", "") for line in few.axes[0].get_lines())
    assert all(line.get_marker() in (None, "None", "") for line in many.axes[0].get_lines())
    plt.close(few)
    plt.close(many)


@pytest.mark.parametrize("key, words", [
    ({"norm": "bn", "bn_mode": "train"}, "BatchNorm, batch statistics"),
    ({"norm": "bn", "bn_mode": "frozen"}, "BatchNorm, frozen statistics"),
    ({"norm": "gn", "bn_mode": "train"}, "GroupNorm"),
    ({"accum_steps": 8, "micro_batch": 4}, "N = 8, micro-batch 4"),
    ({"model": "cnn", "dtype": "float64", "lr": 0.125}, "cnn, float64, lr 0.125"),
])
def test_settings_in_words(key, words):
    assert drawing.words(key) == words


def test_no_font_warnings_even_with_a_missing_font_configured(mini, tmp_path, monkeypatch,
                                                              caplog):
    # a matplotlibrc asking for a font that is not there (a CJK one, say) must not matter
    monkeypatch.setitem(matplotlib.rcParams, "font.family", ["Noto Sans CJK JP"])
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        plots.write([store.load_run(mini)], tmp_path)
    matplotlib_warnings = [str(w.message) for w in caught if "matplotlib" in w.filename]
    assert matplotlib_warnings == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("matplotlib")] == []


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_the_same_run_gives_the_same_bytes(mini, tmp_path, fmt):
    runs = [store.load_run(mini)]
    first = plots.write(runs, tmp_path / "a", fmt)
    second = plots.write(runs, tmp_path / "b", fmt)
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_zero_grad_runs_get_the_gradient_norm_figure(zero_grad, tmp_path):
    paths = written(gradlab("plot", zero_grad, "--out", tmp_path))
    assert [p.name for p in paths] == ["zero-grad-mini-loss.png", "zero-grad-mini-grad-norm.png"]


def test_named_metrics_against_a_chosen_axis_and_svg(mini, tmp_path):
    paths = written(gradlab("plot", mini, "-y", "loss,grad_norm", "-x", "examples",
                            "--format", "svg", "--out", tmp_path))
    assert [p.name for p in paths] == ["equivalence-loss-vs-examples.svg",
                                       "equivalence-grad_norm-vs-examples.svg"]
    assert all("<svg" in p.read_text() for p in paths)
    [path] = written(gradlab("plot", mini, "-y", "final_loss", "-x", "N", "--out", tmp_path))
    assert path.name == "equivalence-final_loss-vs-N.png"


@pytest.mark.parametrize("args, message", [
    (["-y", "nope"], "-y nope: not a metric"),
    (["-x", "epoch"], "-x epoch: choose one of step, examples, N, micro_batch"),
    (["--format", "jpg"], "--format jpg: choose one of png, svg"),
])
def test_bad_plot_options_exit_2(mini, tmp_path, args, message):
    result = gradlab("plot", mini, *args, "--out", tmp_path / "figs")
    assert result.exit_code == 2
    assert message in result.stderr and "\n" not in result.stderr.strip()
    assert not (tmp_path / "figs").exists()


CJK_SPEC = """
name = "cjk"
[settings]
model = "mlp"
dataset = "regression"
batch_size = 8
steps = 3
dtype = "float64"
[arms."大批量"]
baseline = true
accum_steps = 1
[arms."累积"]
accum_steps = 2
expect = "equivalent"
"""


def test_labels_no_font_has_are_said_once_and_warn_nothing(tmp_path_factory, tmp_path,
                                                           monkeypatch):
    run = spec_run(tmp_path_factory, CJK_SPEC)
    monkeypatch.setattr(plots, "installed_fonts", lambda: [])  # as on a machine without CJK
    said = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = plots.write([store.load_run(run)], tmp_path, say=said.append)
    assert written and [str(w.message) for w in caught if "Glyph" in str(w.message)] == []
    assert len(said) == 1 and said[0].startswith("note: no installed font has the characters ")
    assert set(said[0].split()[7]) == set("大批量累积")


def test_a_font_that_has_the_missing_glyphs_is_used_for_those_texts(monkeypatch):
    # DejaVu Sans lacks U+2322 (a frown); DejaVu's math font, which matplotlib ships, has it
    math = font_manager.findfont("DejaVu Math TeX Gyre", fallback_to_default=False)
    assert 0x2322 not in plots.glyphs(plots.DEJAVU) and 0x2322 in plots.glyphs(math)
    monkeypatch.setattr(plots, "installed_fonts", lambda: [math])
    with plt.rc_context(plots.RC):
        fig, ax = plt.subplots()
        plain, frown = ax.set_title("no-sync"), ax.set_xlabel("arm \u2322")
        assert plots.fall_back_for_missing_glyphs(fig) == set()
    assert frown.get_fontfamily() == ["DejaVu Sans", "DejaVu Math TeX Gyre"]
    assert plain.get_fontfamily() == ["DejaVu Sans"]
    plt.close(fig)
