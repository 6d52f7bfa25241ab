"""One arm of a trial while it trains: its model (a DDP replica when data-parallel), optimizer,
scaler and scheduler, its stream of windows and its own random stream; it takes one optimizer
step through the engine with every observer watching.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from gradlab.config.spec import Arm, Trial
from gradlab.lab import setups
from gradlab.lab.plan import probe_due
from gradlab.record import schema
from gradlab.setup import Examples, Setup, num_examples
from gradlab.train import amp, engine, gradcache, optim, replica


class ArmRng:
    """The arm's own random stream (dropout and the like), so that what one arm draws never
    depends on which arms stepped before it: swapped in around the arm's work."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.state = gradcache.rng_state(device)

    def __enter__(self):
        self.outside = gradcache.rng_state(self.device)
        gradcache.set_rng_state(self.state, self.device)

    def __exit__(self, *exc):
        self.state = gradcache.rng_state(self.device)
        gradcache.set_rng_state(self.outside, self.device)

    def replay(self, state) -> contextlib.AbstractContextManager:
        """Run from ``state`` (one this stream held), then put back whatever was there: a
        probe draws the dropout masks the step it mirrors drew, and moves no stream."""
        return gradcache.replayed(state, self.device)


class ArmRun:
    """One arm of a trial while it trains: model, optimizer, stream of windows, observers.

    It is also the engine's Watch: what happens inside a step is passed on to the
    observers.
    """

    def __init__(self, trial: Trial, arm: Arm, setup: Setup, data_cache: dict):
        self.trial, self.arm, self.setup, self.s = trial, arm, setup, arm.settings
        self.data_cache = data_cache
        self.model = setup.model
        self.replica = self.replicate(self.model)  # what the engine trains
        self.optimizer = optim.make_optimizer(self.model, self.s)
        self.scaler = amp.make_scaler(self.s, setup.device)  # None with grad_scaler=off
        self.scheduler = optim.make_scheduler(self.optimizer, self.s)
        self.windows = setups.windows(setup, self.s)
        self.upcoming = next(self.windows)  # the window the next step takes
        self.rng = ArmRng(self.s.seed, setup.device)
        self.step = 0  # the step being taken, or the last one taken
        self.examples = 0  # examples seen after the last step
        self.loss = math.nan  # the last step's loss
        self.observers: list[Observer] = []
        self.rows: dict[str, list[dict[str, Any]]] = {t: [] for t in schema.TABLES}

    def fresh_model(self) -> nn.Module:
        """Another model like this arm's (for probes and checks to compute in)."""
        return setups.build_setup(self.s, self.setup.device, self.data_cache).model

    def replicate(self, model: nn.Module) -> nn.Module:
        """The model as this arm trains it: a DDP replica, or FSDP's shards of it, on each rank
        when the arm is data-parallel (world_size > 1), else the model itself."""
        return replica.replicate(model, self.s) if self.s.world_size > 1 else model

    @property
    def ids(self) -> dict[str, Any]:
        return {"trial": self.trial.index, "arm": self.arm.name}

    @property
    def done(self) -> bool:
        return self.step >= self.s.steps

    @property
    def next_examples(self) -> int:
        """Examples seen after the next step."""
        return self.examples + num_examples(self.upcoming)

    def advance(self) -> None:
        """Take one optimizer step, with every observer watching."""
        window, self.upcoming = self.upcoming, next(self.windows)
        self.step += 1
        for o in self.observers:
            o.before_step(self, window)
        with self.rng, contextlib.ExitStack() as around:
            for o in self.observers:
                around.enter_context(o.around_step(self))
            stats = engine.train_step(self.replica, self.optimizer, window, self.s, self.setup,
                                      self, self.scheduler, self.scaler,
                                      # a loss that couples the batch: what GradCache saves
                                      measure_memory=self.setup.coupled
                                      and probe_due(self.s, self.step))
        self.examples += stats.examples
        self.loss = stats.loss
        for o in self.observers:
            o.stepped(self, stats)

    def micro_batch(self, index: int) -> None:
        for o in self.observers:
            o.micro_batch(self, index)

    def gradient(self) -> None:
        for o in self.observers:
            o.gradient(self)


class Observer:
    """Watches an arm's steps and writes rows into it (gradlab.lab.observers). Override what you
    need. Defined here, beside the arm that calls each hook, as the engine defines its Watch."""

    def before_step(self, run: ArmRun, window: Examples) -> None: ...

    def around_step(self, run: ArmRun) -> contextlib.AbstractContextManager:
        """A context the step runs inside (after before_step, before stepped)."""
        return contextlib.nullcontext()

    def micro_batch(self, run: ArmRun, index: int) -> None: ...
    def gradient(self, run: ArmRun) -> None: ...
    def stepped(self, run: ArmRun, stats: engine.StepStats) -> None: ...
    def finished(self, run: ArmRun) -> None: ...
