"""Built-in models: small enough to run on a laptop CPU, big enough to show the effects."""

from __future__ import annotations

import math

import torch
from torch import nn

from gradlab.errors import GradlabError


def toy_linear(settings, data) -> nn.Module:
    """One weight w, initialised to 1; prediction w*x."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model


def _feature_norm(norm: str, width: int, groups: int) -> nn.Module:
    """A norm for (batch, features) activations."""
    if norm == "none":
        return nn.Identity()
    if norm == "bn":
        return nn.BatchNorm1d(width)
    if norm == "ln":
        return nn.LayerNorm(width)
    if norm == "gn":
        _check_groups(groups, width)
        return nn.GroupNorm(groups, width)
    raise GradlabError(f"norm={norm} is not available for mlp (instance norm needs spatial "
                       f"dimensions); use bn, gn, ln or none, or model=cnn")


def _image_norm(norm: str, channels: int, groups: int) -> nn.Module:
    """A norm for (batch, channels, height, width) activations."""
    if norm == "none":
        return nn.Identity()
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "ln":  # LayerNorm over (C, H, W) of each example
        return nn.GroupNorm(1, channels)
    if norm == "in":
        return nn.InstanceNorm2d(channels, affine=True)
    _check_groups(groups, channels)
    return nn.GroupNorm(groups, channels)


def _check_groups(groups: int, channels: int) -> None:
    if channels % groups:
        divisors = [d for d in range(1, channels + 1) if channels % d == 0]
        raise GradlabError(f"GroupNorm groups={groups} does not divide {channels} channels; "
                           f"set groups to one of {divisors} (or change the width)")


def mlp(settings, data) -> nn.Module:
    """Linear-[norm]-ReLU blocks, then a Linear head (default: Linear(10,5)-ReLU-Linear(5,1))."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(data.example_shape)
    for _ in range(settings.depth):
        layers += [nn.Linear(width, settings.hidden),
                   _feature_norm(settings.norm, settings.hidden, settings.groups), nn.ReLU()]
        width = settings.hidden
    layers.append(nn.Linear(width, data.n_outputs))
    return nn.Sequential(*layers)


def cnn(settings, data) -> nn.Module:
    """Two conv-norm-ReLU-pool blocks and a linear head, for 8x8 one-channel images."""
    c, norm, groups = settings.channels, settings.norm, settings.groups
    bias = norm == "none"  # a bias before a norm layer is cancelled by it
    side = data.example_shape[-1] // 4
    return nn.Sequential(
        nn.Conv2d(data.example_shape[0], c, 3, padding=1, bias=bias),
        _image_norm(norm, c, groups), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1, bias=bias),
        _image_norm(norm, 2 * c, groups), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * c * side * side, data.n_outputs),
    )


MODELS = {
    "toy-linear": (toy_linear, "one weight w = 1, prediction w*x (use with toy-pairs)"),
    "mlp": (mlp, "Linear-[norm]-ReLU x depth + Linear head; settings hidden, depth, norm"),
    "cnn": (cnn, "2 conv blocks (conv-norm-ReLU-pool) + Linear, 8x8 images; channels, norm"),
}
