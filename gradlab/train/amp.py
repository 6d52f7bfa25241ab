"""Mixed precision in a step: autocast around the forward, the GradScaler's scale, unscale_
and step, and what this torch supports on this device.

Where the partial gradients add up in another dtype than the parameters' (grad_accum_dtype)
is the engine's PartialSums: it is part of the sum itself.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from gradlab.config.settings import Autocast, GradScaling, Settings
from gradlab.errors import GradlabError, unhandled
from gradlab.setup import Setup


def forward_precision(s: Settings, setup: Setup) -> contextlib.AbstractContextManager:
    """What a micro-batch's forward runs under: torch.autocast (on the model's device), or
    nothing."""
    match s.autocast:
        case Autocast.NONE:
            return contextlib.nullcontext()
        case Autocast.BFLOAT16:
            return torch.autocast(setup.device.type, dtype=torch.bfloat16)
        case Autocast.FLOAT16:
            return torch.autocast(setup.device.type, dtype=torch.float16)
    unhandled(s.autocast)


def scaled(loss: torch.Tensor, s: Settings, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """The loss to backward: multiplied by the GradScaler's scale (the same for every
    micro-batch of a window: the scale changes only in update(), once per window)."""
    match s.grad_scaler:
        case GradScaling.OFF:
            return loss
        case GradScaling.ON:
            return scaler.scale(loss)
    unhandled(s.grad_scaler)


def unscale(s: Settings, optimizer: torch.optim.Optimizer | None,
            scaler: torch.amp.GradScaler | None) -> None:
    match s.grad_scaler:
        case GradScaling.OFF:
            pass
        case GradScaling.ON:
            scaler.unscale_(optimizer)
        case _:
            unhandled(s.grad_scaler)


def make_scaler(s: Settings, device: torch.device,
                like: torch.amp.GradScaler | None = None) -> torch.amp.GradScaler | None:
    """The arm's GradScaler (None with grad_scaler=off). ``like``: a new scaler holding another's
    state (its scale and growth count), so a probe computes with an arm's current scale
    without touching that arm's scaler (unscale_ records state per optimizer in it)."""
    match s.grad_scaler:
        case GradScaling.OFF:
            return None
        case GradScaling.ON:
            scaler = torch.amp.GradScaler(device.type)
            if like is not None:
                scaler.load_state_dict(like.state_dict())
            return scaler
    unhandled(s.grad_scaler)


def check_precision_support(s: Settings, device: torch.device) -> None:
    """What this torch supports on this device: autocast in the dtype asked for, and a
    GradScaler (torch.amp.GradScaler on the CPU came with torch 2.3)."""
    if s.autocast != Autocast.NONE and not autocast_supported(device.type, s.autocast):
        raise GradlabError(f"autocast={s.autocast} is not supported on {device.type} by this "
                           f"torch ({torch.__version__}); use autocast=bfloat16, autocast=none, "
                           f"or device=cuda")
    if s.grad_scaler == GradScaling.ON and not scaler_supported(device.type):
        raise GradlabError(f"grad_scaler=on: this torch ({torch.__version__}) has no GradScaler "
                           f"for {device.type}; use device=cuda, or torch >= 2.3 for the CPU "
                           f"one, or grad_scaler=off")


AUTOCAST_DTYPES = {Autocast.BFLOAT16: torch.bfloat16, Autocast.FLOAT16: torch.float16}


def autocast_supported(device_type: str, autocast: Autocast) -> bool:
    """Does torch.autocast run in this dtype on this device? (Where it does not, it warns and
    turns itself off.)"""
    dtype = AUTOCAST_DTYPES[autocast]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type, dtype=dtype):
                return torch.is_autocast_enabled(device_type) \
                    and torch.get_autocast_dtype(device_type) == dtype
    except (RuntimeError, AttributeError, TypeError):
        return False


def scaler_supported(device_type: str) -> bool:
    """Is there a working GradScaler for this device? (One without it disables itself.)"""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.amp.GradScaler(device_type).is_enabled()
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return False

