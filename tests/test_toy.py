"""The classic toy, read back from the run's own CSV files: -16, -20 and w = 1.2."""

from pathlib import Path

import pandas as pd
import pytest

from conftest import gradlab, run_json


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    doc = run_json("toy", "--out", tmp_path_factory.mktemp("toy"))
    run = Path(doc["run_dir"])
    return doc, pd.read_csv(run / "trace.csv"), pd.read_csv(run / "weights.csv")


def test_accumulated_gradient_is_minus_16_then_minus_20(toy):
    _, trace, _ = toy
    acc = trace[trace.arm == "accumulated"].sort_values("micro_batch")
    assert acc.micro_batch.tolist() == [1, 2]
    assert acc.grad.tolist() == pytest.approx([-16.0, -20.0], abs=1e-12)


def test_big_batch_gradient_is_minus_20(toy):
    _, trace, _ = toy
    assert trace[trace.arm == "big-batch"].grad.tolist() == pytest.approx([-20.0], abs=1e-12)


def test_both_arms_reach_w_1_2(toy):
    _, _, weights = toy
    assert weights[weights.step == 0].value.tolist() == [1.0, 1.0]
    after = weights[weights.step == 1].set_index("arm").value
    assert after["big-batch"] == pytest.approx(1.2, abs=1e-12)
    assert after["accumulated"] == pytest.approx(1.2, abs=1e-12)


def test_toy_verdict_equivalent(toy):
    doc, _, _ = toy
    (trial,) = doc["trials"]
    arms = {a["arm"]: a for a in trial["arms"]}
    assert arms["accumulated"]["verdict"] == "equivalent"
    assert arms["accumulated"]["max_rel_grad_err"] == 0.0


def test_human_output_shows_the_trace(tmp_path):
    result = gradlab("run", "toy", "--out", tmp_path)
    assert result.exit_code == 0
    for text in ("-16", "-20", "1.2", "micro-batch 2"):
        assert text in result.stderr
    assert Path(result.stdout.strip()).is_dir()  # stdout is just the run directory
