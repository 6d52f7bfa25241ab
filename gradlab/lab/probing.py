"""The probe (probe.csv, buffers.csv): every due arm's gradient at the baseline's weights, on
the baseline's window, through the same engine function, against the baseline's and against
the exact float64 reference; the floor of each precision and the condition of the sum.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradlab.config.settings import (
    FACTORY_BLIND,
    Autocast,
    ClipAt,
    Dtype,
    GradAccumDtype,
    GradScaling,
    Settings,
)
from gradlab.lab import setups
from gradlab.lab.arm import Observer
from gradlab.lab.device import DTYPES
from gradlab.lab.observers import evaluate
from gradlab.lab.plan import probe_due
from gradlab.record.verdict import compute_dtype
from gradlab.setup import (
    Examples,
    Setup,
    cast,
    num_examples,
)
from gradlab.train import amp, engine, metrics, optim, replica

if TYPE_CHECKING:
    from gradlab.lab.arm import ArmRun


def precision(s: Settings) -> tuple[Dtype, Autocast, GradScaling]:
    """What decides how one big batch rounds: the parameters' dtype, autocast, the scaler.
    (A float32 buffer changes nothing for one micro-batch.)"""
    return s.dtype, s.autocast, s.grad_scaler


def low_precision(s: Settings) -> bool:
    """Does the arm compute its gradients in bfloat16 or float16?"""
    return compute_dtype(s.dtype, s.autocast) in (Dtype.BFLOAT16, Dtype.FLOAT16)


def floor_key(run: ArmRun) -> tuple:
    """Arms alike in this compute the same floor: their precision, and a GradScaler's scale."""
    return *precision(run.s), run.scaler.get_scale() if run.scaler is not None else None


class Probe(Observer):
    """probe.csv and buffers.csv, watching the baseline: when its .grad holds the gradient
    its step will apply, each due arm computes its own at the same weights (and running
    statistics) on the same window, through the same engine function; the two are
    compared parameter by parameter.

    Each probe also takes the exact gradient: the baseline's, in float64, at the same
    weights on the same window. Every arm's distance from it (exact_err), and the
    distance of one big batch in the arm's own precision (floor_err: the baseline's
    own when the precisions agree), are what the verdict weighs (record/verdict.py). And it
    takes Σ_i |g_i| of the window's N partial gradients in float64, the condition of
    their sum (sum_condition = ‖Σ|g_i|‖ / ‖Σ g_i‖), which scales the rounding that
    summing them can add. Each also records the learning rate the arm's step applies
    (lr) beside the baseline's (ref_lr): a step is the gradient times it.

    An arm with a GradScaler is probed with a copy of its scaler, holding the scale
    the arm's own step will use: the probe's unscale_ leaves the arm's scaler as it was.

    "The same window" is the same examples, drawn from the same random state: both the
    exact gradient and every arm's start from the state the baseline's step started
    from, so the big batch's dropout masks are the baseline's own, and an arm's differ
    from them only by how its own split of the window draws them. An arm is due when
    its next step ends where the baseline's does (the same examples seen); its window is
    its own next one: the baseline's, or under epoch_end = carry-over the baseline's with
    the last epoch's unflushed examples in front.

    Memory: the probe computes in the baseline's own model. The baseline's gradient is
    set aside (not copied); the exact one, and Σ|g_i|, are taken with the model cast to
    float64 in place and back (exact: a float64 holds every value of a narrower float);
    each arm's gradient then lands in the model's .grad, one arm at a time; at the end
    the baseline's gradient and running statistics are put back. So a probe holds the
    exact gradient (float64) and one arm's gradient beyond what training holds. Only an
    arm whose model may differ from the baseline's (another dtype, or a setting a model
    factory may read: all but config.settings.FACTORY_BLIND) gets a model of its own, and
    only an arm in another precision than the baseline's a model for its floor.
    """

    def __init__(self, base: ArmRun, arms: list[ArmRun]):
        self.arms = arms
        self.own_models: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}  # by arm
        self.window: Examples | None = None
        self.end = 0  # examples the baseline will have seen after this step
        self.start_state = None  # the baseline's random state as its step starts
        self.buffers_before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}  # every buffer after the baseline's forward
        # the big batch, computed exactly: no autocast, scaler or buffer in float64
        self.exact_settings = dataclasses.replace(
            base.s, dtype=Dtype.FLOAT64, autocast=Autocast.NONE, grad_scaler=GradScaling.OFF,
            grad_accum_dtype=GradAccumDtype.PARAM, clip_at=ClipAt.AFTER_ACCUMULATION)
        # a model (and an optimizer for a GradScaler's unscale_) per precision, for floors
        self.floor_models: dict[tuple, tuple[Setup, torch.optim.Optimizer]] = {}
        # Σ|g_i| costs a float64 pass per N: taken where the bound it gives can matter, in
        # a trial with an arm computing in bfloat16 or float16 (float32's is below 1e-5)
        self.conditions = any(low_precision(a.s) for a in [base, *arms])

    def due(self, base: ArmRun) -> list[ArmRun]:
        return [a for a in self.arms if probe_due(a.s, base.step) and base.step <= a.s.steps
                and a.next_examples == self.end]

    def before_step(self, base: ArmRun, window: Examples) -> None:
        self.window = window
        self.end = base.examples + num_examples(window)
        self.start_state = base.rng.state
        if self.due(base):  # running statistics as the baseline's forward will find them
            self.buffers_before = {k: b.clone() for k, b in running_stats(base.model).items()}

    def gradient(self, base: ArmRun) -> None:
        due = self.due(base)
        if not due:
            return
        model = base.model
        held = {name: p.grad for name, p in model.named_parameters()}  # set aside, not copied
        baseline = {name: metrics.grad_or_zeros(p) for name, p in model.named_parameters()}
        self.after = {name: b.clone() for name, b in model.named_buffers()}  # the forward's
        model.zero_grad(set_to_none=True)
        try:
            exact = self.exact_gradient(base)
            if exact is None:  # a float64 baseline computes the exact gradient itself
                exact = baseline
            floors = {floor_key(base): compare_grads(baseline, exact)}
            conditions: dict[int, dict[str, float]] = {}
            for arm in due:
                key, n = floor_key(arm), arm.s.accum_steps
                if key not in floors:
                    floors[key] = self.floor(arm, base, exact)
                if n not in conditions:
                    conditions[n] = self.sum_condition(base, n) if self.conditions else {}
                self.probe_arm(arm, base, baseline, exact, floors[key], conditions[n])
        finally:
            for name, p in model.named_parameters():
                p.grad = held[name]
            load_buffers(model, self.after)

    def probe_arm(self, arm: ArmRun, base: ArmRun, baseline: dict[str, torch.Tensor],
                  exact: dict[str, torch.Tensor], floor: list[dict],
                  condition: dict[str, float]) -> None:
        """The arm's gradient against the baseline's and the exact one: its probe rows."""
        trained, optimizer = self.model_for(arm, base)  # data-parallel: all-reduced on ranks
        model = replica.module_of(trained)
        self.start_at_baseline(model, base)
        window = cast(arm.upcoming, DTYPES[arm.s.dtype], arm.setup.device)
        with base.rng.replay(self.start_state):  # and moves no arm's stream
            engine.window_gradient(trained, window, arm.s, arm.setup, optimizer=optimizer,
                                   scaler=amp.make_scaler(arm.s, arm.setup.device,
                                                          like=arm.scaler))
        grads = {name: metrics.grad_or_zeros(p) for name, p in model.named_parameters()}
        ids = {**arm.ids, "step": base.step}
        rates = {"lr": optim.learning_rate(arm.optimizer),
                 "ref_lr": optim.learning_rate(base.optimizer)}
        arm.rows["probe"] += [
            {**ids, **r, "exact_err": e["rel_l2_err"], "floor_err": f["rel_l2_err"],
             "sum_condition": condition.get(r["param"], math.nan), **rates}
            for r, e, f in zip(compare_grads(grads, baseline), compare_grads(grads, exact),
                               floor, strict=True)]
        arm.rows["buffers"] += [{**ids, **r} for r in compare_buffers(
            model, running_stats_of(self.after), arm.setup)]
        model.zero_grad(set_to_none=True)  # one arm's gradient at a time

    def start_at_baseline(self, model: nn.Module, base: ArmRun) -> None:
        """The baseline's weights, and its running statistics before this step's forward
        (its other buffers, like BatchNorm's counter, as its forward left them)."""
        if model is not base.model:  # (the baseline is never sharded: it runs in one process)
            replica.load_full_state_dict(model, base.model.state_dict())
        load_buffers(model, {**self.after, **self.buffers_before})
        model.zero_grad(set_to_none=True)

    def exact_gradient(self, base: ArmRun) -> dict[str, torch.Tensor] | None:
        """The baseline's gradient computed in float64 (None: the baseline is float64)."""
        if base.s.dtype == Dtype.FLOAT64:
            return None
        model = base.model
        with cast_in_place(model, torch.float64):
            self.start_at_baseline(model, base)
            window = cast(self.window, torch.float64, base.setup.device)
            with base.rng.replay(self.start_state):  # the baseline's dropout masks
                engine.window_gradient(model, window, self.exact_settings, base.setup)
            exact = {name: metrics.grad_or_zeros(p) for name, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)  # the float64 gradient stays in `exact` alone
        return exact

    def floor(self, arm: ArmRun, base: ArmRun, exact: dict[str, torch.Tensor]
              ) -> list[dict[str, Any]]:
        """The baseline's big batch computed in the arm's precision, against the exact
        gradient: what one big batch rounds there (with a GradScaler: at the arm's scale)."""
        s = dataclasses.replace(base.s, dtype=arm.s.dtype, autocast=arm.s.autocast,
                                grad_scaler=arm.s.grad_scaler)
        if precision(s) not in self.floor_models:
            setup = setups.build_setup(s, base.setup.device, base.data_cache)
            self.floor_models[precision(s)] = setup, optim.make_optimizer(setup.model, s)
        setup, optimizer = self.floor_models[precision(s)]
        self.start_at_baseline(setup.model, base)
        with base.rng.replay(self.start_state):
            engine.window_gradient(setup.model, cast(self.window, DTYPES[s.dtype], setup.device),
                                   s, setup, optimizer=optimizer,
                                   scaler=amp.make_scaler(s, setup.device, like=arm.scaler))
        floor = compare_grads(metrics.grads_of(setup.model), exact)
        setup.model.zero_grad(set_to_none=True)
        return floor

    def sum_condition(self, base: ArmRun, accum_steps: int) -> dict[str, float]:
        """‖Σ_i |g_i|‖ / ‖Σ_i g_i‖ over the window's partial gradients in float64, per
        parameter and for all together ('*'): 1 when N = 1 or when the partial gradients
        all point alike, large when they cancel. Taken in the baseline's model, cast."""
        model = base.model
        with cast_in_place(model, torch.float64):
            self.start_at_baseline(model, base)
            magnitudes = PartialMagnitudes(model)
            with base.rng.replay(self.start_state):
                engine.window_gradient(model, cast(self.window, torch.float64, base.setup.device),
                                       dataclasses.replace(self.exact_settings,
                                                           accum_steps=accum_steps),
                                       base.setup, magnitudes)
            model.zero_grad(set_to_none=True)
        return magnitudes.condition()

    def model_for(self, arm: ArmRun, base: ArmRun) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Where the arm's probe computes: the baseline's model when the arm's can only be
        the same (their settings differ only in what the engine reads), else its own; and
        an optimizer over it that only a GradScaler's unscale_ uses (the probe never steps).
        A data-parallel arm's is a replica of its own, all-reduced across the ranks."""
        if same_model(arm.s, base.s):
            return base.model, base.optimizer
        if arm.arm.name not in self.own_models:
            model = arm.fresh_model()
            self.own_models[arm.arm.name] = (arm.replicate(model),
                                             optim.make_optimizer(model, arm.s))
        return self.own_models[arm.arm.name]


def same_model(a: Settings, b: Settings) -> bool:
    return all(getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(Settings)
               if f.name not in FACTORY_BLIND)


def compare_grads(arm: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]
                  ) -> list[dict[str, float | str]]:
    return metrics.compare_tensors((name, g, ref[name]) for name, g in arm.items())


@contextlib.contextmanager
def cast_in_place(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The model's floating parameters and buffers in ``dtype`` for the block, then back
    to their own dtypes (the same objects: an optimizer's references stay valid)."""
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers())
               if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.to(dtype)
    try:
        yield
    finally:
        for t, own in zip(tensors, dtypes, strict=True):
            t.data = t.data.to(own)


class PartialMagnitudes:
    """Watches a float64 window_gradient and sums |g_i|, the magnitude of each micro-batch's
    partial gradient (the difference in .grad across its backward), per parameter."""

    def __init__(self, model: nn.Module):
        self.params = dict(model.named_parameters())
        self.before = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.total = {n: torch.zeros_like(p) for n, p in self.params.items()}

    def micro_batch(self, index: int) -> None:
        for name, p in self.params.items():
            now = metrics.grad_or_zeros(p).detach()
            self.total[name] += (now - self.before[name]).abs()
            self.before[name] = now.clone()

    def gradient(self) -> None: ...

    def condition(self) -> dict[str, float]:
        rows, sums, norms = {}, 0.0, 0.0
        for name in self.params:
            total, norm = float(self.total[name].norm()), float(self.before[name].norm())
            rows[name] = ratio(total, norm)
            sums, norms = sums + total**2, norms + norm**2
        rows["*"] = ratio(math.sqrt(sums), math.sqrt(norms))
        return rows


def ratio(magnitudes: float, norm: float) -> float:
    """Σ|g_i| over ‖Σ g_i‖; a zero gradient made of zero parts is perfectly conditioned."""
    if norm > 0:
        return magnitudes / norm
    return 1.0 if magnitudes == 0 else math.inf


def running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm running means and variances (num_batches_tracked is a counter, not a statistic)."""
    return running_stats_of(dict(model.named_buffers()))


def running_stats_of(buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: b.detach() for name, b in buffers.items()
            if name.endswith(("running_mean", "running_var"))}


def load_buffers(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into the model's buffers of those names (cast to their dtype)."""
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in values.items():
            buffers[name].copy_(value)


def compare_buffers(probed: nn.Module, ref: dict[str, torch.Tensor], setup: Setup
                    ) -> list[dict[str, Any]]:
    """Running statistics the arm's probe pass left, vs the baseline's, and what they do to eval.

    Both passes started from the baseline's weights and statistics; the baseline's
    forward updated them once (``ref``), the arm's N times. The '*' row also evaluates
    the baseline's weights with the arm's statistics and with the baseline's, so the
    accuracy change is due to the statistics alone.
    """
    if not ref:
        return []
    arm = running_stats(probed)
    rows = [{"buffer": r.pop("param"), **r}
            for r in metrics.compare_tensors((k, arm[k], ref[k]) for k in ref)]
    with_arm = evaluate(probed, setup)
    saved = {k: v.clone() for k, v in arm.items()}
    load_buffers(probed, ref)
    with_ref = evaluate(probed, setup)
    load_buffers(probed, saved)
    if with_arm:
        rows[-1].update(test_accuracy=with_arm["test_accuracy"],
                        ref_test_accuracy=with_ref["test_accuracy"])
    return rows
