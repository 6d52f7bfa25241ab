"""The worker's side of an audit on several ranks (``gradlab audit --nproc-per-node W``):
which rank this process is, whole tensors from FSDP2's sharded ones and back, and whether
a failure is this rank's own or a peer's that is gone. Imports torch.distributed only
when a rank uses it."""

from __future__ import annotations

import os

import torch

from gradlab.errors import GradlabError


def of_environment() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when torch's launcher started this process, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _is_dtensor(t) -> bool:
    # the class is looked up only when torch.distributed is in use: nothing imported otherwise
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor: an FSDP2 DTensor gathered from its shards (a collective: every rank
    calls it at the same optimizer step), anything else as it is."""
    return t.full_tensor() if t is not None and _is_dtensor(t) else t


def set_whole(p: torch.Tensor, value: torch.Tensor) -> None:
    """p = value (p's whole shape); for a DTensor, this rank's shard of value: on a 1-D mesh,
    Shard(d) holds value.chunk(W, d)[rank], the split FSDP2 makes (without a collective)."""
    if not _is_dtensor(p):
        p.copy_(value)
        return
    local = p.to_local()
    if p.device_mesh.ndim != 1:
        raise GradlabError("gradlab audit follows weights on a 1-D device mesh only; audit a "
                           "loop sharded over one mesh dimension")
    placement, = p.placements
    if placement.is_shard():
        pieces = value.chunk(p.device_mesh.size(), dim=placement.dim)
        coordinate, = p.device_mesh.get_coordinate()
        value = pieces[coordinate] if coordinate < len(pieces) else value.narrow(
            placement.dim, 0, 0)
    local.copy_(value.view(local.shape))


def lost_peer(err: BaseException) -> bool:
    """Whether a collective failed because another rank is gone: then that rank's failure,
    not this one, is the cause."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistNetworkError", ())):
        return True
    # gloo raises a plain RuntimeError from its transport when the peer's socket closes
    return any(said in str(err) for said in ("Connection closed by peer", "Connection reset",
                                              "gloo/transport"))


