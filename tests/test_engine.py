"""The engine on its own: accumulated gradients against the big batch, at the same weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gradlab import engine
from gradlab.spec import Settings

B = 24
PAIRS = [(24, 1), (12, 2), (8, 3), (6, 4), (3, 8), (1, 24)]  # (micro_batch, N), B = 24


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 6, generator=g, dtype=torch.float64)
    y = torch.randn(B, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    return model.double(), x, y


def gradient(settings: Settings, seed: int = 0) -> torch.Tensor:
    model, x, y = make_problem(seed)
    engine.accumulate(model, x, y, settings, "mse")
    return torch.cat([p.grad.flatten() for p in model.parameters()])


BIG = Settings(batch_size=B, accum_steps=1, dtype="float64")


@pytest.mark.parametrize(("micro_batch", "accum_steps"), PAIRS)
def test_accumulated_gradient_equals_big_batch(micro_batch, accum_steps):
    assert micro_batch * accum_steps == B
    accumulated = gradient(dataclasses.replace(BIG, accum_steps=accum_steps))
    torch.testing.assert_close(accumulated, gradient(BIG), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("micro_batch", "accum_steps"), PAIRS[1:])
def test_unscaled_loss_gives_n_times_the_gradient(micro_batch, accum_steps):
    unscaled = gradient(dataclasses.replace(BIG, accum_steps=accum_steps, loss_scale="none"))
    torch.testing.assert_close(unscaled, accum_steps * gradient(BIG), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(unscaled, gradient(BIG), rtol=1e-3)


@pytest.mark.parametrize("accum_steps", [5, 7, 10])  # 24 examples do not split evenly
def test_uneven_split_weighted_by_size_is_exact(accum_steps):
    sizes = [len(t) for t in torch.tensor_split(torch.arange(B), accum_steps)]
    assert len(set(sizes)) == 2
    by_size = gradient(dataclasses.replace(BIG, accum_steps=accum_steps))
    torch.testing.assert_close(by_size, gradient(BIG), rtol=1e-12, atol=1e-14)
    # the textbook loss/N over-weights the smaller micro-batches' examples
    by_count = gradient(dataclasses.replace(BIG, accum_steps=accum_steps, loss_scale="by-count"))
    assert (by_count - gradient(BIG)).norm() / gradient(BIG).norm() > 1e-3


def test_zero_grad_every_step_keeps_only_the_last_micro_batch():
    settings = dataclasses.replace(BIG, accum_steps=4, zero_grad="every-step")
    model, x, y = make_problem()
    engine.accumulate(model, x, y, settings, "mse")
    last = torch.cat([p.grad.flatten() for p in model.parameters()])
    model, _, _ = make_problem()
    engine.mean_loss(model, x[-6:], y[-6:], "mse").mul(6 / B).backward()
    torch.testing.assert_close(last, torch.cat([p.grad.flatten() for p in model.parameters()]),
                               rtol=1e-12, atol=1e-14)


def test_split_keeps_order_and_sizes():
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    parts = engine.split(x, y, 3)
    assert [len(p[0]) for p in parts] == [4, 3, 3]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)


def test_train_step_reports_the_step_it_took():
    model, x, y = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    stats = engine.train_step(model, optimizer, x, y, BIG, "mse")
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert stats.update_norm == pytest.approx(0.1 * stats.grad_norm, rel=1e-12)
    assert (after - before).norm().item() == pytest.approx(stats.update_norm, rel=1e-12)
    assert all(p.grad is None for p in model.parameters())  # every-n zeroed after the step
