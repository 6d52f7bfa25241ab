"""Your own training setup: the example in experiments/, and broken setups refused in one line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import arm_rows, gradlab, run_json
from test_cli import assert_clean_failure

REPO = Path(__file__).resolve().parent.parent


def test_the_example_in_experiments_runs_by_name_and_its_verdicts_are_right(tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(REPO)  # where a user runs it from: ./experiments/my_lm.toml
    doc = run_json("my_lm", "--set", "steps=2", "--out", tmp_path)
    assert doc["experiment"] == "my_lm"
    for row in arm_rows(doc, "accumulated"):
        assert row["verdict"] == "equivalent"
        assert row["max_rel_grad_err"] <= 1e-12  # float64
    for row in arm_rows(doc, "mean-of-means"):  # sequences of very different lengths
        assert row["verdict"] == "differs" and row["max_rel_grad_err"] > 1e-2
    steps = pd.read_csv(Path(doc["run_dir"]) / "steps.csv")
    assert (steps.units > 16).all()  # units are tokens, not the 16 sequences
    assert gradlab("compare", doc["run_dir"], "--check").exit_code == 0


def test_a_local_spec_is_found_before_the_built_ins(tmp_path, monkeypatch):
    (tmp_path / "experiments").mkdir()
    text = (REPO / "gradlab/experiments/toy.toml").read_text().replace('"toy"', '"my-toy"')
    (tmp_path / "experiments" / "toy.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert run_json("toy", "--out", tmp_path / "out")["experiment"] == "my-toy"


def test_a_good_user_setup_runs(tmp_path):
    doc = run_json("equivalence", "--set", "setup=user_setups:good", "--set", "accum_steps=4",
                   "--set", "steps=2", "--set", "dtype=float64", "--out", tmp_path)
    for row in arm_rows(doc, "accumulated"):
        assert row["verdict"] == "equivalent" and row["max_rel_grad_err"] <= 1e-12


BROKEN = {
    "no_units": "must return (summed loss, number of loss units)",
    "zero_units": "holds 0 loss units",
    "ragged": "differ in length along dim 0 (x: 64, y: 10)",
    "not_tensors": "y is a list, not a tensor",
    "wrong_output": "the model and loss failed on a micro-batch",
    "raises": "setup 'user_setups:raises' failed: RuntimeError: cannot find my tokenizer",
    "not_a_setup": "returned Linear; return gradlab.setup.Setup",
    "miscounted": "the loss says micro-batch 1 holds 128 units but the setup counts 64",
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_setup_is_one_line_and_exit_2(tmp_path, name):
    out = tmp_path / "results"
    result = gradlab("run", "equivalence", "--set", f"setup=user_setups:{name}",
                     "--set", "accum_steps=2", "--out", out)
    assert_clean_failure(result, BROKEN[name], out)
