"""Exact accumulation of a loss that couples the batch: GradCache's two passes (Gao et al.
2021), and the random state they replay so the second forward draws the first one's masks.

The engine chooses it (``accumulation``) and hands it the window's micro-batches and the
context each backward runs in (its PartialSums.micro_batch: zero_grad and the watch, as in the
plain loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from gradlab.config.settings import (
    Accumulation,
    Autocast,
    ClipAt,
    DropoutMasks,
    EpochEnd,
    GradAccumDtype,
    GradScaling,
    Settings,
)
from gradlab.errors import GradlabError, unhandled
from gradlab.setup import Embeddings, Examples, Setup, num_examples


def accumulation(s: Settings, setup: Setup) -> Accumulation:
    """The arm's accumulation, with auto resolved: GradCache only where it changes something
    (a loss that couples the batch, split into more than one micro-batch)."""
    match s.accumulation:
        case Accumulation.AUTO:
            return Accumulation.GRADCACHE if setup.coupled and s.accum_steps > 1 \
                else Accumulation.PLAIN
        case Accumulation.PLAIN | Accumulation.GRADCACHE:
            return s.accumulation
    unhandled(s.accumulation)


def check_gradcache(s: Settings, setup: Setup, where: str) -> None:
    """GradCache's two passes stand beside the plain loop, not inside it: they take the
    window as it is, in one process, in the parameters' own precision."""
    if accumulation(s, setup) != Accumulation.GRADCACHE:
        return
    plain = {"world_size": 1, "grad_scaler": GradScaling.OFF, "autocast": Autocast.NONE,
             "grad_accum_dtype": GradAccumDtype.PARAM, "epoch_end": EpochEnd.RUN_ON,
             "dropout_masks": DropoutMasks.STREAM}
    for key, value in plain.items():
        if getattr(s, key) != value:
            raise GradlabError(f"{where}: accumulation=gradcache with {key}={getattr(s, key)}: "
                               f"GradCache runs here with {key}={value} only; set it, or "
                               f"accumulation=plain")
    if s.clip_at == ClipAt.PER_MICRO_BATCH:
        raise GradlabError(f"{where}: accumulation=gradcache has no partial sums to clip "
                           f"(clip_at=per-micro-batch); use clip_at=after-accumulation")


def gradcache(model: nn.Module, micro_batches: list[Examples], window_units, setup: Setup,
              around: Callable[[int], contextlib.AbstractContextManager]) -> torch.Tensor:
    """Exact accumulation of a loss that couples the batch (GradCache, Gao et al. 2021);
    returns the window's loss.

    1. Embed every micro-batch without a graph, noting the random state each forward
       starts from.
    2. The coupled loss of the whole window on those cached embeddings, and its
       gradient with respect to them (a graph only as large as the embeddings).
    3. Embed each micro-batch again, with a graph and from the same random state (so
       dropout draws the same masks and the embeddings are the cached ones), and
       backpropagate its slice of that gradient into the parameters.

    The parameters get the big batch's gradient while autograd holds the activations
    of one micro-batch at a time; the price is a second forward of every micro-batch.
    """
    device = next(model.parameters()).device
    states, cached = [], []
    with torch.no_grad():
        for micro_batch in micro_batches:
            states.append(rng_state(device))
            embeddings = setup.embed(model, micro_batch)
            cached.append(as_tuple(embeddings))
    window_embeddings = tuple(torch.cat(parts).requires_grad_()
                              for parts in zip(*cached, strict=True))
    one_tensor = isinstance(embeddings, torch.Tensor)  # as embed gave them: one, or a tuple
    loss, units = setup.coupled_loss(window_embeddings[0] if one_tensor else window_embeddings)
    (loss / window_units).backward()  # reaches the cached embeddings only: no parameter
    sizes = [num_examples(mb) for mb in micro_batches]
    slices = [e.grad.split(sizes) if e.grad is not None else [None] * len(sizes)
              for e in window_embeddings]  # None: the loss does not use that output
    for i, micro_batch in enumerate(micro_batches):
        with around(i):  # the engine's PartialSums.micro_batch: zero_grad as in the plain loop
            with replayed(states[i], device):
                embeddings = as_tuple(setup.embed(model, micro_batch))
            used = [(e, g[i]) for e, g in zip(embeddings, slices, strict=True)
                    if g[i] is not None]
            torch.autograd.backward([e for e, _ in used], [g for _, g in used])
    return loss.detach()


def as_tuple(embeddings: Embeddings) -> tuple[torch.Tensor, ...]:
    return (embeddings,) if isinstance(embeddings, torch.Tensor) else tuple(embeddings)


def rng_state(device: torch.device) -> tuple:
    """The random state a forward starts from (the device's too on CUDA)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple, device: torch.device) -> None:
    """Put back a state rng_state took."""
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def replayed(state: tuple, device: torch.device) -> Iterator[None]:
    """Draw random numbers as from ``state``; afterwards the streams are where they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        set_rng_state(state, device)
        yield

