"""Built-in models: small enough to run on a laptop CPU, big enough to show the effects."""

from __future__ import annotations

import math

import torch
from torch import nn

from gradlab.config import catalog
from gradlab.config.settings import Norm
from gradlab.errors import GradlabError, unhandled
from gradlab.train.dropout import ExampleDropout


def toy_linear(settings, data) -> nn.Module:
    """One weight w, initialised to 1; prediction w*x."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model


def _feature_norm(norm: Norm, width: int, groups: int) -> nn.Module:
    """A norm for (batch, features) activations."""
    match norm:
        case Norm.NONE:
            return nn.Identity()
        case Norm.BN:
            return nn.BatchNorm1d(width)
        case Norm.LN:
            return nn.LayerNorm(width)
        case Norm.GN:
            _check_groups(groups, width)
            return nn.GroupNorm(groups, width)
        case Norm.IN:
            raise GradlabError("norm=in is not available for mlp (instance norm needs spatial "
                               "dimensions); use bn, gn, ln or none, or model=cnn")
    unhandled(norm)


def _image_norm(norm: Norm, channels: int, groups: int) -> nn.Module:
    """A norm for (batch, channels, height, width) activations."""
    match norm:
        case Norm.NONE:
            return nn.Identity()
        case Norm.BN:
            return nn.BatchNorm2d(channels)
        case Norm.LN:  # LayerNorm over (C, H, W) of each example
            return nn.GroupNorm(1, channels)
        case Norm.IN:
            return nn.InstanceNorm2d(channels, affine=True)
        case Norm.GN:
            _check_groups(groups, channels)
            return nn.GroupNorm(groups, channels)
    unhandled(norm)


def _check_groups(groups: int, channels: int) -> None:
    if channels % groups:
        divisors = [d for d in range(1, channels + 1) if channels % d == 0]
        raise GradlabError(f"GroupNorm groups={groups} does not divide {channels} channels; "
                           f"set groups to one of {divisors} (or change the width)")


def _dropout(settings) -> list[nn.Module]:
    """A dropout layer when the settings ask for one (none at all at rate 0, so the layer
    numbering, and a saved state_dict, stay as they were)."""
    return [ExampleDropout(settings.dropout)] if settings.dropout > 0 else []


def mlp(settings, data) -> nn.Module:
    """Linear-[norm]-ReLU-[dropout] blocks, then a Linear head (default: Linear(10,5)-ReLU-
    Linear(5,1))."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(data.example_shape)
    for _ in range(settings.depth):
        layers += [nn.Linear(width, settings.hidden),
                   _feature_norm(settings.norm, settings.hidden, settings.groups), nn.ReLU(),
                   *_dropout(settings)]
        width = settings.hidden
    layers.append(nn.Linear(width, data.n_outputs))
    return nn.Sequential(*layers)


def cnn(settings, data) -> nn.Module:
    """Two conv-norm-ReLU-pool-[dropout] blocks and a linear head, for 8x8 one-channel
    images."""
    c, norm, groups = settings.channels, settings.norm, settings.groups
    bias = norm == Norm.NONE  # a bias before a norm layer is cancelled by it
    side = data.example_shape[-1] // 4
    return nn.Sequential(
        nn.Conv2d(data.example_shape[0], c, 3, padding=1, bias=bias),
        _image_norm(norm, c, groups), nn.ReLU(), nn.MaxPool2d(2), *_dropout(settings),
        nn.Conv2d(c, 2 * c, 3, padding=1, bias=bias),
        _image_norm(norm, 2 * c, groups), nn.ReLU(), nn.MaxPool2d(2), *_dropout(settings),
        nn.Flatten(), nn.Linear(2 * c * side * side, data.n_outputs),
    )


def gru_lm(settings, data) -> nn.Module:
    """Byte embedding (32), one GRU layer (64), linear head: a causal LM for docstrings."""
    from gradlab.zoo.text import GRULanguageModel

    return GRULanguageModel()


def transformer_lm(settings, data) -> nn.Module:
    """A 2-layer, 2-head causal transformer (width 32) for docstrings."""
    from gradlab.zoo.text import TransformerLanguageModel

    return TransformerLanguageModel(max_len=settings.max_len)


class TwoHeads(nn.Module):
    """A shared trunk and one linear head per task; each example is scored by its own task's
    head, and a head whose task is absent from the batch is not called at all, so its
    parameters get no gradient from that batch (they sit it out)."""

    def __init__(self, features: int, hidden: int, tasks: int = 2):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(features, hidden), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = x[:, -1].long()  # the last column says which task an example belongs to
        h = self.trunk(x[:, :-1])
        out = torch.zeros(len(x), 1, dtype=h.dtype, device=h.device)
        for t, head in enumerate(self.heads):
            mine = (task == t).nonzero().flatten()
            if len(mine):  # (a host sync per head: fine for a model this small)
                out = out.index_put((mine,), head(h[mine]))
        return out


def two_heads(settings, data) -> nn.Module:
    """A trunk Linear(10, hidden)-Tanh shared by two tasks, a Linear(hidden, 1) head each
    (two-tasks data: the last input column is the task)."""
    return TwoHeads(data.example_shape[0] - 1, settings.hidden)


MODELS = {name: (factory, catalog.MODELS[name]) for name, factory in {
    "toy-linear": toy_linear,
    "mlp": mlp,
    "cnn": cnn,
    "gru-lm": gru_lm,
    "transformer-lm": transformer_lm,
    "two-heads": two_heads,
}.items()}
