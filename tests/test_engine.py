"""The engine on its own: accumulated gradients against the big batch, at the same weights.

Two kinds of batch: (x, y) tensors with one loss unit per example, and dict batches
of padded, variable-length sequences whose loss units are non-padding tokens.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from gradlab.config.settings import LossScale, RankSplit, Settings, WindowOrder, ZeroGrad
from gradlab.errors import GradlabError
from gradlab.setup import Setup, mse_loss, split
from gradlab.train import engine
from gradlab.zoo.text import TransformerLanguageModel, count_tokens, lm_loss, token_examples

B = 24
PAIRS = [(24, 1), (12, 2), (8, 3), (6, 4), (3, 8), (1, 24)]  # (micro_batch, N), B = 24
BIG = Settings(batch_size=B, accum_steps=1, dtype="float64")


def regression_setup(seed: int = 0) -> Setup:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 6, generator=g, dtype=torch.float64)
    y = torch.randn(B, 1, generator=g, dtype=torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    return Setup(model.double(), (x, y), mse_loss)


def token_setup(min_len: int = 4, max_len: int = 40) -> Setup:
    """B padded sequences whose lengths vary 10x: the units are their non-pad tokens."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TransformerLanguageModel(max_len=max_len).double()
    return Setup(model, token_examples(B, min_len, max_len, seed=3), lm_loss, units=count_tokens)


def gradient(settings: Settings, make=regression_setup) -> torch.Tensor:
    setup = make()
    engine.window_gradient(setup.model, setup.train, settings, setup)
    return torch.cat([p.grad.flatten() for p in setup.model.parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("micro_batch", "accum_steps"), PAIRS)
def test_accumulated_gradient_equals_big_batch(micro_batch, accum_steps):
    assert micro_batch * accum_steps == B
    accumulated = gradient(dataclasses.replace(BIG, accum_steps=accum_steps))
    assert_close(accumulated, gradient(BIG), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("micro_batch", "accum_steps"), PAIRS[1:])
def test_unscaled_loss_gives_n_times_the_gradient(micro_batch, accum_steps):
    unscaled = gradient(dataclasses.replace(BIG, accum_steps=accum_steps, loss_scale="none"))
    assert_close(unscaled, accum_steps * gradient(BIG), rtol=1e-12, atol=1e-14)
    assert rel_err(unscaled, gradient(BIG)) == pytest.approx(accum_steps - 1, rel=1e-9)


@pytest.mark.parametrize("accum_steps", [5, 7, 10])  # 24 examples do not split evenly
def test_uneven_split_weighted_by_size_is_exact(accum_steps):
    sizes = [len(t) for t in torch.tensor_split(torch.arange(B), accum_steps)]
    assert len(set(sizes)) == 2
    by_size = gradient(dataclasses.replace(BIG, accum_steps=accum_steps))
    assert_close(by_size, gradient(BIG), rtol=1e-12, atol=1e-14)
    # the textbook loss/N over-weights the smaller micro-batches' examples
    by_count = gradient(dataclasses.replace(BIG, accum_steps=accum_steps, loss_scale="by-count"))
    assert rel_err(by_count, gradient(BIG)) > 1e-3


# ----------------------------------------------------------------------------- tokens

TOKEN_PAIRS = [(12, 2), (8, 3), (6, 4), (3, 8)]  # (micro_batch, N), B = 24


@pytest.mark.parametrize(("micro_batch", "accum_steps"), [*TOKEN_PAIRS, (5, 5), (4, 7)])
def test_token_batches_global_normalisation_equals_big_batch(micro_batch, accum_steps):
    """Dict batches, lengths 4..40, even and uneven splits: summed loss / window tokens."""
    setup = token_setup()
    tokens = [int(count_tokens(mb)) for mb in split(setup.train, accum_steps)]
    assert len(set(tokens)) > 1  # the micro-batches really hold different token counts
    s = dataclasses.replace(BIG, accum_steps=accum_steps)
    assert_close(gradient(s, token_setup), gradient(BIG, token_setup), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("micro_batch", "accum_steps"), TOKEN_PAIRS)
def test_token_batches_mean_of_means_differs(micro_batch, accum_steps):
    """The pre-fix transformers loss: each micro-batch's mean token loss / N."""
    s = dataclasses.replace(BIG, accum_steps=accum_steps, loss_scale=LossScale.BY_COUNT)
    assert rel_err(gradient(s, token_setup), gradient(BIG, token_setup)) > 1e-3


def test_token_batches_of_equal_length_make_mean_of_means_exact():
    def equal():
        return token_setup(min_len=40, max_len=40)

    s = dataclasses.replace(BIG, accum_steps=4, loss_scale=LossScale.BY_COUNT)
    assert_close(gradient(s, equal), gradient(BIG, equal), rtol=1e-12, atol=1e-15)


def test_window_returns_summed_loss_and_units():
    setup = token_setup()
    s = dataclasses.replace(BIG, accum_steps=3)
    loss, units, skip = engine.window_gradient(setup.model, setup.train, s, setup)
    whole_loss, whole_units = lm_loss(setup.model, setup.train)
    assert int(units) == int(whole_units) == int(count_tokens(setup.train))
    assert_close(loss, whole_loss.detach(), rtol=1e-12, atol=0)
    assert skip is False  # no GradScaler: nothing is ever skipped


# ----------------------------------------------------------------------------- policies

def test_zero_grad_every_step_keeps_only_the_last_micro_batch():
    setup = regression_setup()
    settings = dataclasses.replace(BIG, accum_steps=4, zero_grad="every-step")
    engine.window_gradient(setup.model, setup.train, settings, setup)
    last = torch.cat([p.grad.flatten() for p in setup.model.parameters()])
    alone = regression_setup()
    loss, _ = mse_loss(alone.model, split(alone.train, 4)[-1])
    (loss / B).backward()  # by-size: its summed loss over the window's B examples
    assert_close(last, torch.cat([p.grad.flatten() for p in alone.model.parameters()]),
                 rtol=1e-12, atol=1e-14)


def test_split_keeps_order_and_sizes():
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    parts = split((x, y), 3)
    assert [len(p[0]) for p in parts] == [4, 3, 3]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    as_dict = split({"x": x, "y": y}, 3)
    assert [len(p["y"]) for p in as_dict] == [4, 3, 3]
    assert torch.equal(torch.cat([p["y"] for p in as_dict]), y)


def test_train_step_reports_the_step_it_took():
    setup = regression_setup()
    optimizer = torch.optim.SGD(setup.model.parameters(), lr=0.1)
    before = torch.cat([p.detach().flatten() for p in setup.model.parameters()])
    s = dataclasses.replace(BIG, update_norm=True)
    stats = engine.train_step(setup.model, optimizer, setup.train, s, setup)
    after = torch.cat([p.detach().flatten() for p in setup.model.parameters()])
    assert stats.update_norm == pytest.approx(0.1 * stats.grad_norm, rel=1e-12)
    assert (after - before).norm().item() == pytest.approx(stats.update_norm, rel=1e-12)
    assert stats.units == B
    assert all(p.grad is None for p in setup.model.parameters())  # every-n zeroed after the step


@pytest.mark.parametrize("policy", [LossScale, ZeroGrad])
def test_every_policy_value_is_handled(policy):
    """No value falls through to a default: each one runs, and each gives its own gradient."""
    field = {LossScale: "loss_scale", ZeroGrad: "zero_grad"}[policy]
    grads = {}
    for value in policy:
        s = dataclasses.replace(BIG, accum_steps=5, **{field: value})  # uneven split
        setup = regression_setup()
        optimizer = torch.optim.SGD(setup.model.parameters(), lr=0.1)
        engine.train_step(setup.model, optimizer, setup.train, s, setup)
        engine.train_step(setup.model, optimizer, setup.train, s, setup)
        grads[value] = torch.cat([p.detach().flatten() for p in setup.model.parameters()])
    # by-rank-size and by-size-then-mean are by-size on one process (its rank's units are the
    # window's, and there is no mean over ranks to divide by W): they differ only on ranks,
    # where test_ddp's two-rank runs of ddp-tokens and fsdp measure them
    one_process_alike = {LossScale.BY_RANK_SIZE: LossScale.BY_SIZE,
                         LossScale.BY_SIZE_THEN_MEAN: LossScale.BY_SIZE}
    for value, same in one_process_alike.items():
        if value in grads:
            assert_close(grads.pop(value), grads[same], rtol=0, atol=0)
    distinct = {tuple(g.tolist()) for g in grads.values()}
    assert len(distinct) == len(grads)


def test_settings_hold_policy_members_even_when_given_strings():
    s = Settings(loss_scale="by-count", zero_grad="never")
    assert s.loss_scale is LossScale.BY_COUNT and s.zero_grad is ZeroGrad.NEVER
    with pytest.raises(ValueError):
        Settings(loss_scale="by-magic")


def test_the_update_norm_is_measured_only_when_asked():
    """It needs a copy of every parameter, so by default the step takes none: NaN."""
    setup = regression_setup()
    optimizer = torch.optim.SGD(setup.model.parameters(), lr=0.1)
    stats = engine.train_step(setup.model, optimizer, setup.train, BIG, setup)
    assert stats.update_norm != stats.update_norm  # NaN
    assert stats.grad_norm > 0 and stats.units == B


def test_the_gradient_norm_is_that_of_the_gradient_applied_in_low_precision_too():
    for dtype, rtol in ((torch.float64, 1e-14), (torch.float32, 1e-6), (torch.bfloat16, 1e-6)):
        setup = regression_setup()
        model = setup.model.to(dtype)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        # zero_grad never: .grad still holds, after the step, the gradient it applied
        s = dataclasses.replace(BIG, zero_grad="never", dtype=str(dtype).split(".")[1])
        window = tuple(t.to(dtype) for t in setup.train)
        stats = engine.train_step(model, optimizer, window, s, Setup(model, window, mse_loss))
        grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
        assert stats.grad_norm == pytest.approx(float(grads.norm()), rel=rtol), dtype


# ----------------------------------------------------------------------------- tokens on ranks

def mean_over_ranks(settings: Settings, ranks: int, make=token_setup) -> torch.Tensor:
    """What DDP's all-reduce makes of W ranks: each rank accumulates its own micro-batches of
    the window (engine.plan_window), normalised as the engine normalises them on W ranks,
    and the step receives the mean of the ranks' gradients (taken here by hand: the engine's
    arithmetic at any W, without W processes)."""
    grads = []
    for rank in range(ranks):
        setup = make()
        for mb in engine.plan_window(setup.train, settings, setup, rank, ranks).micro_batches:
            loss, units = setup.batch_loss(setup.model, mb.examples)
            engine.normalised(loss, units, mb.window_units, settings, ranks,
                              mb.rank_units).backward()
        grads.append(torch.cat([p.grad.flatten() for p in setup.model.parameters()]))
    return torch.stack(grads).mean(0)


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("accum_steps", [2, 3])
def test_on_ranks_only_every_ranks_token_count_is_the_big_batch(ranks, accum_steps):
    """Lengths 4..40: the ranks' shares of the window hold different token counts."""
    s = dataclasses.replace(BIG, accum_steps=accum_steps)
    big = gradient(BIG, token_setup)
    # by-size: the window's tokens on every rank, times W against DDP's mean (the fix)
    assert_close(mean_over_ranks(s, ranks), big, rtol=1e-12, atol=1e-15)
    # by-rank-size: this rank's tokens only; a token weighs more where fewer fell
    per_rank = dataclasses.replace(s, loss_scale=LossScale.BY_RANK_SIZE)
    assert rel_err(mean_over_ranks(per_rank, ranks), big) > 1e-3
    # by-size-then-mean: the window's tokens, as one process divides, then the mean: 1/W
    global_batch = dataclasses.replace(s, loss_scale=LossScale.BY_SIZE_THEN_MEAN)
    assert_close(mean_over_ranks(global_batch, ranks), big / ranks, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("ranks", [2, 4])
def test_sorted_by_length_the_ranks_skew_and_only_every_ranks_count_holds(ranks):
    """window_order=by-length (a length-grouped sampler): rank 0 takes the shortest sequences,
    the last rank the longest. Every rank's count stays the big batch; this rank's own count
    errs more than on the window as drawn, because the ranks' shares differ more."""
    s = dataclasses.replace(BIG, accum_steps=2)
    grouped = dataclasses.replace(s, window_order=WindowOrder.BY_LENGTH)
    setup = token_setup()
    plans = [engine.plan_window(setup.train, grouped, setup, r, ranks) for r in range(ranks)]
    shares = [int(p.micro_batches[0].rank_units) for p in plans]
    assert shares == sorted(shares) and shares[0] < shares[-1]
    big = gradient(BIG, token_setup)
    assert_close(mean_over_ranks(grouped, ranks), big, rtol=1e-12, atol=1e-15)
    per_rank = dataclasses.replace(s, loss_scale=LossScale.BY_RANK_SIZE)
    drawn = rel_err(mean_over_ranks(per_rank, ranks), big)
    skewed = rel_err(mean_over_ranks(dataclasses.replace(
        per_rank, window_order=WindowOrder.BY_LENGTH), ranks), big)
    assert skewed > 2 * drawn > 0


@pytest.mark.parametrize("ranks", [2, 4])
def test_context_shards_add_up_to_the_window_and_only_every_ranks_count_holds(ranks):
    """rank_split=tokens: every rank reads every sequence and scores its own 1/W of the
    positions. The shards' tokens partition the window's; every rank's count (x W against
    the mean) is the big batch, each shard's own count is not (later shards hold fewer
    tokens: padding), and the global count without x W is 1/W (Megatron-LM PR #7513's
    halving at CP = 2)."""
    s = dataclasses.replace(BIG, accum_steps=2, rank_split=RankSplit.TOKENS)
    setup = token_setup()
    plans = [engine.plan_window(setup.train, s, setup, r, ranks) for r in range(ranks)]
    shares = [int(p.micro_batches[0].rank_units) for p in plans]
    assert sum(shares) == int(setup.count_units(setup.train)) == int(plans[0].units)
    assert shares[0] > shares[-1]  # the last positions are mostly padding
    big = gradient(BIG, token_setup)
    assert_close(mean_over_ranks(s, ranks), big, rtol=1e-12, atol=1e-15)
    shard = dataclasses.replace(s, loss_scale=LossScale.BY_RANK_SIZE)
    assert rel_err(mean_over_ranks(shard, ranks), big) > 1e-2
    whole = dataclasses.replace(s, loss_scale=LossScale.BY_SIZE_THEN_MEAN)
    assert_close(mean_over_ranks(whole, ranks), big / ranks, rtol=1e-12, atol=1e-15)


def test_context_shards_need_token_sequences():
    s = dataclasses.replace(BIG, rank_split=RankSplit.TOKENS)
    setup = regression_setup()
    with pytest.raises(GradlabError, match="rank_split=tokens .* needs a token setup"):
        engine.plan_window(setup.train, s, setup, 0, 2)


def test_on_ranks_of_equal_lengths_this_ranks_tokens_are_enough():
    def equal():
        return token_setup(min_len=40, max_len=40)

    s = dataclasses.replace(BIG, accum_steps=2, loss_scale=LossScale.BY_RANK_SIZE)
    assert_close(mean_over_ranks(s, 4, equal), gradient(BIG, equal), rtol=1e-12, atol=1e-15)


def test_on_one_process_this_ranks_tokens_are_the_windows():
    s = dataclasses.replace(BIG, accum_steps=3)
    per_rank = dataclasses.replace(s, loss_scale=LossScale.BY_RANK_SIZE)
    assert_close(gradient(per_rank, token_setup), gradient(s, token_setup), rtol=0, atol=0)
