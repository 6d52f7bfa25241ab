"""The tutorial loop with the loss not divided by accum_steps.

    gradlab audit experiments.loop_no_division:train --accum-steps 4

backward() adds the N micro-batch gradients into .grad, so without `/ accum_steps`
the optimizer receives the sum of N means: N times the big batch's gradient, the
same direction (cosine 1), relative error N - 1. With SGD that is a learning rate
N times too large; Adam hides most of it, which is how it goes unnoticed.
"""

from __future__ import annotations

from experiments.tutorial_loop import setup


def train(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    loader, model, optimizer, scheduler, loss_fn = setup(micro_batch_size, max_steps)
    steps = 0
    optimizer.zero_grad()
    while True:
        for i, (xb, yb) in enumerate(loader):
            loss = loss_fn(model(xb), yb)  # BUG: not divided by accum_steps
            loss.backward()
            if (i + 1) % accum_steps == 0:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                steps += 1
                if steps == max_steps:
                    return
