"""Gradient comparison: how far one gradient is from a reference, and how far is fine.

All metrics are computed in float64 whatever dtype the arms trained in, so the
measurement adds no rounding of its own.
"""

from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}

# Headroom over N*u. The two arms do not differ only in how the N micro-batch
# gradients are summed: the big batch itself reduces over B examples inside its
# matmuls and convolutions in a blocked order, and every layer's backward rounds
# again. A factor of 16 covers that for the built-in models (measured worst case
# 3.3 N u, at N=2 with GroupNorm, see README) and still sits orders of magnitude below the
# errors of a real mistake (loss not scaled: N-1; BatchNorm: >1e-2).
TOLERANCE_FACTOR = 16.0


def rel_tolerance(dtype: str, accum_steps: int) -> float:
    """Largest relative L2 gradient error still called equivalent: c * max(N, 2) * u.

    Summing N partial gradients in floating point errs by up to about (N-1)*u
    relative to the sum of magnitudes; max(N, 2) keeps N=1 from demanding
    bit-identical results against a baseline that rounds in its own order.
    """
    return TOLERANCE_FACTOR * max(accum_steps, 2) * UNIT_ROUNDOFF[dtype]


def verdict(baseline: bool, rel_err: float, rel_tol: float, abs_err: float = math.nan,
            abs_tol: float | None = None) -> str:
    """baseline | not probed | equivalent | differs: the one rule, for run and compare alike.

    Equivalent when the relative error is within rel_tol, or (only when an
    absolute tolerance is given) the largest absolute error is within abs_tol.
    """
    if baseline:
        return "baseline"
    if rel_err is None or math.isnan(rel_err):
        return "not probed"
    if rel_err <= rel_tol or (abs_tol is not None and abs_err <= abs_tol):
        return "equivalent"
    return "differs"


def compare(arm: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max_abs_err, rel_l2_err and cosine of one gradient against a reference."""
    a, r = arm.detach().double().flatten(), ref.detach().double().flatten()
    diff_norm, ref_norm, arm_norm = (a - r).norm().item(), r.norm().item(), a.norm().item()
    if ref_norm > 0:
        rel = diff_norm / ref_norm
    else:
        rel = 0.0 if diff_norm == 0 else math.inf
    if ref_norm > 0 and arm_norm > 0:
        cosine = float(a @ r) / (arm_norm * ref_norm)
    else:
        cosine = 1.0 if arm_norm == ref_norm else 0.0
    return {
        "max_abs_err": (a - r).abs().max().item() if a.numel() else 0.0,
        "rel_l2_err": rel,
        "cosine": cosine,
        "ref_norm": ref_norm,
        "arm_norm": arm_norm,
    }


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's .grad as a float64 copy (zeros where backward left None)."""
    return {name: (p.grad.detach().double().clone() if p.grad is not None
                   else torch.zeros_like(p, dtype=torch.float64))
            for name, p in model.named_parameters()}


def compare_grads(arm: dict[str, torch.Tensor],
                  ref: dict[str, torch.Tensor]) -> list[dict[str, float | str]]:
    """One row per parameter, then one row for all parameters together (param '*')."""
    rows: list[dict[str, float | str]] = [{"param": n, **compare(arm[n], ref[n])} for n in ref]
    flat_arm = torch.cat([arm[n].flatten() for n in ref])
    flat_ref = torch.cat([ref[n].flatten() for n in ref])
    rows.append({"param": "*", **compare(flat_arm, flat_ref)})
    return rows
