"""The other ways a training loop breaks accumulation: clipping, the LR scheduler, the short
window at an epoch's end, dropout masks.

Engine-level tests compute gradients of a small float64 mlp on the regression data
directly; CLI-level tests run each built-in experiment cut short and hold it to its
spec with `gradlab compare RUN --check`, then read the magnitudes from its CSVs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.testing import assert_close

from conftest import gradlab
from gradlab.config.settings import Settings
from gradlab.lab import setups
from gradlab.setup import Setup, num_examples, take
from gradlab.train import engine, optim
from minirun import run_dir
from test_cli import assert_clean_failure

CPU = torch.device("cpu")
BASE = dict(model="mlp", hidden=8, dataset="regression", dtype="float64", batch_size=24)


def prepared(**overrides) -> tuple[Settings, Setup]:
    """Settings and a freshly built setup: the same initial weights whatever the policies."""
    s = Settings(**{**BASE, **overrides})
    return s, setups.build_setup(s, CPU, {})


def gradient(window_size: int | None = None, seed_state: int | None = 0,
             **overrides) -> torch.Tensor:
    """The flat gradient window_gradient leaves in .grad, on the first examples of the data."""
    s, setup = prepared(**overrides)
    window = take(setup.train, torch.arange(window_size or s.batch_size))
    with torch.random.fork_rng():
        if seed_state is not None:
            torch.manual_seed(seed_state)
        engine.window_gradient(setup.model, window, s, setup)
    return torch.cat([p.grad.flatten() for p in setup.model.parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- clipping

CLIP = 0.5  # the unclipped gradient's norm on these examples is 3.2: the clip is active


def test_the_clip_threshold_is_active():
    unclipped = gradient()
    assert float(unclipped.norm()) > 4 * CLIP
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6): a hair under the threshold
    assert float(gradient(clip_norm=CLIP).norm()) == pytest.approx(CLIP, rel=1e-6)


@pytest.mark.parametrize("accum_steps", [2, 4, 8, 24])
def test_clipping_once_after_accumulation_is_the_clipped_big_batch(accum_steps):
    clipped_big = gradient(clip_norm=CLIP)
    after = gradient(clip_norm=CLIP, accum_steps=accum_steps, clip_at="after-accumulation")
    assert_close(after, clipped_big, rtol=1e-12, atol=1e-14)


def test_clipping_each_micro_batch_differs_and_more_as_n_grows():
    clipped_big = gradient(clip_norm=CLIP)
    errors = [rel_err(gradient(clip_norm=CLIP, accum_steps=n, clip_at="per-micro-batch"),
                      clipped_big) for n in (2, 8, 24)]
    assert errors[0] > 0.2
    assert errors[0] < errors[1] < errors[2] < 1.0
    # the last call clipped the whole sum: the norm is right, the direction is not
    per_micro_batch = gradient(clip_norm=CLIP, accum_steps=8, clip_at="per-micro-batch")
    assert float(per_micro_batch.norm()) == pytest.approx(CLIP, rel=1e-6)


def test_clipping_per_micro_batch_is_exact_when_the_threshold_is_never_reached():
    big = gradient(clip_norm=100.0)
    assert_close(gradient(clip_norm=100.0, accum_steps=4, clip_at="per-micro-batch"), big,
                 rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- scheduler

def test_warmup_cosine_factors():
    factor = [optim.warmup_cosine(4, 10, k) for k in range(12)]
    assert factor[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factor[4] == 1.0
    assert factor[7] == pytest.approx(0.5, abs=1e-15)  # half way down the cosine
    assert factor[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)), abs=1e-15)
    assert factor[10] == factor[11] == 0.0  # past its end the schedule stays at 0


def trained(steps: int, **overrides) -> tuple[list[float], Setup]:
    """The learning rate each step applied, training on the seeded stream of windows."""
    s, setup = prepared(steps=steps, lr=0.1, scheduler="warmup-cosine", warmup_steps=3,
                        **overrides)
    optimizer = optim.make_optimizer(setup.model, s)
    scheduler = optim.make_scheduler(optimizer, s)
    stream = setups.windows(setup, s)
    rates = [engine.train_step(setup.model, optimizer, next(stream), s, setup,
                               scheduler=scheduler).lr for _ in range(steps)]
    return rates, setup


def test_scheduler_per_step_matches_the_big_batch_exactly_per_micro_batch_runs_n_times_fast():
    steps, n = 12, 4
    big, big_setup = trained(steps)
    per_step, per_step_setup = trained(steps, accum_steps=n, scheduler_step="per-step")
    fast, fast_setup = trained(steps, accum_steps=n, scheduler_step="per-micro-batch")
    schedule = [0.1 * optim.warmup_cosine(3, steps, k) for k in range(steps * n)]
    assert big == per_step == schedule[:steps]
    assert fast == [schedule[min(t * n, len(schedule) - 1)] for t in range(steps)]
    assert fast[3:] == [0.0] * (steps - 3)  # the schedule ended at step 12 / 4
    for a, b in zip(per_step_setup.model.parameters(), big_setup.model.parameters(),
                    strict=True):
        assert_close(a, b, rtol=1e-12, atol=1e-14)
    moved = sum(float((a - b).detach().norm()) for a, b in zip(
        fast_setup.model.parameters(), big_setup.model.parameters(), strict=True))
    assert moved > 1e-3


# ----------------------------------------------------------------------------- last window

def window_sizes(epoch_end: str, count: int, batch_size: int = 96) -> list[int]:
    s, setup = prepared(batch_size=batch_size, epoch_end=epoch_end)
    stream = setups.windows(setup, s)
    return [num_examples(next(stream)) for _ in range(count)]


def test_epoch_ends_make_windows_of_the_epochs_last_examples():
    # 1024 examples, B = 96: 10 full windows and 64 left in each epoch
    assert window_sizes("run-on", 23) == [96] * 23
    assert window_sizes("short-window", 23) == ([96] * 10 + [64]) * 2 + [96]
    assert window_sizes("carry-over", 21) == [96] * 10 + [160] + [96] * 9 + [160]
    assert window_sizes("short-window", 4, batch_size=256) == [256] * 4  # 1024 = 4 x 256


def test_short_window_and_carry_over_read_every_example_once_per_epoch():
    n = 1024
    for epoch_end, count in (("short-window", 11), ("carry-over", 11)):
        s, setup = prepared(batch_size=96, epoch_end=epoch_end)
        setup.train = (torch.arange(n, dtype=torch.float64)[:, None], setup.train[1])
        stream = setups.windows(setup, s)
        seen = torch.cat([next(stream)[0].flatten() for _ in range(count)])
        first_epoch = seen[:n] if epoch_end == "short-window" else seen[:960]
        assert len(set(first_epoch.tolist())) == len(first_epoch)  # no example twice
        if epoch_end == "carry-over":  # the held 64 come first in the 11th window
            assert sorted(seen[:1024].tolist()) == list(range(n))


def test_the_short_window_weighted_by_its_size_is_the_big_batch():
    # B = 24, N = 4: micro-batches of 6; a short window of 12 holds 2 of them
    assert engine.micro_batch_count(12, Settings(**BASE, accum_steps=4)) == 2
    big = gradient(window_size=12)
    assert_close(gradient(window_size=12, accum_steps=4, loss_scale="by-size"), big,
                 rtol=1e-12, atol=1e-14)
    # divided by N anyway (each micro-batch's mean / 4): 2 of 4 micro-batches, half the gradient
    divided = gradient(window_size=12, accum_steps=4, loss_scale="by-count")
    assert_close(divided, 0.5 * big, rtol=1e-12, atol=1e-14)
    # on a full window the two loss scales agree
    assert_close(gradient(accum_steps=4, loss_scale="by-count"),
                 gradient(accum_steps=4, loss_scale="by-size"), rtol=1e-12, atol=1e-14)


def test_a_window_not_flushed_adds_its_gradient_to_the_next_step():
    s, setup = prepared(accum_steps=4, epoch_end="carry-over")
    held, window = (take(setup.train, torch.arange(12)),
                    take(setup.train, torch.arange(12, 36)))
    merged = take(setup.train, torch.arange(36))
    parts = engine.step_windows(merged, s)
    assert [num_examples(p) for p in parts] == [12, 24]

    def grad_of(batch, settings) -> torch.Tensor:
        setup.model.zero_grad(set_to_none=True)
        engine.window_gradient(setup.model, batch, settings, setup)
        return torch.cat([p.grad.flatten() for p in setup.model.parameters()])

    flushed = Settings(**{**BASE, "accum_steps": 4, "epoch_end": "short-window"})
    assert_close(grad_of(merged, s), grad_of(held, flushed) + grad_of(window, flushed),
                 rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- dropout

DROPOUT = dict(hidden=16, depth=2, dropout=0.3)


def test_dropout_in_eval_mode_accumulates_exactly():
    big = gradient(**DROPOUT, dropout_mode="eval")
    assert_close(gradient(**DROPOUT, dropout_mode="eval", accum_steps=4), big,
                 rtol=1e-12, atol=1e-14)
    assert rel_err(gradient(**DROPOUT), big) > 0.05  # train mode drops something


def test_dropout_stream_masks_differ_per_example_masks_agree():
    stream_big = gradient(**DROPOUT)
    assert rel_err(gradient(**DROPOUT, accum_steps=4), stream_big) > 0.05
    per_example_big = gradient(**DROPOUT, dropout_masks="per-example")
    assert_close(gradient(**DROPOUT, dropout_masks="per-example", accum_steps=4),
                 per_example_big, rtol=1e-12, atol=1e-14)
    assert_close(gradient(**DROPOUT, dropout_masks="per-example", accum_steps=24),
                 per_example_big, rtol=1e-12, atol=1e-14)
    # ... and they are masks: another random state draws others
    assert rel_err(gradient(seed_state=1, **DROPOUT, dropout_masks="per-example"),
                   per_example_big) > 0.05


def test_per_example_masks_do_not_depend_on_the_dtype():
    float64 = gradient(**DROPOUT, dropout_masks="per-example")
    float32 = gradient(**{**DROPOUT, "dtype": "float32"}, dropout_masks="per-example")
    assert_close(float32.double(), float64, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the experiments

def checked(run: Path) -> None:
    result = gradlab("compare", run, "--check")
    assert result.exit_code == 0, result.stderr


def probes(run: Path) -> pd.DataFrame:
    table = pd.read_csv(run / "probe.csv")
    return table[table["param"] == "*"]


@pytest.fixture(scope="module")
def clipping_run(tmp_path_factory) -> Path:
    return run_dir("clipping", "--set", "steps=2", "--set", "accum_steps=2,8",
                   "--out", tmp_path_factory.mktemp("clipping"))


def test_clipping_experiment(clipping_run):
    checked(clipping_run)
    summary = pd.read_csv(clipping_run / "summary.csv").set_index(["arm", "accum_steps"])
    for n in (2, 8):
        after = summary.loc[("after-accumulation", n)]
        assert after["verdict"] == "equivalent"
        assert after["max_exact_err"] < 1e-6
        assert summary.loc[("per-micro-batch", n), "verdict"] == "differs"
    assert 0.3 < summary.loc[("per-micro-batch", 2), "max_exact_err"] \
        < summary.loc[("per-micro-batch", 8), "max_exact_err"] < 1.0
    steps = pd.read_csv(clipping_run / "steps.csv")
    base = steps[steps["arm"] == "big-batch"]
    assert_close(torch.tensor(base["grad_norm"].values), torch.full((len(base),), 0.1,
                 dtype=torch.float64), rtol=1e-5, atol=0)  # active at every step


@pytest.fixture(scope="module")
def scheduler_run(tmp_path_factory) -> Path:
    return run_dir("scheduler", "--set", "steps=12", "--set", "warmup_steps=4",
                   "--out", tmp_path_factory.mktemp("scheduler"))


def test_scheduler_experiment(scheduler_run):
    checked(scheduler_run)
    steps = pd.read_csv(scheduler_run / "steps.csv")
    lr = {arm: group.sort_values("step")["lr"].tolist() for arm, group in steps.groupby("arm")}
    schedule = [optim.warmup_cosine(4, 12, k) for k in range(12 * 4)]  # lr = 1.0
    assert lr["big-batch"] == lr["per-step"] == schedule[:12]
    assert lr["per-micro-batch"] == [schedule[min(4 * t, 47)] for t in range(12)]
    per_step = steps[steps["arm"] == "per-step"]
    assert per_step["rel_loss_diff"].max() < 1e-13  # the same loss curve
    fast = steps[steps["arm"] == "per-micro-batch"]
    assert fast["rel_loss_diff"].iloc[-1] > 0.01
    summary = pd.read_csv(scheduler_run / "summary.csv").set_index("arm")
    assert summary.loc["per-step", "max_rel_lr_diff"] == 0
    # 1: at step 2 it applies 1.0 where the big batch applies 0.5, at step 4 0 where it applies 1
    assert summary.loc["per-micro-batch", "max_rel_lr_diff"] == 1.0
    # its gradient at the baseline's weights is right: the learning rate makes it differ
    assert summary.loc["per-micro-batch", "max_exact_err"] < 1e-14
    assert summary.loc["per-micro-batch", "verdict"] == "differs"


def test_scheduler_run_gets_a_learning_rate_figure(scheduler_run, tmp_path):
    from gradlab.readers import plots
    from gradlab.record import store

    drawn = {p.name: p for p in plots.standard_plots([store.load_run(scheduler_run)])}
    assert "lr" in drawn and drawn["lr"].y == "applied_lr"
    lr = drawn["lr"].data.set_index(["arm", "step"])["applied_lr"]
    steps = pd.read_csv(scheduler_run / "steps.csv").set_index(["arm", "step"])["lr"]
    assert lr.sort_index().tolist() == steps.sort_index().tolist()
    result = gradlab("plot", scheduler_run, "-y", "lr", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "scheduler-lr-vs-step.png").exists()


@pytest.fixture(scope="module")
def last_window_run(tmp_path_factory) -> Path:
    return run_dir("last-window", "--set", "steps=13",
                   "--out", tmp_path_factory.mktemp("last-window"))


def test_last_window_experiment(last_window_run):
    checked(last_window_run)
    steps = pd.read_csv(last_window_run / "steps.csv").set_index(["arm", "step"])
    assert steps.loc[("big-batch", 11), "window_size"] == 64  # 1024 - 10 x 96
    assert steps.loc[("big-batch", 11), "epoch"] == 1
    assert steps.loc[("big-batch", 12), "epoch"] == 2
    assert steps.loc[("not-flushed", 11), "window_size"] == 160  # 64 held + 96
    assert steps.loc[("not-flushed", 11), "examples"] == 1120
    at = probes(last_window_run).set_index(["arm", "step"])["exact_err"]
    assert at[("by-size", 11)] < 1e-14  # the big batch on the short window too
    assert at[("divided-by-n", 10)] < 1e-14  # full windows: / N is right
    assert 0.2 < at[("divided-by-n", 11)] < 0.3  # 3 micro-batches of 4: about 1/4 short
    assert at[("not-flushed", 10)] < 1e-14
    assert ("not-flushed", 11) not in at  # no step of it ends where the short window does
    assert at[("not-flushed", 12)] > 0.5  # the held gradient on top of the next window's


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory) -> Path:
    return run_dir("dropout", "--set", "steps=1", "--set", "batch_size=32",
                   "--out", tmp_path_factory.mktemp("dropout"))


def test_dropout_experiment(dropout_run):
    checked(dropout_run)
    summary = pd.read_csv(dropout_run / "summary.csv")
    acc = summary[summary["arm"] == "accumulated"].set_index("trial")
    assert acc.loc[0, "dropout_mode"] == "eval" and acc.loc[0, "max_exact_err"] < 1e-14
    assert acc.loc[1, "dropout_masks"] == "stream" and acc.loc[1, "max_exact_err"] > 0.1
    assert acc.loc[2, "dropout_masks"] == "per-example" and acc.loc[2, "max_exact_err"] < 1e-14
    checks = pd.read_csv(dropout_run / "checks.csv")
    assert len(checks) == 1 and bool(checks["passed"].iloc[0])
    mean = checks["value"].iloc[0]
    assert mean < 0.25 * acc.loc[1, "max_exact_err"]  # the mean of 256 draws, near 0


def test_the_mask_average_check_catches_a_biased_accumulation(tmp_path):
    # the loss not divided by N: the mean difference is (N - 1) x the gradient, not 0
    run = run_dir("dropout", "--set", "steps=1", "--set", "mask_draws=64",
                  "--set", "batch_size=16", "--set", "accumulated.loss_scale=none",
                  "--out", tmp_path, exit_code=1)
    checks = pd.read_csv(run / "checks.csv")
    assert not bool(checks["passed"].iloc[0])
    assert checks["value"].iloc[0] > checks["tolerance"].iloc[0]


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize(("args", "expected"), [
    (["clipping", "--set", "clip_norm=-1"], "clip_norm=-1.0; give the largest gradient norm"),
    (["clipping", "--set", "clip_norm=0"], "asks for clipping but clip_norm=0.0"),
    (["scheduler", "--set", "scheduler=step"], "scheduler = 'step' is not allowed"),
    (["scheduler", "--set", "scheduler_step=per-epoch"], "scheduler_step = 'per-epoch'"),
    (["scheduler", "--set", "warmup_steps=40"], "leaves none of the steps=40"),
    (["equivalence", "--set", "warmup_steps=3"], "needs a schedule, but scheduler=none"),
    (["dropout", "--set", "dropout=1"], "a dropout rate must be in [0, 1)"),
    (["dropout", "--set", "dropout=-0.1"], "a dropout rate must be in [0, 1)"),
    (["dropout", "--set", "dropout=1.5"], "a dropout rate must be in [0, 1)"),
    (["dropout", "--set", "mask_draws=1"], "need at least 2 draws"),
    (["equivalence", "--set", "mask_draws=8"], "there are none"),
    (["tokens", "--set", "dropout=0.1"], "only the built-in mlp and cnn have a dropout layer"),
    (["last-window", "--set", "epoch_end=drop"], "choose one of: run-on, short-window"),
    (["last-window", "--set", "norm=bn", "--set", "batch_size=93"],
     "BatchNorm1d would see micro-batches of 1 example (1024 examples in windows of "
     "batch_size=93 leave 1 at each epoch's end"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_pitfall_setting_is_one_line_and_exit_2(tmp_path, args, expected):
    out = tmp_path / "results"
    assert_clean_failure(gradlab("run", *args, "--out", out), expected, out)
