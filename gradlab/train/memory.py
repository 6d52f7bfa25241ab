"""What a training step holds in memory, measured, not estimated.

- ``SavedTensors``: the activations, the bytes autograd keeps saved for backward. A
  forward pass with a graph saves tensors (inputs of a matmul, outputs of a ReLU...)
  until backward has used them; that is what grows with the batch and what
  accumulation and GradCache bound. It watches every tensor saved while it is active
  (``torch.autograd.graph.saved_tensors_hooks``) and keeps the running total of the
  distinct tensors held, and its peak: a tensor saved by two operations (or a
  transposed view of it) counts once, and it stops counting when autograd releases it
  (after its backward). A tensor counts its own bytes, not its storage's: a micro-batch
  sliced from a window holds B/N examples' worth, though its storage is the window's.
  Parameters are not activations: tensors that share a storage with one given in
  ``exclude`` are left out (a weight saved by a matmul, or a view of it). It works on
  any device and needs no allocator statistics, so the number is the same on a CPU as
  on a GPU, run after run (a deterministic measurement that a CSV can hold).
- ``state_bytes``: what training holds besides activations (weights, gradients,
  optimizer state);
- ``reset_peak`` / ``peak_bytes``: the high-water mark of the device's memory: on CUDA
  torch.cuda.max_memory_allocated, on CPU the process's peak resident set size
  (Linux: VmHWM, which can be reset; elsewhere ru_maxrss, since the process started).
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

T = TypeVar("T")


class SavedTensors:
    """Context manager: ``peak`` is the most bytes autograd held saved at once inside it.

        with SavedTensors(exclude=model.parameters()) as saved:
            loss.backward()  # and the forward before it
        saved.peak, saved.total  # bytes
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {(t.device, t.untyped_storage().data_ptr()) for t in exclude}
        self.held: dict[tuple, list[int]] = {}  # tensor -> [times saved, not released; bytes]
        self.live = 0  # bytes of the tensors held now
        self.peak = 0  # the most bytes held at once
        self.total = 0  # bytes of every distinct tensor saved (as if nothing were released)
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedTensors:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> _Held:
        storage = tensor.untyped_storage()
        if (tensor.device, storage.data_ptr()) in self.excluded:
            return _Held(tensor, None, self)
        size = min(tensor.numel() * tensor.element_size(), storage.nbytes())
        key = (tensor.device, tensor.data_ptr(), size)
        entry = self.held.setdefault(key, [0, 0])
        if entry[0] == 0:  # newly held: its bytes count from now until released
            entry[1] = size
            self.live += entry[1]
            self.total += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        return _Held(tensor, key, self)

    @staticmethod
    def _unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def _release(self, key: tuple) -> None:
        entry = self.held[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]


class _Held:
    """What autograd keeps in place of a saved tensor; released when the graph lets it go."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: tuple | None, meter: SavedTensors):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        if self.key is not None:
            self.meter._release(self.key)


def saved_tensor_bytes(fn: Callable[[], T], exclude: Iterable[torch.Tensor] = ()
                       ) -> tuple[T, int]:
    """Run ``fn()``; return what it returned and the peak bytes autograd held saved for
    backward while it ran (activations: storages in ``exclude``, e.g. the model's
    parameters, left out)."""
    with SavedTensors(exclude) as saved:
        result = fn()
    return result, saved.peak


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """What training holds besides activations: weights and buffers, a gradient for each
    weight that learns, and the optimizer's state (momentum, Adam's moments)."""
    params = list(model.parameters())
    held = sum(_nbytes(t) for t in (*params, *model.buffers()))
    held += sum(_nbytes(p) for p in params if p.requires_grad)
    held += sum(_nbytes(v) for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor))
    return held


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ----------------------------------------------------------------------------- peaks

def reset_peak(device: torch.device) -> None:
    """Start a new high-water mark (as far as the platform allows)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    _malloc_trim()  # memory freed earlier but kept by malloc would count as resident
    with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")


def peak_bytes(device: torch.device) -> int:
    """CUDA: the most bytes torch allocated since reset_peak; CPU: the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss()


def peak_rss() -> int:
    """The process's peak resident set size in bytes."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _malloc_trim() -> None:
    """Give the memory glibc's malloc keeps back to the system (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).malloc_trim(0)  # the symbols the process already has
