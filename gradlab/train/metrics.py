"""Gradient comparison: how far one gradient is from a reference.

All metrics are computed in float64 whatever dtype the arms trained in, so the
measurement adds no rounding of its own. Tensors are compared one chunk of a
parameter at a time, so comparing two models costs a float64 copy of 2^20 elements,
not of the model. (The rule that turns these numbers into a verdict is in record/verdict.py.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from gradlab.train import replica

# elements of a tensor compared at once (8 MiB in float64)
CHUNK = 2**20


class Distance:
    """Accumulates ||a - r||, ||r||, ||a||, a·r and max |a - r| over tensor pairs."""

    def __init__(self) -> None:
        self.diff2 = self.ref2 = self.arm2 = self.dot = self.max_abs = 0.0

    def add(self, arm: torch.Tensor, ref: torch.Tensor) -> Distance:
        arm, ref = arm.detach().flatten(), ref.detach().flatten()
        # a chunk at a time: float64 copies of a whole large layer and their difference
        # would hold 4 times its float32 size at once (a third of the model, for an mlp of
        # three wide layers); a tensor of at most CHUNK elements is one chunk, as before
        for start in range(0, max(arm.numel(), 1), CHUNK):
            a, r = arm[start:start + CHUNK].double(), ref[start:start + CHUNK].double()
            d = a - r
            self.diff2 += float(d @ d)
            self.ref2 += float(r @ r)
            self.arm2 += float(a @ a)
            self.dot += float(a @ r)
            self.max_abs = max(self.max_abs, float(d.abs().max()) if d.numel() else 0.0)
        return self

    def merge(self, other: Distance) -> Distance:
        self.diff2 += other.diff2
        self.ref2 += other.ref2
        self.arm2 += other.arm2
        self.dot += other.dot
        self.max_abs = max(self.max_abs, other.max_abs)
        return self

    def metrics(self) -> dict[str, float]:
        """max_abs_err, rel_l2_err and cosine of the arm against the reference.

        A non-finite gradient gives NaN metrics: nothing is invented for a diverged arm.
        """
        diff, ref, arm = math.sqrt(self.diff2), math.sqrt(self.ref2), math.sqrt(self.arm2)
        if not all(map(math.isfinite, (diff, ref, arm, self.dot))):
            return {"max_abs_err": math.nan, "rel_l2_err": math.nan, "cosine": math.nan,
                    "ref_norm": ref, "arm_norm": arm}
        rel = diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
        if ref > 0 and arm > 0:
            cosine = self.dot / (arm * ref)
        else:  # a zero gradient has no direction: the same only if both are zero
            cosine = 1.0 if arm == ref else math.nan
        return {"max_abs_err": self.max_abs, "rel_l2_err": rel, "cosine": cosine,
                "ref_norm": ref, "arm_norm": arm}


def compare(arm: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max_abs_err, rel_l2_err and cosine of one tensor against a reference."""
    return Distance().add(arm, ref).metrics()


def compare_tensors(pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]]
                    ) -> list[dict[str, float | str]]:
    """One row per (name, arm, ref) pair, then one for all of them together (param '*')."""
    rows: list[dict[str, float | str]] = []
    overall = Distance()
    for name, arm, ref in pairs:
        one = Distance().add(arm, ref)
        rows.append({"param": name, **one.metrics()})
        overall.merge(one)
    rows.append({"param": "*", **overall.metrics()})
    return rows


def grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    """A parameter's .grad, or zeros where backward left None (set_to_none, unused); whole,
    for a sharded parameter."""
    return replica.full(p.grad if p.grad is not None else torch.zeros_like(p))


def compare_models(arm: nn.Module, ref: nn.Module,
                   of: Callable[[torch.Tensor], torch.Tensor] = grad_or_zeros
                   ) -> list[dict[str, float | str]]:
    """``of(parameter)`` of two models of one architecture, parameter by parameter."""
    refs = dict(ref.named_parameters())
    return compare_tensors((name, of(p), of(refs[name])) for name, p in arm.named_parameters())


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's .grad as a float64 copy (zeros where backward left None)."""
    return {name: grad_or_zeros(p).detach().double().clone()
            for name, p in model.named_parameters()}


def param_distance(a: nn.Module, b: nn.Module) -> float:
    """||θ_a − θ_b|| over all parameters, in float64, one parameter at a time."""
    return math.sqrt(sum(float((replica.full(pa).detach().double()
                                - replica.full(pb).detach().double()).pow(2).sum())
                         for pa, pb in zip(a.parameters(), b.parameters(), strict=True)))
