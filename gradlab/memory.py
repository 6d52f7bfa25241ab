"""What a training step holds in memory, measured.

- ``SavedTensors``: the bytes autograd saves for backward while it is active (the
  activations a micro-batch keeps alive until its backward), each storage counted
  once, the parameters left out;
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
from collections.abc import Iterable

import torch


class SavedTensors:
    """Counts the bytes autograd saves for backward inside ``with SavedTensors(...)``.

    A tensor saved by several operations counts once; a view counts its own elements
    (a micro-batch sliced from the window holds no more than its share); a tensor in the
    storage of one in ``exclude`` (the model's parameters, held anyway) counts not at
    all. ``take()`` returns the bytes saved since the last ``take()`` and starts afresh.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {_storage(t) for t in exclude}
        self.seen: set[tuple[int, int, int]] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = _storage(tensor)
        key = (storage, tensor.data_ptr(), tensor.numel())
        if storage not in self.excluded and key not in self.seen:
            self.seen.add(key)
            self.bytes += tensor.numel() * tensor.element_size()
        return tensor  # saved as it is: counting changes nothing

    def take(self) -> int:
        taken, self.bytes = self.bytes, 0
        self.seen.clear()
        return taken

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _storage(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, ...)
        return id(tensor)


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
