"""B x 1 against (B/N) x N on mlp and cnn: gradients, trajectories and the loss-scaling bug."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import arm_rows, run_json

LIMIT = {"float64": 1e-12, "float32": 1e-5}


def test_accumulated_gradient_matches_for_every_n(tmp_path):
    doc = run_json("equivalence", "--set", "steps=2", "--out", tmp_path)
    rows = arm_rows(doc, "accumulated")
    assert sorted({r["accum_steps"] for r in rows}) == [1, 2, 4, 8, 16]
    assert {(r["model"], r["norm"]) for r in rows} == {("mlp", "none"), ("cnn", "none"),
                                                       ("cnn", "gn")}
    for r in rows:
        assert r["max_rel_grad_err"] <= LIMIT[r["dtype"]], r
        assert r["min_grad_cosine"] > 1 - LIMIT[r["dtype"]], r
        assert r["verdict"] == "equivalent"


def test_no_loss_scaling_is_n_times_too_large(equivalence_run):
    for r in arm_rows(equivalence_run, "no-loss-scaling"):
        n = r["accum_steps"]
        assert r["max_rel_grad_err"] == pytest.approx(n - 1, rel=1e-4), r
        assert r["min_grad_cosine"] == pytest.approx(1.0, abs=1e-5)  # same direction, N x long
        assert r["verdict"] == "differs"


def test_loss_trajectories_agree(equivalence_run, equivalence_dir: Path):
    steps = pd.read_csv(equivalence_dir / "steps.csv")
    trials = {t["trial"]: t["settings"] for t in equivalence_run["trials"]}
    for trial, dtype in ((t, s["dtype"]) for t, s in trials.items()):
        rows = steps[steps.trial == trial]
        big = torch.tensor(rows[rows.arm == "big-batch"].loss.to_numpy())
        acc = torch.tensor(rows[rows.arm == "accumulated"].loss.to_numpy())
        assert len(big) == len(acc) == 20  # the default run's 20 steps
        tol = 1e-12 if dtype == "float64" else 1e-5
        torch.testing.assert_close(acc, big, rtol=tol, atol=tol)
        unscaled = torch.tensor(rows[rows.arm == "no-loss-scaling"].loss.to_numpy())
        # the unscaled arm takes N-times-too-long steps: its losses leave float noise behind
        assert ((unscaled - big).abs() / big.abs()).max() > 20 * tol


def test_summary_csv_matches_json(equivalence_run, equivalence_dir: Path):
    summary = pd.read_csv(equivalence_dir / "summary.csv")
    assert len(summary) == sum(len(t["arms"]) for t in equivalence_run["trials"])
    row = summary[(summary.arm == "accumulated")].iloc[0]
    first = arm_rows(equivalence_run, "accumulated")[0]
    assert row.max_rel_grad_err == first["max_rel_grad_err"]
    assert set(summary.verdict) == {"baseline", "equivalent", "differs"}


def test_probe_has_every_parameter_and_the_whole(equivalence_dir: Path):
    probe = pd.read_csv(equivalence_dir / "probe.csv")
    one = probe[(probe.trial == 0) & (probe.arm == "accumulated") & (probe.step == 1)]
    assert list(one.param) == ["1.weight", "1.bias", "4.weight", "4.bias", "*"]
    assert (one.cosine > 0.999999).all()
