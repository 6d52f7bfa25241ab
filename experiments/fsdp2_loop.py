"""The tutorial loop sharded with FSDP2 (``fully_shard``), as PyTorch's FSDP2 tutorial and
torchtitan write it, and the classic mistake of dividing the loss by the global batch.

    gradlab audit experiments.fsdp2_loop:train --accum-steps 4 --nproc-per-node 2
    torchrun --nproc-per-node 2 experiments/fsdp2_loop.py    # the loop alone

Every parameter is a DTensor split over the W ranks along its first dimension. During
the window's first N - 1 micro-batches ``set_requires_gradient_sync(False)`` keeps each
rank's unsharded gradient to itself; the last backward() reduce-scatters the sum, and
FSDP's reduce-scatter takes the mean over the ranks, as DDP's all-reduce does. Runs on
CPU with gloo.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from experiments.ddp_loop import sharded_loader
from experiments.tutorial_loop import optimizer_and_scheduler, setup


def train(micro_batch_size: int, accum_steps: int, max_steps: int,
          divide_by_global_batch: bool = False) -> None:
    dist.init_process_group(backend="gloo")
    loader, model, _, _, loss_fn = setup(micro_batch_size, max_steps)
    for layer in model:  # each Linear its own FSDP unit, then the root
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    # after fully_shard: the optimizer must hold the sharded parameters
    optimizer, scheduler = optimizer_and_scheduler(model, max_steps)
    loader = sharded_loader(loader.dataset, micro_batch_size)
    world = dist.get_world_size()
    steps, epoch = 0, 0
    try:
        while True:
            loader.sampler.set_epoch(epoch)
            for i, (xb, yb) in enumerate(loader):
                last = (i + 1) % accum_steps == 0
                model.set_requires_gradient_sync(last)  # reduce-scatter once per window
                if divide_by_global_batch:  # the mistake: FSDP's mean divides by W again
                    loss = nn.functional.cross_entropy(model(xb), yb, reduction="sum")
                    loss = loss / (micro_batch_size * accum_steps * world)
                else:
                    loss = loss_fn(model(xb), yb) / accum_steps
                loss.backward()
                if last:
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                    steps += 1
                    if steps == max_steps:
                        return
            epoch += 1
    finally:
        dist.destroy_process_group()


def train_dividing_by_global_batch(micro_batch_size: int, accum_steps: int,
                                   max_steps: int) -> None:
    """Each rank's summed loss divided by all ranks' examples: 1/W of the big batch's
    gradient, because FSDP's reduce-scatter averages over the ranks."""
    train(micro_batch_size, accum_steps, max_steps, divide_by_global_batch=True)


if __name__ == "__main__":
    train(8, 4, 5)
