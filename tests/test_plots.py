"""gradlab plot and gradlab report: which figures, written where, and readable files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import gradlab
from gradlab import compare, plots, store
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



@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    return run_dir("equivalence", *MINI, "--out", tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="module")
def zero_grad(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zero-grad")
    (folder / "spec.toml").write_text(ZERO_GRAD_SPEC)
    return run_dir(folder / "spec.toml", "--out", folder)


def written(result) -> list[Path]:
    """The paths plot printed, each checked to be a non-empty file."""
    assert result.exit_code == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    for path in paths:
        assert path.is_file() and path.stat().st_size > 5000, path
    return paths


def test_standard_figures_of_the_equivalence_run(equivalence_dir, tmp_path):
    paths = written(gradlab("plot", equivalence_dir, "--out", tmp_path))
    assert [p.name for p in paths] == [
        "equivalence-loss.png", "equivalence-grad-error.png",
        "equivalence-grad-error-by-norm.png", "equivalence-accuracy.png"]
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
    errors = plots.sweep_plot(runs, rows, "max_rel_grad_err", "accum_steps", ["dtype"])
    assert errors.panels == ["dtype"]
    assert errors.lines == ["arm", "model", "norm"]  # dataset follows from the model
    assert errors.tolerance and not errors.data["baseline"].any()
    loss = plots.curve_plot(runs, plots.per_step(runs, rows), "loss")
    assert loss.panels == ["model", "norm", "dtype"] and loss.lines == ["arm", "accum_steps"]


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


def test_report_writes_markdown_and_a_self_contained_page(mini, tmp_path):
    run = tmp_path / mini.name
    shutil.copytree(mini, run)
    result = gradlab("report", run)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [str(run / "report.md"), str(run / "index.html")]
    md = (run / "report.md").read_text()
    assert "# equivalence: gradlab report" in md and "| no-loss-scaling |" in md
    assert "![Training loss of each arm](figures/equivalence-loss.png)" in md
    page = (run / "index.html").read_text()
    assert page.count("src='data:image/png;base64,") == 2
    assert "src='figures" not in page and "<td class='differs'>differs</td>" in page


def test_report_takes_one_run(mini, tmp_path):
    result = gradlab("report", mini.parent)
    assert result.exit_code == 2 and "not a run directory" in result.stderr
