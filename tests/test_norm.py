"""The norm experiments: BatchNorm breaks accumulation, per-example norms do not."""

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import arm_rows, gradlab, run_json
from gradlab.config.settings import Settings
from gradlab.lab import probing, setups

LIMIT = {"float64": 1e-12, "float32": 1e-5}
NS = [1, 2, 4, 8, 16, 32]


@pytest.fixture(scope="module")
def norm_run(tmp_path_factory) -> dict:
    """The whole built-in grid (6 cases x 2 dtypes x 6 N), one step each: the probe at init."""
    return run_json("norm", "--set", "steps=1", "--out", tmp_path_factory.mktemp("runs"))


def accumulated(doc: dict, norm: str, bn_mode: str = "train", dtype: str | None = None):
    """The accumulated arm's rows for one case, sorted by N."""
    rows = [r for r in arm_rows(doc, "accumulated") if r["norm"] == norm
            and r["bn_mode"] == bn_mode and dtype in (None, r["dtype"])]
    return sorted(rows, key=lambda r: (r["dtype"], r["accum_steps"]))


def test_grid_is_complete(norm_run):
    rows = arm_rows(norm_run, "accumulated")
    assert len(rows) == 6 * 2 * 6
    for norm in ("gn", "ln", "in", "none"):
        assert [r["accum_steps"] for r in accumulated(norm_run, norm, dtype="float64")] == NS


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("norm", ["gn", "ln", "in", "none"])
def test_per_example_norms_stay_exact(norm_run, norm, dtype):
    for r in accumulated(norm_run, norm, dtype=dtype):
        assert r["max_rel_grad_err"] <= LIMIT[dtype], r
        assert r["min_grad_cosine"] >= 1 - LIMIT[dtype], r
        assert r["verdict"] == "equivalent", r
        assert r["max_rel_buffer_diff"] is None  # no running statistics to compare


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batchnorm_gradient_differs_and_grows_with_n(norm_run, dtype):
    rows = accumulated(norm_run, "bn", dtype=dtype)
    errors = [r["max_rel_grad_err"] for r in rows]
    assert errors[0] == 0.0  # N = 1: the same computation as the big batch
    assert all(e > 1e-2 for e in errors[2:]), errors  # N >= 4
    assert errors == sorted(errors) and len(set(errors)) == len(errors), errors
    assert [r["verdict"] for r in rows[1:]] == ["differs"] * 5


def test_batchnorm_error_is_not_rounding(norm_run):
    """float64 gives the same error as float32: the loss itself differs, not its arithmetic."""
    wide = [r["max_rel_grad_err"] for r in accumulated(norm_run, "bn", dtype="float64")]
    narrow = [r["max_rel_grad_err"] for r in accumulated(norm_run, "bn", dtype="float32")]
    assert narrow == pytest.approx(wide, rel=1e-4)


def test_frozen_statistics_restore_exactness(norm_run):
    rows = accumulated(norm_run, "bn", bn_mode="frozen")
    assert len(rows) == 12
    for r in rows:
        assert r["max_rel_grad_err"] <= LIMIT[r["dtype"]], r
        assert r["verdict"] == "equivalent", r
        assert r["max_rel_buffer_diff"] == 0.0  # eval mode: nothing updates the statistics


def test_running_statistics_differ_for_n_above_one(norm_run):
    diffs = [r["max_rel_buffer_diff"] for r in accumulated(norm_run, "bn", dtype="float64")]
    assert diffs[0] == 0.0
    # from the initial statistics one step moves them 1 - 0.9^N of the way instead of 0.1
    assert diffs[1:] == sorted(diffs[1:]) and diffs[1] > 0.05 and diffs[-1] > 0.5, diffs


def buffers_with_settings(doc: dict) -> pd.DataFrame:
    """buffers.csv joined with each trial's settings from summary.csv."""
    run_dir = Path(doc["run_dir"])
    summary = pd.read_csv(run_dir / "summary.csv")
    return pd.read_csv(run_dir / "buffers.csv").merge(
        summary[["trial", "arm", "norm", "bn_mode", "dtype", "accum_steps"]], on=["trial", "arm"])


def recomputed_running_stats(s: Settings) -> dict[str, torch.Tensor]:
    """Running statistics after N micro-batch forwards, in plain torch, outside the engine."""
    setup = setups.build_setup(s, torch.device("cpu"), {})
    model = setup.model.train()
    x, _ = next(setups.windows(setup, s))
    with torch.no_grad():
        for micro in torch.tensor_split(x, s.accum_steps):
            model(micro)
    return probing.running_stats(model)


@pytest.mark.parametrize("n", [2, 8, 32])
def test_measured_running_stat_difference_is_the_real_one(norm_run, n):
    base = Settings(model="cnn", dataset="digits", norm="bn", batch_size=64,
                         dtype="float64", accum_steps=1)
    ref = recomputed_running_stats(base)
    arm = recomputed_running_stats(dataclasses.replace(base, accum_steps=n))
    table = buffers_with_settings(norm_run)
    measured = table[(table.norm == "bn") & (table.bn_mode == "train") & (table.dtype == "float64")
                     & (table.accum_steps == n) & (table.step == 1)].set_index("buffer").rel_l2_err
    for name in ref:
        expected = ((arm[name] - ref[name]).norm() / ref[name].norm()).item()
        assert measured[name] == pytest.approx(expected, rel=1e-9), name
    assert measured[list(ref)].min() > 0.05


def test_buffers_csv_reports_eval_accuracy_with_each_statistics(norm_run):
    table = buffers_with_settings(norm_run)
    assert set(table.norm) == {"bn"}  # only BatchNorm keeps running statistics
    whole = table[table.buffer == "*"]
    assert whole.test_accuracy.between(0, 1).all() and whole.ref_test_accuracy.between(0, 1).all()
    same = whole[whole.accum_steps == 1]  # N = 1: identical statistics, identical accuracy
    assert len(same) == 4 and (same.test_accuracy == same.ref_test_accuracy).all()


def test_groupnorm_training_is_independent_of_micro_batch_size(tmp_path):
    doc = run_json("norm-training", "--set", "steps=4", "--set", "seed=0", "--set",
                   "dtype=float64", "--out", tmp_path)
    rows = arm_rows(doc, "trained")
    assert sorted({r["micro_batch"] for r in rows}) == [2, 4, 8, 16, 32]
    gn = [r["final_loss"] for r in rows if r["norm"] == "gn"]
    bn = [r["final_loss"] for r in rows if r["norm"] == "bn"]
    assert max(gn) - min(gn) <= 1e-12 * max(gn)
    assert max(bn) - min(bn) > 1e-3 * max(bn)


def assert_bad_input(args: list[str], out: Path, *fragments: str) -> None:
    result = gradlab("run", "norm", *args, "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0]
    assert not out.exists() or not any(out.iterdir())  # no run directory left behind


def test_batchnorm1d_with_one_example_per_micro_batch_is_refused(tmp_path):
    assert_bad_input(["--set", "model=mlp", "--set", "norm=bn", "--set", "bn_mode=train",
                      "--set", "accum_steps=64"], tmp_path / "runs",
                     "micro-batches of 1 example", "accum_steps=64", "norm=gn", "norm=ln")


def test_groups_that_do_not_divide_the_channels_are_refused(tmp_path):
    assert_bad_input(["--set", "norm=gn", "--set", "groups=3"], tmp_path / "runs",
                     "groups=3 does not divide 8 channels", "[1, 2, 4, 8]")


def test_each_case_promises_and_compare_check_holds_it(norm_run):
    promises = {(r["norm"], r["bn_mode"]): r["expect"] for r in arm_rows(norm_run, "accumulated")}
    assert promises == {("bn", "train"): "differs", ("bn", "frozen"): "equivalent",
                        ("gn", "train"): "equivalent", ("ln", "train"): "equivalent",
                        ("in", "train"): "equivalent", ("none", "train"): "equivalent"}
    result = gradlab("compare", norm_run["run_dir"], "--check", "--format", "json")
    assert result.exit_code == 0, result.stderr
    checks = {(r["norm"], r["bn_mode"], r["accum_steps"]): r["check"]
              for r in json.loads(result.stdout)["rows"] if r["arm"] == "accumulated"}
    assert checks[("bn", "train", 1)] == "n/a"  # nothing to accumulate at N = 1
    assert {v for (norm, _, n), v in checks.items() if n > 1} == {"ok"}


def test_the_mlps_batchnorm1d_running_statistics_follow_each_micro_batch():
    """The mlp's BatchNorm1d, by its formula: each of the N forwards of a window moves the
    running mean and variance by momentum 0.1 towards that micro-batch's mean and unbiased
    variance (so N micro-batches are N updates, not the big batch's one), and bn_mode=frozen
    moves nothing."""
    from gradlab.train import engine

    s = Settings(model="mlp", norm="bn", hidden=6, dataset="regression", batch_size=8,
                 accum_steps=2, dtype="float64")
    setup = setups.build_setup(s, torch.device("cpu"), {})
    linear, bn = setup.model[1], setup.model[2]
    assert isinstance(bn, torch.nn.BatchNorm1d)
    window = tuple(t[:8] for t in setup.train)
    engine.window_gradient(setup.model, window, s, setup)
    mean, var = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    with torch.no_grad():
        for x in window[0].split(4):
            h = linear(x)
            mean = 0.9 * mean + 0.1 * h.mean(0)
            var = 0.9 * var + 0.1 * h.var(0, unbiased=True)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-15)
    assert int(bn.num_batches_tracked) == 2
    before = {k: b.clone() for k, b in setup.model.named_buffers()}
    engine.window_gradient(setup.model, window, dataclasses.replace(s, bn_mode="frozen"), setup)
    for name, b in setup.model.named_buffers():
        torch.testing.assert_close(b, before[name], rtol=0, atol=0)
