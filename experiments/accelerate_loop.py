"""The tutorial loop written with Hugging Face Accelerate's accumulate().

    pip install accelerate     # or: pip install -e ".[accelerate]"
    gradlab audit experiments.accelerate_loop:train --accum-steps 4

Accelerate divides the loss by gradient_accumulation_steps in backward(), and its
prepared optimizer and scheduler step (and clear .grad) only when the window is
complete, so the loop is written as if there were no accumulation at all.
"""

from __future__ import annotations

from accelerate import Accelerator

from experiments.tutorial_loop import setup


def train(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    accelerator = Accelerator(gradient_accumulation_steps=accum_steps, cpu=True)
    loader, model, optimizer, scheduler, loss_fn = setup(micro_batch_size, max_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader,
                                                              scheduler)
    steps = 0
    while True:
        for xb, yb in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model(xb), yb)
                accelerator.backward(loss)  # divides by accum_steps
                optimizer.step()  # a no-op until the window is complete
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                steps += 1
                if steps == max_steps:
                    return


