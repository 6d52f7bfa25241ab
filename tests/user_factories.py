"""A user's own model and dataset, reached through --set model=user_factories:tiny_net."""

import torch


def tiny_net(settings, data):
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def noisy_line(settings):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(96, 3, generator=g, dtype=torch.float64)
    return x, x.sum(1, keepdim=True) + 0.1 * torch.randn(96, 1, generator=g, dtype=torch.float64)


def broken_net(settings):  # wrong signature: a model factory takes (settings, data)
    return torch.nn.Linear(3, 1)


NOT_CALLABLE = 3


def slow_data(settings):
    """Touches $GRADLAB_TEST_MARKER, then takes a minute: a preflight to interrupt."""
    import os
    import time
    from pathlib import Path

    Path(os.environ["GRADLAB_TEST_MARKER"]).touch()
    time.sleep(60)
    return noisy_line(settings)


def swallowing_data(settings):
    """Like some libraries, turns Ctrl-C into an ordinary exception."""
    try:
        return slow_data(settings)
    except KeyboardInterrupt:
        raise RuntimeError("interrupted system call") from None


def flat_net(settings, data):
    """Returns shape (B,) where the regression targets are (B, 1): broadcasting would hide it."""
    return torch.nn.Sequential(torch.nn.Linear(10, 1), torch.nn.Flatten(0))


def three_classes(settings, data):
    """3 outputs for the 10 classes of digits."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))


def wide_net(settings, data):
    """40 000 weights in one matrix: a trace of every element would be 40 000 rows a step."""
    return torch.nn.Sequential(torch.nn.Linear(1, 200), torch.nn.Linear(200, 200),
                               torch.nn.Linear(200, 1))


def exits(settings, data):  # ends the process instead of returning a model
    import sys

    sys.exit(3)


def frozen_net(settings, data):  # every parameter frozen: nothing to train
    net = tiny_net(settings, data)
    net.requires_grad_(False)
    return net


def line_with_a_nan(settings):  # one example's input is NaN, as a sensor gap would leave it
    x, y = noisy_line(settings)
    x[17, 1] = float("nan")
    return x, y


def printing_net(settings, data):  # a factory that talks, as research code does
    print("building my model")
    return tiny_net(settings, data)


class _NanOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.linear(x) * float("nan")


def nan_net(settings, data):
    """Its output is NaN from the first forward (a log of a negative, a 0/0 in the model)."""
    return _NanOut()
