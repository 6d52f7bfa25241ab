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
