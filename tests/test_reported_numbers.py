"""Every number a run reports, recomputed from its definition: summary.csv's columns from
probe.csv and steps.csv, the loss difference by its formula, next-token accuracy by a hand
count, and the verdict of an arm with nothing measured. (A summary that took a mean where
its column says max, or divided by the wrong loss, fails here.)"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from gradlab.record.verdict import Verdict, verdict_of
from gradlab.zoo.text import IGNORE_INDEX, next_token_accuracy
from minirun import MINI, run_dir

RUNS = {
    "mlp": ["equivalence", *MINI],
    # the causal transformer on docstrings: token units, uneven micro-batches, held-out accuracy
    "transformer-lm": ["tokens", "--set", "steps=3", "--set", "probe_every=1",
                       "--set", "accum_steps=2"],
}


# the transformer's run in the slow set (CI runs it): the default suite keeps its 5 minutes
@pytest.fixture(scope="module", params=["mlp", pytest.param("transformer-lm",
                                                            marks=pytest.mark.slow)])
def run(request, tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    out = tmp_path_factory.mktemp(request.param) / "results"
    directory = run_dir(*RUNS[request.param], "--out", out)
    return tuple(pd.read_csv(directory / f"{t}.csv") for t in ("summary", "probe", "steps"))


def test_every_gradient_column_of_summary_is_its_probes_worst(run):
    summary, probe, _ = run
    overall = probe[probe.param == "*"].groupby(["trial", "arm"])
    for (trial, arm), rows in overall:
        row = summary[(summary.trial == trial) & (summary.arm == arm)].iloc[0]
        assert row.max_rel_grad_err == rows.rel_l2_err.max()
        assert row.max_abs_grad_err == rows.max_abs_err.max()  # the max, not a mean
        assert row.min_grad_cosine == rows.cosine.min()
        assert row.max_exact_err == rows.exact_err.max()
        assert len(rows) >= 3  # probed at every step: the worst is over several


def test_the_star_row_is_every_parameter_together(run):
    """The probe's '*' row is the whole gradient: its largest absolute error is the largest of
    the parameters', and its relative error lies within theirs."""
    _, probe, _ = run
    for _, rows in probe.groupby(["trial", "arm", "step"]):
        star, params = rows[rows.param == "*"].iloc[0], rows[rows.param != "*"]
        assert star.max_abs_err == params.max_abs_err.max()
        squared = (params.rel_l2_err * params.ref_norm) ** 2
        expected = math.sqrt(squared.sum()) / star.ref_norm if star.ref_norm else 0.0
        assert star.rel_l2_err == pytest.approx(expected, rel=1e-6, abs=1e-30)


def test_loss_columns_follow_their_formulas(run):
    summary, _, steps = run
    for trial, rows in steps.groupby("trial"):
        base = rows[rows.arm == summary[(summary.trial == trial) & summary.baseline].arm.iloc[0]]
        ref = base.set_index("examples").loss
        for arm, mine in rows.groupby("arm"):
            # relative to the baseline's loss at equal examples seen, not the arm's own
            expected = (mine.loss - mine.examples.map(ref)).abs() / mine.examples.map(ref).abs()
            torch.testing.assert_close(torch.tensor(mine.rel_loss_diff.to_numpy()),
                                       torch.tensor(expected.to_numpy()), rtol=1e-12, atol=0)
            row = summary[(summary.trial == trial) & (summary.arm == arm)].iloc[0]
            assert row.final_loss == mine.sort_values("step").loss.iloc[-1]
            assert row.max_rel_loss_diff == mine.rel_loss_diff.max()


class Logits(torch.nn.Module):
    """A 'model' whose next-token scores are fixed: it predicts ``predictions`` everywhere."""

    def __init__(self, predictions: torch.Tensor, vocabulary: int = 8):
        super().__init__()
        self.scores = torch.nn.functional.one_hot(predictions, vocabulary).float()

    def forward(self, input_ids, attention_mask=None):
        return self.scores


def test_next_token_accuracy_is_a_hand_count_of_shifted_targets():
    # position t predicts token t + 1; the last position predicts nothing; padding is not scored
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, IGNORE_INDEX, IGNORE_INDEX]])
    predictions = torch.tensor([[2, 3, 0, 0],    # 2 of 3 right (2, 3; then 0 for 4)
                                [6, 0, 0, 0]])   # 1 of 1 scored
    correct, scored = next_token_accuracy(Logits(predictions),
                                          {"input_ids": labels.clamp(min=0), "labels": labels})
    assert (int(correct), int(scored)) == (3, 4)
    # predicting the unshifted labels scores as wrong as it is
    correct, _ = next_token_accuracy(Logits(labels.clamp(min=0)),
                                     {"input_ids": labels.clamp(min=0), "labels": labels})
    assert int(correct) == 0


@pytest.mark.parametrize("unmeasured", [math.nan, None])
def test_an_arm_with_no_measured_gradient_is_not_probed_never_equivalent(unmeasured):
    assert verdict_of(False, unmeasured, 1e-6) == Verdict.NOT_PROBED == "not probed"
    assert verdict_of(False, unmeasured, 1e-6, abs_err=0.0, abs_tol=1.0) == Verdict.NOT_PROBED
    assert verdict_of(True, unmeasured, 1e-6) == Verdict.BASELINE
    assert verdict_of(False, 0.0, 1e-6) == Verdict.EQUIVALENT


def test_the_exact_gradient_replays_the_baselines_dropout_masks(tmp_path):
    """In float32 the exact float64 gradient is computed apart from the baseline's step (in
    float64 the baseline's own gradient is it): with per-example masks it must draw the masks
    the baseline drew, or the arm's distance from it would be a mask's worth (0.1 and more),
    not float32's rounding."""
    run = run_dir("dropout", "--set", "dtype=float32", "--set", "steps=2", "--set",
                  "dropout_masks=per-example", "--set", "mask_draws=0", "--set",
                  "dropout_mode=train", "--out", tmp_path / "results")
    arm = pd.read_csv(run / "summary.csv").set_index("arm").loc["accumulated"]
    assert arm.max_exact_err < 1e-5 and arm.exact_floor < 1e-5  # float32's rounding, both
    assert arm.verdict == "equivalent"
