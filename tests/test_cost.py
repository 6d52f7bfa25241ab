"""The cost experiment and gradlab/memory.py: what a step holds in memory, and for how long.

No timing is asserted (a busy machine would fail it): the times are checked to be there,
the bytes to be what autograd keeps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import gradlab
from gradlab.config import spec
from gradlab.config.settings import Settings
from gradlab.lab import trial as lab_trial
from gradlab.readers import compare
from gradlab.record import store
from gradlab.train import memory
from test_cli import assert_clean_failure

B = 256
# the cost experiment at N = 1 and 4 (micro-batches 256 and 64), 2 steps: first for memory
SMALL_COST = ["cost", "--set", "accum_steps=1,4", "--set", "steps=2"]


@pytest.fixture(scope="module")
def cost_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cost")
    result = gradlab("run", *SMALL_COST, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    return Path(json.loads(result.stdout)["run_dir"])


def test_saved_tensors_counts_what_autograd_keeps_for_backward():
    x = torch.randn(B, 64, requires_grad=True)
    with memory.SavedTensors() as saved:
        y = x.exp()  # saves its output: B x 64 float32
        y.sum().backward()  # sum saves no tensor
    assert saved.peak == B * 64 * 4
    w = torch.nn.Parameter(torch.randn(64, 8))
    with memory.SavedTensors(exclude=[w]) as saved:
        (x.detach() @ w).sum().backward()  # mm saves x and w; w is a parameter
    assert saved.peak == saved.total == B * 64 * 4
    assert saved.live == 0  # backward released what it saved


def test_a_storage_saved_twice_counts_once():
    x = torch.randn(B, 64, requires_grad=True)
    with memory.SavedTensors() as saved:
        y = x.exp()
        (y * y).sum().backward()  # exp saves y, mul saves y twice: one storage
    assert saved.peak == B * 64 * 4


def test_state_bytes_counts_weights_gradients_and_optimizer_state():
    model = torch.nn.Linear(10, 5)  # 55 float32 parameters
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert memory.state_bytes(model, sgd) == 2 * 55 * 4
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 10)).sum().backward()
    adam.step()  # two moments per weight, and a step counter per tensor
    assert memory.state_bytes(model, adam) == 4 * 55 * 4 + sum(
        s["step"].numel() * s["step"].element_size() for s in adam.state.values())


def test_peak_rss_is_reported_in_bytes():
    peak = memory.peak_rss()
    assert 10 * 2**20 < peak < 1024 * 2**30  # torch alone takes tens of MB
    memory.reset_peak(torch.device("cpu"))
    assert memory.peak_rss() <= peak


def test_activations_fall_in_proportion_to_the_micro_batch(cost_run):
    summary = pd.read_csv(cost_run / "summary.csv")
    for model, rows in summary.groupby("model"):
        by_micro = rows.set_index("micro_batch")
        ratio = by_micro.loc[B // 4, "activation_mb"] / by_micro.loc[B, "activation_mb"]
        assert 0.15 <= ratio <= 0.4, (model, ratio)
        # the step's memory: the same weights and gradients, fewer activations
        assert by_micro.loc[B // 4, "memory_mb"] < by_micro.loc[B, "memory_mb"]
    assert set(summary["model"]) == {"cnn", "mlp"}


def test_cost_csv_has_the_time_of_every_step_and_memory_of_the_first(cost_run):
    cost = pd.read_csv(cost_run / "cost.csv")
    assert list(cost.columns) == ["trial", "arm", "step", "seconds", "activation_bytes",
                                  "memory_bytes", "rss_bytes"]
    assert (cost["seconds"] > 0).all()
    first, later = cost[cost.step == 1], cost[cost.step == 2]
    assert first["activation_bytes"].gt(0).all() and later["activation_bytes"].isna().all()
    assert (first["memory_bytes"] > first["activation_bytes"]).all()  # plus the weights
    if Path("/proc/self/status").exists():
        assert first["rss_bytes"].gt(first["memory_bytes"]).all()  # plus Python and torch
    summary = pd.read_csv(cost_run / "summary.csv").set_index("trial")
    for trial, rows in cost.groupby("trial"):
        step_ms = 1e3 * rows.loc[rows.step == 2, "seconds"].item()  # the median of one
        assert summary.loc[trial, "step_ms"] == pytest.approx(step_ms)
        assert summary.loc[trial, "example_us"] == pytest.approx(1e3 * step_ms / B)


def test_runs_without_cost_write_no_cost_columns(tmp_path):
    result = gradlab("run", "toy", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "cost.csv").exists()
    assert "step_ms" not in pd.read_csv(run_dir / "summary.csv").columns


def largest_that_fits(rows: pd.DataFrame, budget: float) -> int | None:
    fits = rows[rows["memory_mb"] <= budget]
    return int(fits["micro_batch"].max()) if len(fits) else None


def test_a_budget_names_the_largest_micro_batch_that_fits(cost_run, tmp_path):
    summary = pd.read_csv(cost_run / "summary.csv")
    cnn = summary[summary.model == "cnn"].set_index("micro_batch")
    # between what micro-batches 64 and 256 need: for the cnn, 64 is the largest that fits
    budget = round((cnn.loc[64, "memory_mb"] + cnn.loc[256, "memory_mb"]) / 2, 4)
    result = gradlab("run", *SMALL_COST, "--set", f"budget_mb={budget}", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stderr.split())
    assert largest_that_fits(summary[summary.model == "cnn"], budget) == 64
    assert f"budget {budget:.3g} MB: model=cnn: the largest micro-batch that fits is 64 " \
           f"(N = 4, step MB {cnn.loc[64, 'memory_mb']:.3g}" in text
    mlp = largest_that_fits(summary[summary.model == "mlp"], budget)
    expected = f"model=mlp: the largest micro-batch that fits is {mlp} " if mlp else \
        "model=mlp: no micro-batch measured fits"
    assert expected in text


def test_a_budget_nothing_fits_says_what_the_smallest_step_needs(cost_run):
    (run,) = store.load_runs([cost_run])
    rows = compare.arm_rows([run]).assign(budget_mb=0.001)
    notes = compare.budget_notes(rows, compare.setting_columns([run], rows))
    smallest = rows[rows.model == "cnn"].memory_mb.min()
    assert notes[0] == (f"budget 0.001 MB: model=cnn: no micro-batch measured fits; the "
                        f"smallest step, micro-batch 64, needs {compare.fmt(smallest)} MB.")
    assert notes[1].startswith("budget 0.001 MB: model=mlp: no micro-batch measured fits")
    assert compare.budget_notes(rows.assign(budget_mb=0.0), []) == []  # no budget, no note


def test_a_budget_without_cost_is_refused(tmp_path):
    out = tmp_path / "results"
    result = gradlab("run", "toy", "--set", "budget_mb=100", "--out", out)
    assert_clean_failure(result, "budget_mb=100.0 (--set budget_mb) needs cost=true", out)


def test_the_cost_observer_measures_a_users_setup():
    s = Settings(setup="user_setups:good", batch_size=64, accum_steps=4, steps=2, cost=True,
                 dtype="float64")
    one = spec.Trial(0, {}, (spec.Arm("step", s, baseline=True),))
    rows = lab_trial.run_trial(one, {})
    (summary,) = rows["summary"]
    # a Linear(3, 1) on micro-batches of 16 float64 examples: the linear layer saves its
    # input (16 x 3), the summed squared error the prediction and the target (16 x 1 each)
    assert summary["activation_mb"] * 1e6 == 16 * 3 * 8 + 2 * 16 * 8
    assert math.isfinite(summary["step_ms"]) and summary["step_ms"] > 0
