"""Training loops for tests/test_audit.py: tiny and synthetic, each with one property.

Each is train(micro_batch_size, accum_steps, max_steps) as `gradlab audit` calls it.
"""

from __future__ import annotations

import math
import random

import torch
from torch import nn


def _regression(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(256, 3, dtype=torch.float64)
    return x, x.sum(1, keepdim=True) + 0.1 * torch.randn(256, 1, dtype=torch.float64)


def _window(x, y, micro_batch_size, accum_steps, step):
    """The accum_steps micro-batches of one optimizer step, in order."""
    start = step * micro_batch_size * accum_steps
    for i in range(accum_steps):
        a = start + i * micro_batch_size
        yield x[a:a + micro_batch_size], y[a:a + micro_batch_size]


def _train(model, x, y, micro_batch_size, accum_steps, max_steps, loss_fn=nn.functional.mse_loss):
    """The right loop: loss / N, step and clear every N micro-batches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(max_steps):
        for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
            (loss_fn(model(xb), yb) / accum_steps).backward()
        optimizer.step()
        optimizer.zero_grad()


def never_steps(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    x, y = _regression()
    model = nn.Linear(3, 1).double()
    for step in range(max_steps):  # backward and nothing else: no optimizer anywhere
        for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
            nn.functional.mse_loss(model(xb), yb).backward()


def counts_micro_batches(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """Stops after max_steps micro-batches: the accumulated run makes max_steps / N steps."""
    x, y = _regression()
    model = nn.Linear(3, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(max_steps):
        xb, yb = x[i * micro_batch_size:(i + 1) * micro_batch_size], \
            y[i * micro_batch_size:(i + 1) * micro_batch_size]
        (nn.functional.mse_loss(model(xb), yb) / accum_steps).backward()
        if (i + 1) % accum_steps == 0:
            optimizer.step()
            optimizer.zero_grad()


def unseeded_shuffle(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """Shuffles with Python's random, which every process seeds differently."""
    x, y = _regression()
    order = list(range(len(x)))
    random.shuffle(order)
    model = nn.Linear(3, 1).double()
    _train(model, x[order], y[order], micro_batch_size, accum_steps, max_steps)


def wrong_signature(batch_size: int, steps: int) -> None:
    raise AssertionError("never called")


def raises(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    x, y = _regression()
    model = nn.Linear(3, 1).double()
    model(x[:micro_batch_size, :2])  # a shape mistake, as in real loops


def width_from_batch(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """The model's size depends on the batch size, so the two runs train different models."""
    x, y = _regression()
    model = nn.Sequential(nn.Linear(3, micro_batch_size), nn.Tanh(),
                          nn.Linear(micro_batch_size, 1)).double()
    _train(model, x, y, micro_batch_size, accum_steps, max_steps)


def right(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    x, y = _regression()
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    _train(model, x, y, micro_batch_size, accum_steps, max_steps)


def weight_decay_times_n(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """Scales weight decay with N ("the effective batch is N times larger")."""
    x, y = _regression()
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.001 * accum_steps)
    for step in range(max_steps):
        for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
            (nn.functional.mse_loss(model(xb), yb) / accum_steps).backward()
        optimizer.step()
        optimizer.zero_grad()


def not_divided(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    x, y = _regression()
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    _train(model, x, y, micro_batch_size, accum_steps, max_steps,
           loss_fn=lambda out, target: accum_steps * nn.functional.mse_loss(out, target))


def batchnorm(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    x, y = _regression()
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    _train(model.double(), x, y, micro_batch_size, accum_steps, max_steps)


def dropout(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """Two dropout layers: micro-batches draw their masks in another order than the big
    batch (A1 B1 A2 B2 ... against A B). With one layer on the CPU the masks coincide."""
    x, y = _regression()
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 8),
                          nn.Dropout(0.5), nn.Linear(8, 1))
    _train(model.double(), x, y, micro_batch_size, accum_steps, max_steps)


def separate_accumulation_branch(micro_batch_size: int, accum_steps: int,
                                 max_steps: int) -> None:
    """A hand-written accumulation branch that forgets zero_grad() after its step."""
    x, y = _regression()
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(max_steps):
        if accum_steps == 1:
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x[step * micro_batch_size:][:micro_batch_size]),
                                   y[step * micro_batch_size:][:micro_batch_size]).backward()
            optimizer.step()
        else:
            for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
                (nn.functional.mse_loss(model(xb), yb) / accum_steps).backward()
            optimizer.step()  # BUG: no zero_grad() after it


def _sequences(equal: bool):
    """Token sequences of length 1..8 (or all 8), padded with -100, which the loss ignores."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (256, 9), generator=g)
    if not equal:
        lengths = torch.randint(1, 9, (256,), generator=g)
        tokens[torch.arange(9) > lengths[:, None]] = -100
    return tokens[:, :-1].clamp(min=0), tokens[:, 1:]


def _language_model(micro_batch_size, accum_steps, max_steps, equal: bool) -> None:
    inputs, targets = _sequences(equal)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6)).double()

    def loss_fn(logits, target):  # the mean over this micro-batch's own tokens
        return nn.functional.cross_entropy(logits.reshape(-1, 6), target.reshape(-1),
                                           ignore_index=-100)

    _train(model, inputs, targets, micro_batch_size, accum_steps, max_steps, loss_fn)


def tokens_mean_per_micro_batch(micro_batch_size: int, accum_steps: int,
                                max_steps: int) -> None:
    _language_model(micro_batch_size, accum_steps, max_steps, equal=False)


def tokens_equal_lengths(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    _language_model(micro_batch_size, accum_steps, max_steps, equal=True)


def closure_step(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """The window's backward passes inside optimizer.step(closure), as torch's docs write a
    closure (zero_grad, then the gradient): right, but the gradient exists only in the step."""
    x, y = _regression()
    model = nn.Linear(3, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(max_steps):
        def closure(step=step):
            optimizer.zero_grad()
            total = 0.0
            for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
                loss = nn.functional.mse_loss(model(xb), yb) / accum_steps
                loss.backward()
                total += loss.detach()
            return total
        optimizer.step(closure)


def closure_step_without_division(micro_batch_size: int, accum_steps: int,
                                  max_steps: int) -> None:
    """The same closure, each micro-batch's mean not divided by N: N times the gradient."""
    x, y = _regression()
    model = nn.Linear(3, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(max_steps):
        def closure(step=step):
            optimizer.zero_grad()
            for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
                nn.functional.mse_loss(model(xb), yb).backward()
        optimizer.step(closure=closure)


def lbfgs(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """LBFGS calls its closure several times per step, at other weights after the first."""
    x, y = _regression()
    model = nn.Linear(3, 1).double()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    for step in range(max_steps):
        def closure(step=step):  # LBFGS needs the loss back
            optimizer.zero_grad()
            total = torch.zeros((), dtype=torch.float64)
            for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
                loss = nn.functional.mse_loss(model(xb), yb) / accum_steps
                loss.backward()
                total += loss.detach()
            return total
        optimizer.step(closure)


def positional(m: int, n: int, k: int) -> None:
    """The contract's three numbers under other names: gradlab calls it by position."""
    right(m, n, k)


def reordered(max_steps: int, accum_steps: int, micro_batch_size: int) -> None:
    """The contract's names in another order: gradlab calls it by name."""
    right(micro_batch_size, accum_steps, max_steps)


def clip_per_micro_batch(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """clip_grad_norm_ after every backward: each partial sum clipped, not the gradient."""
    x, y = _regression()
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(max_steps):
        for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
            (nn.functional.mse_loss(model(xb), yb) / accum_steps).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        optimizer.step()
        optimizer.zero_grad()


def no_backward(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """Steps without a backward: no optimizer ever receives a gradient."""
    x, y = _regression()
    model = nn.Linear(3, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(max_steps):
        for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
            nn.functional.mse_loss(model(xb), yb)  # the loss, and no backward()
        optimizer.step()
        optimizer.zero_grad()


def cleared_before_the_step(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """With N > 1 the window's gradient is cleared before step(): that optimizer gets none."""
    x, y = _regression()
    model = nn.Linear(3, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(max_steps):
        for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
            (nn.functional.mse_loss(model(xb), yb) / accum_steps).backward()
        if accum_steps > 1:
            optimizer.zero_grad()
        optimizer.step()
        optimizer.zero_grad()


def short_last_window(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """Steps at the end of the data too, as Lightning and Accelerate do at an epoch's end:
    24 examples make a window of 16 and one of 8, which is still divided by N."""
    x, y = _regression()
    x, y = x[:24], y[:24]
    model = nn.Linear(3, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 0
    while True:
        starts = range(0, len(x), micro_batch_size)
        for i, a in enumerate(starts):
            xb, yb = x[a:a + micro_batch_size], y[a:a + micro_batch_size]
            (nn.functional.mse_loss(model(xb), yb) / accum_steps).backward()
            if (i + 1) % accum_steps == 0 or i == len(starts) - 1:
                optimizer.step()
                optimizer.zero_grad()
                steps += 1
                if steps == max_steps:
                    return


def two_optimizers_one_per_micro_batch(micro_batch_size: int, accum_steps: int,
                                       max_steps: int) -> None:
    """A head and a body with their own optimizers; the head's steps every micro-batch."""
    x, y = _regression()
    torch.manual_seed(1)
    body, head = nn.Linear(3, 8).double(), nn.Linear(8, 1).double()
    body_opt = torch.optim.SGD(body.parameters(), lr=0.1)
    head_opt = torch.optim.SGD(head.parameters(), lr=0.1)
    for step in range(max_steps):
        for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
            (nn.functional.mse_loss(head(torch.tanh(body(xb))), yb) / accum_steps).backward()
            head_opt.step()  # the mistake: inside the window
            head_opt.zero_grad()
        body_opt.step()
        body_opt.zero_grad()


def divided_twice_and_clipped(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """Divided by N twice, then clipped once per window (as the Hugging Face Trainer does):
    the big batch's gradient is clipped to the threshold, the smaller one not, so the norms'
    ratio is not 1/N; the losses' ratio still is."""
    x, y = _regression()
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(max_steps):
        for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
            (nn.functional.mse_loss(model(xb), yb) / accum_steps / accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # |g_big| 2.7, |g_acc| 0.67
        optimizer.step()
        optimizer.zero_grad()



def grad_scaler(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """Mixed precision's GradScaler as its docs accumulate: scale every micro-batch's loss,
    scaler.step() and scaler.update() once per window (growth_interval=1: the scale doubles
    at every update, and the unscaled gradient must not notice)."""
    x, y = _regression()
    model = nn.Linear(3, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=1)
    for step in range(max_steps):
        for xb, yb in _window(x, y, micro_batch_size, accum_steps, step):
            scaler.scale(nn.functional.mse_loss(model(xb), yb) / accum_steps).backward()
        scaler.step(optimizer)  # unscales .grad, then optimizer.step()
        scaler.update()
        optimizer.zero_grad()


def exits(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """A script's loop that ends the process when it is done, instead of returning."""
    right(micro_batch_size, accum_steps, max_steps)
    raise SystemExit(5)


def nan_loss(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """A loss that is NaN from the start (a log of a negative number, say): in both runs."""
    x, y = _regression()
    model = nn.Linear(3, 1).double()
    _train(model, x, y, micro_batch_size, accum_steps, max_steps,
           loss_fn=lambda out, target: nn.functional.mse_loss(out, target).sqrt() * math.nan)


def nan_in_one_micro_batch(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """A NaN that only a micro-batch of m examples meets (an example that, alone in its
    micro-batch, makes the loss NaN; averaged into the big batch, it is masked)."""
    x, y = _regression()
    model = nn.Linear(3, 1).double()

    def loss(out, target):
        value = nn.functional.mse_loss(out, target)
        return value * math.nan if len(out) < 8 else value  # only micro-batches of < 8

    _train(model, x, y, micro_batch_size, accum_steps, max_steps, loss_fn=loss)


def hangs_after_two_steps(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """Steps twice, then waits for ever (a dead data loader, a lock never released)."""
    import time

    x, y = _regression()
    _train(nn.Linear(3, 1).double(), x, y, micro_batch_size, accum_steps, min(2, max_steps))
    while True:
        time.sleep(1)


def leaves_a_thread_running(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """The right loop, which returns with a (non-daemon) thread still running: a logger or a
    prefetcher nobody stops, that would keep the process alive after train() returns."""
    import threading
    import time

    threading.Thread(target=lambda: time.sleep(3600), name="prefetcher").start()
    x, y = _regression()
    _train(nn.Linear(3, 1).double(), x, y, micro_batch_size, accum_steps, max_steps)
