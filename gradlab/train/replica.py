"""What the engine needs of the ranks: the model as the arm's ranks hold it (a DDP replica, or
FSDP2's shards) with its gradient reductions counted (steps.csv allreduces, reduce_scatters),
this rank's place, which backward passes reduce (sync), and whole tensors from shards.

A data-parallel arm with parallel=ddp trains a DistributedDataParallel replica: each rank holds
the whole model, and DDP all-reduces the gradient buckets. With parallel=fsdp the model itself
is sharded in place by FSDP2 (``fully_shard``): each parameter (and its .grad) becomes a
DTensor of which this rank holds one slice, forward gathers the parameters, and backward
reduce-scatters the gradient, both taking the mean over the ranks as DDP does. Inside a window
FSDP keeps the unsharded gradient in its own parameters and reduce-scatters it into .grad only
on a backward with gradient sync on. What the observers compare is always the whole tensor
(``full``: a collective every rank calls in the same order, as they run in lockstep).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from gradlab.config.settings import Parallel, Settings, Sync
from gradlab.errors import GradlabError, unhandled

try:  # FSDP2 (torch >= 2.6); its reduce-scatter is counted where torch lets a hook replace it
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - an old torch: parallel=fsdp is refused in shard()
    FSDPModule = DTensor = fully_shard = None
try:
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
except ImportError:  # pragma: no cover
    DefaultReduceScatter = None


def replicate(model: nn.Module, s: Settings) -> nn.Module:
    """The model as a data-parallel arm's ranks hold it, under its parallel policy."""
    match s.parallel:
        case Parallel.DDP:
            return Replica(model, find_unused_parameters=s.find_unused_parameters,
                           static_graph=s.static_graph)
        case Parallel.FSDP:
            return shard(model)
    unhandled(s.parallel)


class Replica(DistributedDataParallel):
    """DistributedDataParallel whose gradient all-reduces go through a communication hook
    that counts them: one call per bucket, DDP's own all-reduce (the mean over the ranks)."""

    def __init__(self, module: nn.Module, **options):
        device = next(module.parameters()).device
        super().__init__(module, device_ids=[device.index if device.index is not None
                                             else torch.cuda.current_device()]
                         if device.type == "cuda" else None, **options)
        self.allreduces = ReductionCount()
        self.register_comm_hook(self.allreduces, counted_allreduce)


@dataclass
class ReductionCount:
    calls: int = 0
    bytes: int = 0  # of the gradient buffers reduced (what each rank sends, before the
    #                 backend's own algorithm multiplies it)


# (no annotations: DDP compares them with its own types, and this module's are strings)
def counted_allreduce(count, bucket):
    count.calls += 1
    buffer = bucket.buffer()
    count.bytes += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 on the whole model (one parameter group: one reduce-scatter per synced backward),
    on a mesh of every rank, with its reduce-scatters counted."""
    if fully_shard is None:
        raise GradlabError(f"parallel=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, "
                           f"torch 2.6 or later), which torch {torch.__version__} does not have; "
                           f"upgrade torch, or use parallel=ddp")
    from torch.distributed.device_mesh import init_device_mesh
    # FSDP warns on each forward that returns a view (a language model's logits): an in-place
    # op on it would skip the all-gather. gradlab's losses read the output, never write it.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")
    device = next(model.parameters()).device
    try:
        fully_shard(model, mesh=init_device_mesh(device.type, (dist.get_world_size(),)))
    except Exception as e:  # a model FSDP cannot wrap (what it says is the reason)
        raise GradlabError(f"parallel=fsdp: FSDP2 could not shard this model ({type(e).__name__}"
                           f": {e}); use parallel=ddp") from None
    model.reduce_scatters = ReductionCount()  # an attribute of the module FSDP made
    if DefaultReduceScatter is not None and hasattr(model, "set_custom_reduce_scatter"):
        model.set_custom_reduce_scatter(CountedReduceScatter(model.reduce_scatters))
    else:  # pragma: no cover - this torch has no hook: the counts are unknown
        model.reduce_scatters = None
    return model


if DefaultReduceScatter is not None:
    class CountedReduceScatter(DefaultReduceScatter):
        """FSDP2's own reduce-scatter, counted (calls, and the bytes of its input)."""

        def __init__(self, count: ReductionCount):
            self.count = count

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            self.count.calls += 1
            self.count.bytes += input_tensor.numel() * input_tensor.element_size()
            return super().__call__(output_tensor, input_tensor, group, op, async_op)


def is_sharded(model: nn.Module) -> bool:
    return FSDPModule is not None and isinstance(model, FSDPModule)


def data_parallel_rank(model: nn.Module) -> tuple[int, int]:
    """(this rank, number of ranks) of a DDP replica or a sharded model; (0, 1) for a model of
    one process."""
    if isinstance(model, DistributedDataParallel):
        return dist.get_rank(model.process_group), dist.get_world_size(model.process_group)
    if is_sharded(model):
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def synced(model: nn.Module, s: Settings, last: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's forward and backward: no_sync() (DDP) or gradient sync off
    (FSDP) where the arm's sync policy says this backward must not reduce across the ranks."""
    sharded = is_sharded(model)
    if not sharded and not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()  # one process: nothing to reduce
    match s.sync:
        case Sync.NO_SYNC:  # accumulate locally; reduce once, with the last micro-batch
            reduce = last
        case Sync.EVERY_MICRO_BATCH:  # right too: each reduction averages the sum so far
            reduce = True
        case Sync.NEVER:  # the bug: each rank steps on its own slice's gradient
            reduce = False
        case Sync.OVERWRITING:  # the bug: each reduce-scatter replaces the shard it lands in
            reduce = True
            for p in model.parameters():
                p.grad = None
        case _:
            unhandled(s.sync)
    if sharded:  # FSDP2 reads the flag at backward time
        model.set_requires_gradient_sync(reduce)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if reduce else model.no_sync()


def module_of(model: nn.Module) -> nn.Module:
    """The model inside a DDP replica (its state_dict and parameter names), or the model."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def reduction_counts(model: nn.Module) -> tuple[float, float, float, float]:
    """The gradient reductions counted so far: (all-reduces, their bytes, reduce-scatters,
    their bytes). A DDP replica all-reduces, a sharded model reduce-scatters (NaN where this
    torch cannot count them), one process reduces nothing."""
    if isinstance(model, Replica):
        return model.allreduces.calls, model.allreduces.bytes, 0, 0
    if is_sharded(model):
        count = model.reduce_scatters
        return (0, 0, *((count.calls, count.bytes) if count is not None
                        else (math.nan, math.nan)))
    return 0, 0, 0, 0


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a sharded tensor (the tensor itself otherwise)."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective), or the tensor itself."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def norm_over_shards(norm: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The L2 norm of every rank's shards, from the norm of this rank's (a sharded model),
    or ``norm`` itself."""
    if not is_sharded(model):
        return norm
    squares = norm.double().square()
    dist.all_reduce(squares)
    return squares.sqrt()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with whole tensors (a sharded model's gathered)."""
    return {name: full(value) for name, value in module_of(model).state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Whole tensors into a model: a sharded model keeps its slice of each."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        module_of(model).load_state_dict(state)


def summed_over_ranks(loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The whole window's summed loss, for the record: each rank holds its own slice's.
    (Not a gradient, so not through DDP's hook, and not counted.)"""
    if not isinstance(model, DistributedDataParallel) and not is_sharded(model):
        return loss
    total = loss.detach().double()  # float64: every backend sums it, whatever the arm's dtype
    dist.all_reduce(total, group=model.process_group if isinstance(model, DistributedDataParallel)
                    else None)
    return total

