"""Dropout whose masks need not depend on how a window is split into micro-batches.

torch's ``nn.Dropout`` draws each mask from the global random stream as the forward
passes run: one big batch draws its masks in one call per layer, N micro-batches in
N calls per layer, interleaved with the other layers. The same example gets
another mask, so accumulated and big-batch gradients differ, by chance, not by a
flaw of accumulation.

``ExampleDropout`` behaves exactly like ``nn.Dropout`` until the engine gives it
one key per example of the batch (``example_keys``): then each example's mask
comes from a generator of its own, seeded by its key. The engine derives the keys
from one draw of the arm's stream per window and each example's place in the
window, so an example gets the same mask whichever micro-batch it is in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn


class ExampleDropout(nn.Dropout):
    """nn.Dropout, or, while ``keys`` is set, one seeded mask per example."""

    keys: torch.Tensor | None = None  # one int64 per example of the batch being run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keys is None or not self.training or self.p == 0:
            return super().forward(x)
        if len(self.keys) != len(x):
            raise RuntimeError(f"ExampleDropout got {len(self.keys)} keys for a batch of "
                               f"{len(x)} examples")
        masks = torch.stack([self.mask(int(key), x.shape[1:], x.device) for key in self.keys])
        return x * masks.to(x.dtype) / (1 - self.p)

    def mask(self, key: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
        # drawn in float32 whatever the model's dtype, so a float64 copy of the model (the
        # exact reference) drops exactly what the float32 arm drops
        generator = torch.Generator(device).manual_seed(key)
        return torch.rand(shape, generator=generator, device=device) >= self.p


def example_keys(model: nn.Module, keys: torch.Tensor | None) -> AbstractContextManager:
    """Per-example masks from ``keys`` for the forward passes inside (None: nn.Dropout's,
    and nothing to set: no walk over the model's modules for every micro-batch)."""
    return nullcontext() if keys is None else keyed(model, keys)


@contextmanager
def keyed(model: nn.Module, keys: torch.Tensor) -> Iterator[None]:
    layers = [m for m in model.modules() if isinstance(m, ExampleDropout)]
    for layer in layers:
        layer.keys = keys
    try:
        yield
    finally:
        for layer in layers:
            layer.keys = None

