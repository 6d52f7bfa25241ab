"""The tutorial loop on several processes with DistributedDataParallel, as PyTorch's DDP
tutorial writes it, and the classic mistake of dividing the loss by the global batch.

    gradlab audit experiments.ddp_loop:train --accum-steps 4 --nproc-per-node 2
    torchrun --nproc-per-node 2 experiments/ddp_loop.py     # the loop alone

Each rank reads its shard of the data (DistributedSampler), and every micro-batch but
the window's last runs under ``no_sync()``: DDP all-reduces the gradient only once per
optimizer step, and its all-reduce takes the mean over the W ranks. So each rank
divides its micro-batch's mean loss by N, as on one process, and the step receives
the mean over all m·N·W examples of the window.
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from experiments.tutorial_loop import setup


def sharded_loader(dataset, micro_batch_size: int) -> DataLoader:
    """Rank r's shard: the same seeded shuffle on every rank, of which rank r takes every
    W-th example, so the window's W·N micro-batches hold the examples of one process's big
    batch (m·N·W)."""
    sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, drop_last=True)


def train(micro_batch_size: int, accum_steps: int, max_steps: int,
          mistake: str | None = None) -> None:
    dist.init_process_group("gloo")  # torchrun's environment says who and where; nccl on GPUs
    loader, model, optimizer, scheduler, loss_fn = setup(micro_batch_size, max_steps)
    loader, model = sharded_loader(loader.dataset, micro_batch_size), DDP(model)
    world = dist.get_world_size()
    steps, epoch = 0, 0
    optimizer.zero_grad()
    try:
        while True:
            loader.sampler.set_epoch(epoch)
            for i, (xb, yb) in enumerate(loader):
                last = (i + 1) % accum_steps == 0
                # all-reduce only on the window's last backward(): the others add into .grad
                sync = {"never-sync": False, "sync-every": True}.get(mistake, last)
                with contextlib.nullcontext() if sync else model.no_sync():
                    if mistake == "global-batch":  # DDP's mean divides by W again
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
    """Each rank's summed loss divided by all ranks' examples: right on one process, 1/W of
    the big batch's gradient on W, because DDP's all-reduce averages over the ranks."""
    train(micro_batch_size, accum_steps, max_steps, mistake="global-batch")


def train_never_syncing(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """Every micro-batch under no_sync(), the last too: the ranks never all-reduce, and
    each steps on its own shard's gradient."""
    train(micro_batch_size, accum_steps, max_steps, mistake="never-sync")


def train_syncing_every_micro_batch(micro_batch_size: int, accum_steps: int,
                                    max_steps: int) -> None:
    """No no_sync() at all: the same gradient, but N all-reduces a step instead of one."""
    train(micro_batch_size, accum_steps, max_steps, mistake="sync-every")


if __name__ == "__main__":
    train(8, 4, 5)
