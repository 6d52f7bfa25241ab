"""Loops for tests/test_audit_ranks.py that gradlab audit --nproc-per-node must refuse: each
is train(micro_batch_size, accum_steps, max_steps), run by torch's launcher on every rank."""

from __future__ import annotations

import os

import torch.distributed as dist

import audit_loops


def alone(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """Never joins the ranks: each rank trains the whole loop by itself."""
    audit_loops.right(micro_batch_size, accum_steps, max_steps)


def uneven_steps(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """Joins, but rank 1 stops one optimizer step early (no collective: nothing waits)."""
    dist.init_process_group(backend="gloo")
    rank = dist.get_rank()
    audit_loops.right(micro_batch_size, accum_steps, max_steps - rank)


def rank_one_raises(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    dist.init_process_group(backend="gloo")
    if dist.get_rank() == 1:
        raise RuntimeError("rank one has no data shard")
    dist.barrier()  # rank 0 waits here for a rank that is gone: the launcher must end it


def rank_one_dies(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    dist.init_process_group(backend="gloo")
    if dist.get_rank() == 1:
        os._exit(3)  # no exception, no record: the process is simply gone
    dist.barrier()
