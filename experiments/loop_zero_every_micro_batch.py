"""The tutorial loop with zero_grad() at the top of every micro-batch.

    gradlab audit experiments.loop_zero_every_micro_batch:train --accum-steps 4

The ordinary training loop clears .grad before every backward(); kept inside an
accumulation loop it throws away the micro-batches gathered so far, and the
optimizer steps on the last micro-batch's gradient alone (divided by N).
"""

from __future__ import annotations

from experiments.tutorial_loop import setup


def train(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    loader, model, optimizer, scheduler, loss_fn = setup(micro_batch_size, max_steps)
    steps = 0
    while True:
        for i, (xb, yb) in enumerate(loader):
            optimizer.zero_grad()  # BUG: clears the micro-batches accumulated so far
            loss = loss_fn(model(xb), yb) / accum_steps
            loss.backward()
            if (i + 1) % accum_steps == 0:
                optimizer.step()
                scheduler.step()
                steps += 1
                if steps == max_steps:
                    return
