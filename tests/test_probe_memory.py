"""Comparing gradients costs no model of its own: the probes compute in the baseline's
model (the exact float64 reference too, cast in place and back), and leave it exactly
as they found it."""

from __future__ import annotations

import dataclasses

from gradlab.config import spec
from gradlab.lab import setups
from gradlab.lab import trial as lab_trial

# one trial of the equivalence experiment: a BatchNorm cnn (running statistics to put
# back), float32 (so the exact reference casts to float64 and back), three arms
BN_TRIAL = ["model=cnn", "dataset=digits", "norm=bn", "dtype=float32", "accum_steps=4",
            "steps=3", "eval_every=1"]


def one_trial(*overrides: str) -> spec.Trial:
    (trial,) = spec.expand(spec.apply_overrides(spec.load_spec("equivalence"),
                                                [*BN_TRIAL, *overrides]))
    return trial


def test_probing_builds_no_model_of_its_own(monkeypatch):
    built = []
    original = setups.build_setup
    monkeypatch.setattr(setups, "build_setup",
                        lambda s, *a: built.append(s.dtype) or original(s, *a))
    rows = lab_trial.run_trial(one_trial(), {})
    assert built == ["float32"] * 3  # one model per arm, none for the probes
    probed = {r["arm"] for r in rows["probe"]}
    assert probed == {"accumulated", "no-loss-scaling"}
    assert {r["step"] for r in rows["probe"]} == {1, 2, 3}
    assert all(r["floor_err"] > 0 for r in rows["probe"] if r["param"] == "*")  # float32


def test_probing_leaves_the_baseline_as_it_was():
    """Its weights, its gradient and its BatchNorm statistics come back exactly: it trains
    and evaluates as it does alone."""
    trial = one_trial()
    probed = lab_trial.run_trial(trial, {})
    alone = lab_trial.run_trial(dataclasses.replace(trial, arms=(trial.baseline,)), {})

    def baseline(rows, table):  # (NaN, not measured here, is not equal to itself)
        return [{k: None if v != v else v for k, v in r.items() if k != "arm"}
                for r in rows[table] if r["arm"] == "big-batch"]

    assert baseline(probed, "steps")[0]["grad_norm"] > 0
    for table in ("steps", "eval"):
        assert baseline(probed, table) == baseline(alone, table), table
    assert baseline(alone, "probe") == []


def test_an_arm_in_another_dtype_is_probed_in_a_model_of_that_dtype():
    # GroupNorm: per example, so accumulating is exact (BatchNorm's batch statistics are not)
    trial = one_trial("norm=gn", "accumulated.dtype=float64", "no-loss-scaling.dtype=float64")
    rows = lab_trial.run_trial(trial, {})
    overall = {r["arm"]: r for r in rows["probe"] if r["param"] == "*" and r["step"] == 1}
    # float64 arms against the exact float64 gradient: far closer than float32 rounds
    assert overall["accumulated"]["exact_err"] < 1e-12
    assert 2.5 < overall["no-loss-scaling"]["exact_err"] < 3.5  # N = 4: N - 1 too large


def test_a_large_tensor_is_compared_a_chunk_at_a_time_with_the_same_result(monkeypatch):
    import torch

    from gradlab.train import metrics

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3 * metrics.CHUNK + 123, generator=g, dtype=torch.float64)
    arm = (ref + 1e-7 * torch.randn(ref.shape, generator=g, dtype=torch.float64)).float()
    arm[17] = 5.0  # the largest difference, in the first chunk
    chunked = metrics.compare(arm, ref)
    monkeypatch.setattr(metrics, "CHUNK", ref.numel())  # one chunk: the whole tensor at once
    whole = metrics.compare(arm, ref)
    assert chunked["max_abs_err"] == whole["max_abs_err"] == abs(5.0 - float(ref[17]))
    for metric in ("rel_l2_err", "cosine", "ref_norm", "arm_norm"):
        torch.testing.assert_close(chunked[metric], whole[metric], rtol=1e-12, atol=0)
    # and the float64 copies it makes hold one chunk, not the tensor
    made = []
    original = torch.Tensor.double
    monkeypatch.setattr(metrics, "CHUNK", 2**10)
    monkeypatch.setattr(torch.Tensor, "double", lambda t: made.append(t.numel()) or original(t))
    metrics.compare(arm, ref)
    assert max(made) == 2**10
