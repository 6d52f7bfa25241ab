"""The tutorial loop with the learning-rate scheduler stepped once per micro-batch.

    gradlab audit experiments.loop_scheduler_per_micro_batch:train --accum-steps 4

The gradients are right, but the schedule advances N times per optimizer step:
warm-up ends N times too early and the decay runs N times too fast.
"""

from __future__ import annotations

from experiments.tutorial_loop import setup


def train(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    loader, model, optimizer, scheduler, loss_fn = setup(micro_batch_size, max_steps)
    steps = 0
    optimizer.zero_grad()
    while True:
        for i, (xb, yb) in enumerate(loader):
            loss = loss_fn(model(xb), yb) / accum_steps
            loss.backward()
            if (i + 1) % accum_steps == 0:
                optimizer.step()
                optimizer.zero_grad()
                steps += 1
                if steps == max_steps:
                    return
            scheduler.step()  # BUG: once per micro-batch, not per optimizer step
