"""The token-normalisation experiment: the 2024 transformers/TRL bug, measured."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import arm_rows, gradlab, run_json

FLOOR = {"float32": 1e-5, "float64": 1e-12}  # accumulation at rounding level, with headroom


@pytest.fixture(scope="module")
def tokens_run(tmp_path_factory) -> dict:
    """The default tokens spec at N = 1 and 8, probed at step 1 only (the full default trains
    10 steps at N = 1, 2, 4, 8)."""
    return run_json("tokens", "--set", "steps=1", "--set", "accum_steps=1,8",
                    "--out", tmp_path_factory.mktemp("tokens"))


def spread(row: dict) -> bool:
    return row["min_len"] < row["max_len"]


def test_global_token_normalisation_is_the_big_batch(tokens_run):
    rows = arm_rows(tokens_run, "global-tokens")
    assert len(rows) == 8  # lengths x dtype x N
    for row in rows:
        assert row["max_rel_grad_err"] <= FLOOR[row["dtype"]], row
        assert row["verdict"] == "equivalent"


def test_mean_of_means_differs_only_when_lengths_differ(tokens_run):
    for row in arm_rows(tokens_run, "mean-of-means"):
        if row["accum_steps"] == 1:  # one micro-batch: its mean is the window's mean
            assert row["max_rel_grad_err"] == 0.0
        elif spread(row):
            assert row["max_rel_grad_err"] >= 1e-3, row
            assert row["verdict"] == "differs"
        else:  # all 64 tokens long: every micro-batch holds as many tokens, the bug vanishes
            assert row["max_rel_grad_err"] <= FLOOR[row["dtype"]], row
            assert row["verdict"] == "equivalent"


def test_the_bug_is_the_same_size_in_both_dtypes(tokens_run):
    """Not rounding: float32 and float64 measure the same error to 4 digits."""
    rows = [r for r in arm_rows(tokens_run, "mean-of-means") if spread(r) and r["accum_steps"] > 1]
    by = {(r["accum_steps"], r["dtype"]): r["max_rel_grad_err"] for r in rows}
    for n in (8,):
        assert by[n, "float32"] == pytest.approx(by[n, "float64"], rel=1e-4)


def test_units_are_tokens(tokens_run):
    steps = pd.read_csv(Path(tokens_run["run_dir"]) / "steps.csv")
    summary = pd.read_csv(Path(tokens_run["run_dir"]) / "summary.csv")
    steps = steps.merge(summary[["trial", "arm", "min_len"]], on=["trial", "arm"])
    equal = steps[steps.min_len == 64]
    assert (equal.units == 32 * 63).all()  # 32 sequences, 63 predicted tokens each
    assert steps[steps.min_len == 8].units.between(32 * 7, 32 * 63 - 1).all()


def test_compare_check_holds_the_expectations(tokens_run):
    result = gradlab("compare", tokens_run["run_dir"], "--check")
    assert result.exit_code == 0, result.stderr


def test_training_with_the_bug_moves_away_from_the_big_batch(tmp_path):
    doc = run_json("tokens-training", "--set", "steps=6", "--set", "eval_every=3",
                   "--set", "probe_every=5", "--out", tmp_path)
    steps = pd.read_csv(Path(doc["run_dir"]) / "steps.csv").pivot(
        index="step", columns="arm", values="loss")
    fix = (steps["global-tokens"] - steps["big-batch"]).abs() / steps["big-batch"]
    bug = (steps["mean-of-means"] - steps["big-batch"]).abs() / steps["big-batch"]
    assert fix.max() <= 1e-5  # float32: the same trajectory
    assert bug.iloc[1:].min() > 1e-5  # from step 2 on, a different model
    (row,) = arm_rows(doc, "mean-of-means")
    assert row["verdict"] == "differs" and row["max_rel_grad_err"] > 0.05
