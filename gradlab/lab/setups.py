"""An arm's model and examples: built-in or the user's own factories, seeded so that every
arm of a trial starts from the same weights, and the seeded stream of windows every arm of a
trial reads in the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from gradlab import entrypoints, zoo
from gradlab.config.settings import EpochEnd, Settings
from gradlab.errors import GradlabError, unhandled
from gradlab.lab.device import DTYPES
from gradlab.setup import (
    Examples,
    Setup,
    cast,
    check_examples,
    num_examples,
    take,
)
from gradlab.train import amp, engine


def call_factory(kind: str, name: str, *args) -> Any:
    """Call a built-in or user factory; a user's exception becomes a one-line input error."""
    factory = zoo.resolve(kind, name)
    try:
        return factory(*args)
    except GradlabError:
        raise
    except SystemExit as err:  # the factory meant to end its own script, not gradlab
        raise GradlabError(f"{kind} '{name}' {entrypoints.failure(err).removeprefix('it ')}; a "
                           f"{kind} factory must return one, or raise an exception") from None
    except Exception as err:
        signature = {"model": "(settings, data)"}.get(kind, "(settings)")
        raise GradlabError(f"{kind} '{name}' failed: {type(err).__name__}: {err}; a {kind} "
                           f"factory is called as factory{signature}") from None


def seeded(s: Settings, build: Callable[[], Any]) -> Any:
    """Build with torch seeded by the arm's seed, leaving the global random state as it was:
    every arm of a trial starts from the same weights, and building one moves no other's
    random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        return build()


def load_data(s: Settings) -> zoo.Data:
    data = call_factory("dataset", s.dataset, s)
    if isinstance(data, tuple):  # a user's factory may return just (x, y)
        x, y = data
        data = zoo.Data(x, y, loss="cross_entropy" if not y.is_floating_point() else "mse")
    if not isinstance(data, zoo.Data):
        raise GradlabError(f"dataset '{s.dataset}' returned {type(data).__name__}; "
                           f"return gradlab.zoo.Data or a tuple (x, y)")
    if data.loss not in zoo.LOSSES:
        raise GradlabError(f"dataset '{s.dataset}' asks for loss '{data.loss}'; choose one of "
                           f"{', '.join(zoo.LOSSES)}")
    return data


def builtin_setup(s: Settings, data_cache: dict) -> Setup:
    """A Setup from the model and dataset settings (built-in or 'pkg.module:factory')."""
    key = (s.dataset, s.min_len, s.max_len)  # what the built-in datasets read
    if key not in data_cache:
        data_cache[key] = load_data(s)
    data = data_cache[key]
    model = seeded(s, lambda: call_factory("model", s.model, s, data))
    if not isinstance(model, nn.Module):
        raise GradlabError(f"model '{s.model}' returned {type(model).__name__}, "
                           f"not a torch.nn.Module")
    loss, units, accuracy = zoo.LOSSES[data.loss]
    return Setup(model, data.train, loss, units, data.test, accuracy, data.shuffle)


def user_setup(s: Settings) -> Setup:
    """The user's own Setup from ``setup = 'pkg.module:factory'``."""
    made = seeded(s, lambda: call_factory("setup", s.setup, s))
    if not isinstance(made, Setup):
        raise GradlabError(f"setup '{s.setup}' returned {type(made).__name__}; return "
                           f"gradlab.setup.Setup(model, train, loss, ...)")
    if not isinstance(made.model, nn.Module):
        raise GradlabError(f"setup '{s.setup}': model is a {type(made.model).__name__}, "
                           f"not a torch.nn.Module")
    functions = {"embed": "embed(model, batch) -> embeddings",
                 "coupled_loss": "coupled_loss(embeddings) -> (summed loss, units)"} \
        if made.coupled else {"loss": "loss(model, batch) -> (summed loss, units)"}
    for name, signature in functions.items():
        if not callable(getattr(made, name)):
            raise GradlabError(f"setup '{s.setup}': {name} is not callable; give a function "
                               f"{signature}")
    return made


def build_setup(s: Settings, device: torch.device, data_cache: dict) -> Setup:
    """The arm's model and examples, in its dtype and on its device."""
    amp.check_precision_support(s, device)
    setup = user_setup(s) if s.setup else builtin_setup(s, data_cache)
    name = s.setup or f"dataset '{s.dataset}'"
    check_examples(setup.train, f"{name}: training examples")
    if setup.test is not None:
        check_examples(setup.test, f"{name}: test examples")
    dtype = DTYPES[s.dtype]
    return dataclasses.replace(setup, model=setup.model.to(device, dtype),
                               train=cast(setup.train, dtype, device),
                               test=cast(setup.test, dtype, device))


def windows(setup: Setup, s: Settings) -> Iterator[Examples]:
    """The seeded stream of windows; every arm of a trial reads the same examples in the same
    order (reshuffled each epoch), grouped into windows as its epoch_end says."""
    n = num_examples(setup.train)
    g = torch.Generator().manual_seed(s.seed)

    def epoch() -> torch.Tensor:
        return torch.randperm(n, generator=g) if setup.shuffle else torch.arange(n)

    def window(index: torch.Tensor) -> Examples:
        return take(setup.train, index.to(setup.device))

    match s.epoch_end:
        case EpochEnd.RUN_ON:
            order = torch.empty(0, dtype=torch.long)
            while True:
                while len(order) < s.batch_size:  # epochs are concatenated
                    order = torch.cat([order, epoch()])
                index, order = order[:s.batch_size], order[s.batch_size:]
                yield window(index)
        case EpochEnd.SHORT_WINDOW:
            while True:  # the last window of each epoch holds what is left: n mod B examples
                yield from map(window, epoch().split(s.batch_size))
        case EpochEnd.CARRY_OVER:
            held = torch.empty(0, dtype=torch.long)
            while True:
                for index in epoch().split(s.batch_size):
                    if len(index) < s.batch_size:  # backwarded at the epoch's end, not stepped
                        held = index
                    else:  # ... so its gradients are still in .grad at the next step
                        yield window(torch.cat([held, index]))
                        held = held[:0]
        case _:
            unhandled(s.epoch_end)


def smallest_micro_batch(n: int, s: Settings) -> int:
    """Examples in the smallest micro-batch the arm will run, on a training set of n."""
    smallest = s.batch_size // s.accum_steps
    short = n % s.batch_size
    if short and s.epoch_end != EpochEnd.RUN_ON:  # the short window at each epoch's end
        smallest = min(smallest, short // engine.micro_batch_count(short, s))
    return smallest
