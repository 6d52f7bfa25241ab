"""The gradient-accumulation loop the tutorials teach, on a small classification problem.

    gradlab audit experiments.tutorial_loop:train --accum-steps 4
    gradlab audit experiments.tutorial_loop:train_float32 --accum-steps 4

Divide each micro-batch's loss by accum_steps, let backward() add into .grad, and
every accum_steps micro-batches step the optimizer, step the scheduler and clear
.grad. Called as train(8, 4, K) it must hand the optimizer exactly what
train(32, 1, K) does: `gradlab audit` checks that, step by step, without changing
a line here. The loop_*.py files beside this one are the same loop with one
classic mistake each.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def setup(micro_batch_size: int, max_steps: int, dtype: torch.dtype = torch.float64):
    """Data, model, optimizer, scheduler and loss, seeded: the same for every batch size."""
    torch.manual_seed(0)  # the same data and initial weights whatever the batch size
    # 2048 examples, 64 features, 10 classes given by a fixed random linear teacher
    x = torch.randn(2048, 64, dtype=dtype)
    y = (x @ torch.randn(64, 10, dtype=dtype)).argmax(1)
    # a seeded shuffle: 4 micro-batches of 8 are then the same 32 examples as one batch of 32
    loader = DataLoader(TensorDataset(x, y), batch_size=micro_batch_size, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to(dtype)
    loss_fn = nn.CrossEntropyLoss()  # the mean over the micro-batch
    return (loader, model, *optimizer_and_scheduler(model, max_steps), loss_fn)


def optimizer_and_scheduler(model: nn.Module, max_steps: int):
    """SGD with momentum and a linear decay over max_steps (built after any wrapping that
    replaces the parameters, such as FSDP2's fully_shard)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0,
                                                  end_factor=0.1, total_iters=max_steps)
    return optimizer, scheduler


def train(micro_batch_size: int, accum_steps: int, max_steps: int,
          dtype: torch.dtype = torch.float64) -> None:
    loader, model, optimizer, scheduler, loss_fn = setup(micro_batch_size, max_steps, dtype)
    steps = 0
    optimizer.zero_grad()
    while True:  # epochs
        for i, (xb, yb) in enumerate(loader):
            loss = loss_fn(model(xb), yb) / accum_steps  # N means of 1/N each: the window's mean
            loss.backward()  # adds into .grad
            if (i + 1) % accum_steps == 0:
                optimizer.step()
                scheduler.step()  # once per optimizer step
                optimizer.zero_grad()  # only now: the next window starts from zero
                steps += 1
                if steps == max_steps:
                    return


def train_float32(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """The same loop in float32: equal to the big batch up to float32 rounding."""
    train(micro_batch_size, accum_steps, max_steps, dtype=torch.float32)
