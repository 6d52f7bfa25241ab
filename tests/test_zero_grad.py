"""The zero_grad experiment: what forgetting, or misplacing, optimizer.zero_grad() does.

Engine-level tests drive ``engine.train_step`` on a small float64 mlp; CLI-level
tests read one finished default run of ``zero-grad`` (about 10 s) and the toy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.testing import assert_close

from conftest import arm_rows, gradlab, run_json
from gradlab.config import spec
from gradlab.config.settings import Settings
from gradlab.lab import arm as lab_arm
from gradlab.lab import observers, setups
from gradlab.setup import Examples, Setup, split
from gradlab.train import engine, metrics, optim

B = 12
# (micro_batch, N) with the same effective batch B
MICRO_BATCH_PAIRS = [(12, 1), (6, 2), (4, 3), (3, 4), (1, 12)]


# ----------------------------------------------------------------------------- engine

def settings(**overrides) -> Settings:
    base = dict(model="mlp", dataset="regression", dtype="float64", batch_size=B, lr=0.1,
                loss_scale="by-count", update_norm=True)
    return Settings(**{**base, **overrides})


CPU = torch.device("cpu")


def prepared(s: Settings) -> Setup:
    return setups.build_setup(s, CPU, {})


def first_windows(setup: Setup, s: Settings, count: int) -> list[Examples]:
    stream = setups.windows(setup, s)
    return [next(stream) for _ in range(count)]


def train(s: Settings, steps: int) -> tuple[Setup, list[engine.StepStats]]:
    setup = prepared(s)
    optimizer = optim.make_optimizer(setup.model, s)
    stats = [engine.train_step(setup.model, optimizer, window, s, setup)
             for window in first_windows(setup, s, steps)]
    return setup, stats


@pytest.mark.parametrize(("micro_batch", "n"), MICRO_BATCH_PAIRS)
def test_every_n_with_loss_over_n_matches_big_batch(micro_batch, n):
    big, big_stats = train(settings(zero_grad="every-step", accum_steps=1), steps=5)
    acc, acc_stats = train(settings(zero_grad="every-n", accum_steps=n), steps=5)
    assert settings(accum_steps=n).micro_batch == micro_batch
    assert_close([st.loss for st in acc_stats], [st.loss for st in big_stats],
                 rtol=1e-13, atol=1e-15)
    for a, b in zip(acc.model.parameters(), big.model.parameters(), strict=True):
        assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("micro_batch", "n"), MICRO_BATCH_PAIRS[1:])
def test_every_step_with_n_keeps_only_the_last_micro_batch(micro_batch, n):
    s = settings(zero_grad="every-step", accum_steps=n)
    setup = prepared(s)
    window = first_windows(setup, s, 1)[0]
    engine.window_gradient(setup.model, window, s, setup)
    held = metrics.grads_of(setup.model)

    last = split(window, n)[-1]
    alone = prepared(s).model  # the same initial weights
    loss, units = setup.loss(alone, last)
    (loss / units / n).backward()  # by-count: the last micro-batch's mean / N
    for name, grad in metrics.grads_of(alone).items():
        assert_close(held[name], grad, rtol=1e-15, atol=0)
    full = prepared(s).model
    engine.window_gradient(full, window, dataclasses.replace(s, zero_grad="every-n"), setup)
    rel = metrics.compare_models(setup.model, full)[-1]["rel_l2_err"]
    assert rel > 0.1  # and it is not the full one


@pytest.mark.parametrize(("micro_batch", "n"), MICRO_BATCH_PAIRS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_after_backward_never_moves_the_weights(micro_batch, n, set_to_none):
    s = settings(zero_grad="after-backward", accum_steps=n, set_to_none=set_to_none)
    setup, stats = train(s, steps=3)
    initial = prepared(s).model
    for moved, start in zip(setup.model.parameters(), initial.parameters(), strict=True):
        assert torch.equal(moved, start)
    assert [st.update_norm for st in stats] == [0.0, 0.0, 0.0]
    assert [st.grad_norm for st in stats] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(("micro_batch", "n"), MICRO_BATCH_PAIRS)
def test_set_to_none_true_and_false_give_identical_sgd_weights(micro_batch, n):
    dropped, _ = train(settings(accum_steps=n, set_to_none=True), steps=5)
    filled, _ = train(settings(accum_steps=n, set_to_none=False), steps=5)
    for a, b in zip(dropped.model.parameters(), filled.model.parameters(), strict=True):
        assert torch.equal(a, b)


class ClearAfterStep(observers.Observer):
    """What the never policy must not do: clear .grad after the step."""

    def stepped(self, run, stats):
        run.model.zero_grad()


def never_check(n: int, steps: int, clear_after_step: bool = False) -> dict:
    """Train a zero_grad='never' arm under the held-gradient check; returns its checks row."""
    s = settings(zero_grad="never", accum_steps=n, steps=steps)
    arm = spec.Arm("never", s, baseline=True)
    run = lab_arm.ArmRun(spec.Trial(0, {}, (arm,)), arm, prepared(s), {})
    check = observers.HeldGradientCheck(run)
    run.observers += [check, ClearAfterStep()] if clear_after_step else [check]
    while not run.done:
        run.advance()
    check.finished(run)
    (row,) = run.rows["checks"]
    return row


@pytest.mark.parametrize("n", [1, 4])
def test_never_holds_the_sum_of_fresh_gradients(n):
    row = never_check(n, steps=4)
    assert row["value"] <= 1e-12 and row["passed"]


def test_held_gradient_check_fails_when_the_gradient_was_cleared():
    # cleared after step 1: at step 2 .grad holds g2 where g1 + g2 belongs
    row = never_check(1, steps=2, clear_after_step=True)
    assert row["value"] > 0.1 and not row["passed"]


# ----------------------------------------------------------------------------- the experiment

@pytest.fixture(scope="module")
def zero_grad_run(tmp_path_factory) -> dict:
    """The default zero-grad run, as shipped: the must-show claims are about it."""
    return run_json("zero-grad", "--out", str(tmp_path_factory.mktemp("zero-grad")))


def table(doc: dict, name: str) -> pd.DataFrame:
    return pd.read_csv(Path(doc["run_dir"]) / f"{name}.csv")


def arm_steps(doc: dict, arm: str) -> pd.DataFrame:
    steps = table(doc, "steps")
    return steps[steps.arm == arm].reset_index(drop=True)


def only(doc: dict, arm: str) -> dict:
    (row,) = arm_rows(doc, arm)
    return row


def test_never_gradient_norm_grows_and_training_ends_worse(zero_grad_run):
    norms = arm_steps(zero_grad_run, "never").grad_norm
    window_means = norms.groupby(norms.index // 10).mean()
    assert window_means.is_monotonic_increasing and window_means.is_unique
    assert norms.iloc[-1] > 10 * norms.iloc[0]
    never, base = only(zero_grad_run, "never"), only(zero_grad_run, "every-step")
    assert never["final_loss"] > base["final_loss"]
    assert never["final_test_loss"] > base["final_test_loss"]


def test_never_summed_gradient_identity_is_checked(zero_grad_run):
    (check,) = only(zero_grad_run, "never")["checks"]
    assert check["check"] == observers.HeldGradientCheck.name
    assert check["value"] <= 1e-12 and check["passed"] is True
    csv = table(zero_grad_run, "checks")
    assert csv[["arm", "passed"]].values.tolist() == [["never", True]]
    assert only(zero_grad_run, "every-step")["checks"] == []


def test_after_backward_weights_never_change(zero_grad_run):
    steps = arm_steps(zero_grad_run, "after-backward")
    assert (steps.update_norm == 0.0).all()
    assert (steps.grad_norm == 0.0).all()


def test_every_n_matches_the_big_batch_trajectory(zero_grad_run):
    base = arm_steps(zero_grad_run, "every-step")
    # float64 over 60 steps: measured gap 4e-16 in the loss; a real mistake is O(1)
    for arm in ("every-n", "set-to-none-false"):
        steps = arm_steps(zero_grad_run, arm)
        assert_close(steps.loss.tolist(), base.loss.tolist(), rtol=1e-12, atol=1e-12)
        assert steps.weight_dist.max() <= 1e-12
    wrong = arm_steps(zero_grad_run, "every-step-n")
    assert wrong.weight_dist.iloc[-1] > 1.0


def test_set_to_none_false_gives_identical_weights(zero_grad_run):
    assert (arm_steps(zero_grad_run, "set-to-none-false").weight_dist == 0.0).all()


def test_verdicts_match_expectations(zero_grad_run):
    for arm in ("every-n", "every-step-n", "after-backward", "set-to-none-false"):
        row = only(zero_grad_run, arm)
        assert row["verdict"] == row["expect"], arm


def test_toy_shows_fresh_plus_left_over(tmp_path):
    doc = run_json("zero-grad-toy", "--out", str(tmp_path))
    trace = table(doc, "trace").set_index(["arm", "step"]).grad
    assert trace["every-step", 1] == trace["never", 1] == -32.0
    # both arms sit at w = 1.32 before step 2, so the ordinary loop's gradient is the fresh one
    assert_close(trace["never", 2], trace["every-step", 2] + trace["never", 1], rtol=1e-15, atol=0)
    assert_close(trace["never", 2], -37.44, rtol=1e-14, atol=0)
    weights = table(doc, "weights")
    assert (weights[weights.arm == "after-backward"].value == 1.0).all()


def test_unknown_zero_grad_policy_is_one_line_exit_2():
    result = gradlab("run", "zero-grad", "--set", "zero_grad=sometimes")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sometimes" in lines[0]
    for policy in Settings.choices("zero_grad"):
        assert policy in lines[0]


def test_batch_lr_arms_see_the_same_examples():
    (trial,) = spec.expand(spec.load_spec("batch-lr"))
    arms = {a.name: a.settings for a in trial.arms}
    big = arms["big-batch"]
    n = arms["accumulated"].accum_steps
    for s in arms.values():
        assert s.batch_size * s.steps == big.batch_size * big.steps
        assert s.batch_size * s.eval_every == big.batch_size * big.eval_every
    assert arms["small-batch"].batch_size == big.batch_size // n
    assert arms["small-batch"].lr == big.lr
    assert arms["small-batch-lr-over-n"].lr == big.lr / n
