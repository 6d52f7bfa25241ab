"""Losses that couple the batch: plain accumulation changes the loss, GradCache does not.

Engine-level tests use small synthetic pairs (tests/contrastive_setups.py) in float64;
the CLI tests run the built-in `contrastive` experiment cut down to a few steps.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from pathlib import Path

import contrastive_setups as cs
import pandas as pd
import pytest
import torch
from torch.testing import assert_close

from conftest import gradlab
from gradlab.config.settings import Accumulation, Settings, ZeroGrad
from gradlab.config.spec import load_spec
from gradlab.errors import GradlabError
from gradlab.lab.setups import build_setup
from gradlab.setup import Setup, split
from gradlab.train import engine, gradcache, optim
from gradlab.train.memory import SavedTensors, saved_tensor_bytes
from minirun import run_dir
from test_cli import assert_clean_failure

B = 32
BIG = Settings(batch_size=B, accum_steps=1, dtype="float64")


def gradient(settings: Settings, make=cs.in_batch, seed: int = 0) -> torch.Tensor:
    """The window's gradient from fixed initial weights (and a fixed random stream)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        setup = make(settings)
        engine.window_gradient(setup.model, setup.train, settings, setup)
    return torch.cat([p.grad.flatten() for p in setup.model.parameters()])


def arm(n: int, accumulation: str) -> Settings:
    return dataclasses.replace(BIG, accum_steps=n, accumulation=accumulation)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- engine

@pytest.mark.parametrize("n", [2, 3, 4, 8, 32])  # 3: micro-batches of 11, 11 and 10
def test_gradcache_is_the_big_batch_gradient(n):
    assert_close(gradient(arm(n, "gradcache")), gradient(BIG), rtol=1e-12, atol=1e-15)


def test_plain_accumulation_of_a_coupled_loss_differs_more_as_n_grows():
    big = gradient(BIG)
    errors = [rel_err(gradient(arm(n, "plain")), big) for n in (2, 4, 8, 16)]
    assert errors[0] > 1e-2, errors
    assert errors == sorted(errors), errors  # fewer negatives, a loss further from B's
    assert rel_err(gradient(arm(1, "plain")), big) == 0.0  # one micro-batch is the big batch


def test_auto_is_gradcache_for_a_coupled_loss_and_plain_otherwise():
    coupled, per_example = cs.in_batch(BIG), cs.per_example(BIG)
    assert gradcache.accumulation(arm(4, "auto"), coupled) == Accumulation.GRADCACHE
    assert gradcache.accumulation(arm(1, "auto"), coupled) == Accumulation.PLAIN  # nothing to split
    assert gradcache.accumulation(arm(4, "auto"), per_example) == Accumulation.PLAIN
    assert_close(gradient(arm(4, "auto")), gradient(arm(4, "gradcache")), rtol=0, atol=0)


def test_gradcache_takes_embeddings_given_as_one_tensor():
    one = cs.one_tensor
    assert_close(gradient(arm(4, "gradcache"), one), gradient(BIG, one), rtol=1e-12, atol=1e-15)
    assert rel_err(gradient(arm(4, "plain"), one), gradient(BIG, one)) > 1e-2


def test_gradcache_replays_the_random_state_so_dropout_draws_the_same_masks(monkeypatch):
    """With dropout, the big batch draws other masks than N micro-batches do; the exact
    reference is the big graph built from the masks GradCache's first pass drew."""
    s = arm(4, "gradcache")

    def one_graph() -> torch.Tensor:  # every micro-batch embedded with a graph, in order
        with torch.random.fork_rng():
            torch.manual_seed(0)
            setup = cs.with_dropout(s)
            parts = [setup.embed(setup.model, mb) for mb in split(setup.train, 4)]
            za, zb = (torch.cat(z) for z in zip(*parts, strict=True))
            loss, units = setup.coupled_loss((za, zb))
            (loss / units).backward()
        return torch.cat([p.grad.flatten() for p in setup.model.parameters()])

    reference = one_graph()
    assert_close(gradient(s, cs.with_dropout), reference, rtol=1e-12, atol=1e-15)
    # without the replay the second pass draws new masks: the gradient is wrong
    monkeypatch.setattr(gradcache, "replayed", lambda state, device: contextlib.nullcontext())
    assert rel_err(gradient(s, cs.with_dropout), reference) > 1e-2


def test_gradcache_leaves_the_random_stream_as_one_pass_would():
    s = arm(4, "gradcache")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        setup = cs.with_dropout(s)
        engine.window_gradient(setup.model, setup.train, s, setup)
        after_gradcache = torch.rand(3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        setup = cs.with_dropout(s)
        engine.window_gradient(setup.model, setup.train, arm(4, "plain"), setup)
        after_one_pass = torch.rand(3)
    assert_close(after_gradcache, after_one_pass, rtol=0, atol=0)


def test_gradcache_honours_the_zero_grad_policy():
    s = dataclasses.replace(arm(4, "gradcache"), zero_grad=ZeroGrad.AFTER_BACKWARD)
    setup = cs.in_batch(s)
    engine.window_gradient(setup.model, setup.train, s, setup)
    assert all(p.grad is None for p in setup.model.parameters())


@pytest.mark.parametrize(("batch_size", "n"), [(32, 1), (32, 4), (10, 3), (7, 7)])
def test_negatives_each_example_met(batch_size, n):
    setup = cs.in_batch(BIG)
    s = dataclasses.replace(BIG, batch_size=batch_size, accum_steps=n)
    window = tuple(t[:batch_size] for t in setup.train)
    sizes = [len(mb[0]) for mb in split(window, n)]
    assert engine.micro_batch_sizes(batch_size, n) == sizes
    plain = engine.negatives(dataclasses.replace(s, accumulation="plain"), setup)
    assert plain == pytest.approx(sum(k * (k - 1) for k in sizes) / batch_size)
    assert engine.negatives(dataclasses.replace(s, accumulation="gradcache"), setup) \
        == batch_size - 1
    assert math.isnan(engine.negatives(s, cs.per_example(BIG)))  # no batch to couple


def test_negatives_of_an_uneven_split():
    s = dataclasses.replace(BIG, batch_size=10, accum_steps=3, accumulation="plain")
    assert engine.negatives(s, cs.in_batch(BIG)) == pytest.approx((4 * 3 + 3 * 2 + 3 * 2) / 10)


# ----------------------------------------------------------------------------- memory

def test_saved_tensor_bytes_counts_each_activation_once_and_no_parameter():
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float64))

    def step():
        h = x @ w  # saves x (for w's gradient); w itself is a parameter
        (h * h).sum().backward()  # saves h twice: one tensor

    _, peak = saved_tensor_bytes(step, exclude=[w])
    assert peak == (4 * 3 + 4 * 5) * 8
    _, with_w = saved_tensor_bytes(lambda: (x @ w).sum().backward())
    assert with_w == 4 * 3 * 8  # mm saves only what a gradient needs: x


def test_saved_tensors_are_released_by_backward():
    w = torch.nn.Parameter(torch.ones(8, dtype=torch.float64))
    with SavedTensors(exclude=[w]) as saved:
        for _ in range(3):  # each backward frees its graph before the next forward
            (torch.ones(100, 8, dtype=torch.float64) * w).relu().sum().backward()
        assert saved.live == 0
    one = 100 * 8 * 8 * 2  # the input and the relu's output
    assert saved.peak == one
    assert saved.total == 3 * one


def step_bytes(s: Settings, setup: Setup) -> int:
    """Activation bytes of one optimizer step on the first window, from the same weights."""
    setup = dataclasses.replace(setup, model=copy.deepcopy(setup.model))
    optimizer = optim.make_optimizer(setup.model, s)
    window = tuple(t[:s.batch_size] for t in setup.train)
    return engine.train_step(setup.model, optimizer, window, s, setup,
                             measure_memory=True).saved_bytes


def test_gradcache_holds_the_activations_of_a_micro_batch_and_the_loss_of_the_window():
    setup = cs.in_batch(BIG)
    big, naive, cached = (step_bytes(s, setup) for s in (BIG, arm(8, "plain"),
                                                          arm(8, "gradcache")))
    assert naive < cached < big  # gradcache also holds the loss's graph over B embeddings


def test_a_step_is_metered_only_when_asked():
    s = arm(8, "gradcache")
    setup = cs.in_batch(s)
    optimizer = optim.make_optimizer(setup.model, s)
    plain_step = engine.train_step(setup.model, optimizer, setup.train, s, setup,
                                   measure_memory=False)
    assert math.isnan(plain_step.saved_bytes)
    metered = engine.train_step(setup.model, optimizer, setup.train, s, setup,
                                measure_memory=True)
    assert metered.saved_bytes > 0


def test_contrastive_gradcache_at_micro_batch_b_over_8_holds_under_0_3_of_the_big_batch():
    """The must-show, on the built-in experiment's own encoder (float32, B = 64, N = 8)."""
    settings = {k: v for k, v in load_spec("contrastive").settings.items() if k != "steps"}
    s = Settings(**settings)
    setup = build_setup(s, torch.device("cpu"), {})
    big = step_bytes(s, setup)
    cached = step_bytes(dataclasses.replace(s, accum_steps=8, accumulation="gradcache"), setup)
    assert cached <= 0.3 * big, (cached, big)


# ----------------------------------------------------------------------------- setup

@pytest.mark.parametrize(("factory", "expected"), [
    (cs.embed_only, "Setup got embed but no coupled_loss"),
    (cs.both_losses, "Setup got loss and also embed/coupled_loss"),
])
def test_a_setup_that_half_declares_a_coupled_loss_is_refused(factory, expected):
    with pytest.raises(GradlabError, match=expected):
        factory(BIG)


def test_a_setup_needs_a_loss():
    with pytest.raises(GradlabError, match="Setup needs a loss"):
        Setup(torch.nn.Linear(2, 2), (torch.zeros(3, 2),))


# ----------------------------------------------------------------------------- CLI

# the contrastive experiment, cut down: a narrow encoder, 2 steps, float64, N = 1 and 4
SMALL = ["--set", "hidden=16", "--set", "depth=1", "--set", "steps=2", "--set", "probe_every=1",
         "--set", "dtype=float64", "--set", "accum_steps=1,4"]


MINI_EQUIVALENCE = ["--set", "model=mlp", "--set", "dataset=regression", "--set", "norm=none",
                    "--set", "accum_steps=2", "--set", "steps=3", "--set", "probe_every=2"]


@pytest.fixture(scope="module")
def contrastive_result(tmp_path_factory):
    """(run directory, stderr) of the cut-down contrastive run."""
    result = gradlab("run", "contrastive", *SMALL, "--json",
                     "--out", tmp_path_factory.mktemp("runs"))
    assert result.exit_code == 0, result.stderr
    return Path(json.loads(result.stdout)["run_dir"]), result.stderr


@pytest.fixture(scope="module")
def contrastive_run(contrastive_result):
    return contrastive_result[0]


def test_contrastive_run_keeps_its_promises(contrastive_run):
    summary = pd.read_csv(contrastive_run / "summary.csv")
    at4 = summary[summary["accum_steps"] == 4].set_index("arm")
    assert at4.loc["gradcache", "verdict"] == "equivalent"
    assert at4.loc["gradcache", "max_exact_err"] <= 1e-12
    assert at4.loc["naive-accumulation", "verdict"] == "differs"
    assert at4.loc["naive-accumulation", "max_exact_err"] > 1e-2
    assert gradlab("compare", contrastive_run, "--check").exit_code == 0


def test_contrastive_run_records_negatives_and_activation_bytes(contrastive_run):
    steps = pd.read_csv(contrastive_run / "steps.csv")
    summary = pd.read_csv(contrastive_run / "summary.csv")
    trial_n = summary.groupby("trial")["accum_steps"].max()  # the sweep's N of each trial
    steps["N"] = steps["trial"].map(trial_n)
    at4 = steps[steps["N"] == 4].groupby("arm")
    negatives = at4["negatives"].agg(["min", "max"])
    assert negatives.loc["big-batch"].tolist() == [63, 63]
    assert negatives.loc["gradcache"].tolist() == [63, 63]
    assert negatives.loc["naive-accumulation"].tolist() == [15, 15]
    saved = at4["saved_bytes"].max()
    assert saved["naive-accumulation"] < saved["gradcache"] < saved["big-batch"]
    assert (summary["max_saved_bytes"] > 0).all()
    assert steps["saved_bytes"].notna().all()  # probe_every=1: every step is metered


def test_plain_accumulation_of_a_coupled_loss_is_reported(contrastive_result):
    run, stderr = contrastive_result
    note = "note: arm 'naive-accumulation': the setup's loss couples the batch"
    assert stderr.count(note) == 1  # once per arm, whatever the number of trials
    assert "note: arm 'gradcache'" not in stderr and "note: arm 'big-batch'" not in stderr
    assert any(n.startswith(note) for n in json.loads((run / "run.json").read_text())["notes"])


def test_a_loss_per_example_records_no_negatives_and_is_never_metered(tmp_path):
    # the meter costs a Python call per saved tensor: only a coupled loss's runs read it
    out = run_dir("equivalence", *MINI_EQUIVALENCE, "--out", tmp_path)
    steps = pd.read_csv(out / "steps.csv")
    assert steps["negatives"].isna().all()
    assert steps["saved_bytes"].isna().all()


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "setup=contrastive_setups:per_example"],  # the gradcache arm
     "arm 'gradcache': accumulation=gradcache is for a loss that couples the batch"),
    (["--set", "setup=contrastive_setups:short_embeddings"],
     "embed returned [1] rows for a micro-batch of"),
    (["--set", "setup=contrastive_setups:embed_only"], "Setup got embed but no coupled_loss"),
    (["--set", "loss_scale=by-count"], "so loss_scale=by-count"),
    (["--set", "temperature=0"], "temperature=0.0"),
    (["--set", "accumulation=sometimes"], "choose one of: auto, plain, gradcache"),
])
def test_bad_contrastive_input_is_one_line_and_exit_2(tmp_path, args, expected):
    out = tmp_path / "results"
    result = gradlab("run", "contrastive", *SMALL, "--set", "batch_size=32", *args,
                     "--out", out)
    assert_clean_failure(result, expected, out)


@pytest.mark.parametrize(("sets", "expected"), [
    (["grad_accum_dtype=float32", "dtype=bfloat16"], "with grad_accum_dtype=float32"),
    (["epoch_end=carry-over"], "with epoch_end=carry-over"),
    (["clip_norm=1", "clip_at=per-micro-batch"], "has no partial sums to clip"),
])
def test_gradcache_refuses_what_it_does_not_combine_with(tmp_path, sets, expected):
    from test_cli import assert_clean_failure

    out = tmp_path / "results"
    args = [a for s in sets for a in ("--set", s)]
    result = gradlab("run", "contrastive", "--set", "accumulation=gradcache",
                     "--set", "accum_steps=4", "--set", "steps=1", *args, "--out", out)
    assert_clean_failure(result, expected, out)
