"""What gets recorded, one observer each: the trajectory (steps.csv), evaluation (eval.csv),
the trace (trace.csv, weights.csv), CUDA memory, the held-gradient and mask-average checks
(checks.csv) and the cost meter (cost.csv). Each watches an arm's steps and owns its rows;
the probe, the largest, has a module of its own (probing.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradlab.config.settings import ZeroGrad
from gradlab.lab.arm import ArmRun, Observer
from gradlab.record.verdict import sum_tolerance
from gradlab.setup import (
    Examples,
    Setup,
    num_examples,
)
from gradlab.train import engine, memory, metrics, replica


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


class Trajectory(Observer):
    """steps.csv: each step's loss and norms, and the distance from the baseline's weights
    and loss at equal examples seen (the baseline, stepping first on a tie, is there)."""

    def __init__(self, base: ArmRun, comparable: bool):
        self.base, self.comparable = base, comparable

    def stepped(self, run: ArmRun, stats: engine.StepStats) -> None:
        level = self.base.examples == run.examples
        weight_dist = metrics.param_distance(run.model, self.base.model) \
            if level and self.comparable else math.nan
        ref_loss = self.base.loss if level else math.nan
        epoch = -(-run.examples // num_examples(run.setup.train))  # its last example's epoch
        run.rows["steps"].append({
            **run.ids, "step": run.step, "examples": run.examples, "epoch": epoch,
            "window_size": stats.examples, "units": stats.units, "lr": stats.lr,
            "loss": stats.loss, "grad_norm": stats.grad_norm, "update_norm": stats.update_norm,
            "saved_bytes": stats.saved_bytes, "negatives": stats.negatives,
            "allreduces": stats.allreduces, "allreduce_bytes": stats.allreduce_bytes,
            "reduce_scatters": stats.reduce_scatters,
            "reduce_scatter_bytes": stats.reduce_scatter_bytes,
            "step_seconds": stats.seconds,
            "skipped": stats.skipped, "grad_scale": stats.grad_scale,
            "weight_dist": weight_dist,
            "rel_loss_diff": abs(stats.loss - ref_loss) / abs(ref_loss) if ref_loss
            else math.nan})


def evaluate(model: nn.Module, setup: Setup) -> dict[str, float]:
    """Held-out loss per unit and accuracy, in eval mode (running statistics)."""
    if setup.test is None:
        return {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss, units = setup.batch_loss(model, setup.test)
        metrics = {"test_loss": float(loss) / int(units), "test_accuracy": math.nan}
        if setup.accuracy is not None:
            correct, total = setup.accuracy(model, setup.test)
            metrics["test_accuracy"] = int(correct) / int(total)
    model.train(was_training)
    return metrics


class Evaluation(Observer):
    """eval.csv: held-out loss and accuracy every eval_every steps and after the last."""

    def stepped(self, run: ArmRun, stats: engine.StepStats) -> None:
        s = run.s
        if (s.eval_every and run.step % s.eval_every == 0) or run.step == s.steps:
            metrics = evaluate(run.model, run.setup)
            if metrics:
                run.rows["eval"].append({**run.ids, "step": run.step,
                                         "examples": run.examples, **metrics})


class Trace(Observer):
    """trace.csv and weights.csv (trace = true): the accumulated .grad after every
    micro-batch, and the weights after every step (step 0: the initial weights)."""

    def __init__(self, run: ArmRun):
        self.weights(run, 0)

    def micro_batch(self, run: ArmRun, index: int) -> None:
        run.rows["trace"] += [{**run.ids, "step": run.step, "micro_batch": index + 1,
                               "param": name, "element": i, "grad": value}
                              for name, i, value in elements(run.model, metrics.grad_or_zeros,
                                                             run.s.trace_elements)]

    def stepped(self, run: ArmRun, stats: engine.StepStats) -> None:
        self.weights(run, run.step)

    def weights(self, run: ArmRun, step: int) -> None:
        run.rows["weights"] += [{**run.ids, "step": step, "param": name, "element": i,
                                 "value": value}
                                for name, i, value in elements(run.model, lambda p: p,
                                                               run.s.trace_elements)]


def elements(model: nn.Module, tensor_of, count: int) -> Iterator[tuple[str, int, float]]:
    """(parameter name, element index, value) of the first ``count`` elements of each
    ``tensor_of(param)``: a trace costs rows per parameter, not per element of a model."""
    for name, p in model.named_parameters():
        values = replica.full(tensor_of(p)).detach().flatten()[:count].double().tolist()
        yield from ((name, i, v) for i, v in enumerate(values))


class CudaMemory(Observer):
    """summary.csv cuda_peak_bytes, on CUDA: the arm's parameters, plus the most memory its
    forward and backward passes allocated on top of what was allocated when its step began
    (activations, gradients, a float32 buffer). Every arm of a trial lives on the device
    at once, so a peak of the whole device would mostly count the other arms. It is read
    before the probe runs (the probe's work is not the arm's)."""

    def __init__(self, run: ArmRun):
        self.device = run.setup.device
        self.params = sum(tensor_bytes(replica.local(p)) for p in run.model.parameters())
        self.start = 0
        self.peak = 0

    def before_step(self, run: ArmRun, window: Examples) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)

    def gradient(self, run: ArmRun) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - self.start)

    def bytes(self) -> int:
        return self.params + self.peak


class RankState(Observer):
    """summary.csv rank_state_bytes, in a run with data-parallel arms: the most bytes of
    parameters, gradients and optimizer state one rank of the arm holds, read where the
    gradient is complete (before the step). A DDP replica holds all of them on every rank,
    FSDP's shards about 1/W; the activations, which FSDP does not shard, are not counted."""

    def __init__(self):
        self.peak = 0

    def gradient(self, run: ArmRun) -> None:
        params = list(run.model.parameters())
        state = [value for per_param in run.optimizer.state.values()
                 for value in per_param.values() if isinstance(value, torch.Tensor)]
        held = sum(tensor_bytes(replica.local(t)) for t in
                   [*params, *(p.grad for p in params if p.grad is not None), *state])
        self.peak = max(self.peak, held)


class RankDrift(Observer):
    """summary.csv rank_drift, for an arm of DDP replicas: the largest |θ_rank − θ_rank0| over
    every weight and rank after the arm's last step. Replicas that step on one all-reduced
    gradient stay identical (0); a gradient some rank did not share pulls them apart."""

    def __init__(self):
        self.drift = math.nan

    def finished(self, run: ArmRun) -> None:
        weights = torch.cat([p.detach().double().flatten() for p in run.model.parameters()])
        every = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
        dist.all_gather(every, weights)  # every rank calls it: they finish arms in lockstep
        self.drift = max(float((w - every[0]).abs().max()) for w in every)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class HeldGradientCheck(Observer):
    """checks.csv, under zero_grad='never': the .grad held after step t must be the sum of
    the fresh gradients of steps 1..t, each taken at the weights of its own step.

    A fresh gradient is what the ordinary loop would compute at those weights: the
    same settings with zero_grad='every-n', on a scratch model, before the step.
    """

    name = "held grad = sum of fresh grads"

    def __init__(self, run: ArmRun):
        self.scratch = run.fresh_model()
        self.settings = dataclasses.replace(run.s, zero_grad=ZeroGrad.EVERY_N)
        self.total: dict[str, torch.Tensor] | None = None  # float64 sum of fresh gradients
        self.worst = 0.0  # largest relative error over the steps so far

    def before_step(self, run: ArmRun, window: Examples) -> None:
        self.scratch.load_state_dict(replica.full_state_dict(run.model))
        self.scratch.zero_grad(set_to_none=True)
        with run.rng.replay(run.rng.state):  # the random state the step itself starts from
            engine.window_gradient(self.scratch, window, self.settings, run.setup)
        fresh = metrics.grads_of(self.scratch)
        self.total = fresh if self.total is None else {
            name: self.total[name] + fresh[name] for name in fresh}

    def gradient(self, run: ArmRun) -> None:
        held = metrics.grads_of(run.model)
        overall = metrics.compare_tensors((n, held[n], self.total[n]) for n in self.total)[-1]
        self.worst = max(self.worst, overall["rel_l2_err"])

    def finished(self, run: ArmRun) -> None:
        # the sum of steps*N terms rounds like one accumulation of that many terms
        s = self.settings
        tolerance = sum_tolerance(s.dtype, s.steps * s.accum_steps)
        run.rows["checks"].append({**run.ids, "check": self.name, "value": self.worst,
                                   "tolerance": tolerance, "passed": self.worst <= tolerance})


class Cost(Observer):
    """cost.csv (cost = true): the wall time of every optimizer step, and what the first
    step held in memory: the most bytes autograd held saved for backward at once, which is
    its largest micro-batch's, each freed by its backward (activation_bytes: the
    activations, the parameters left out); memory_bytes, what the
    step needs at its peak (CUDA: torch.cuda.max_memory_allocated during it; CPU: the
    weights, gradients and optimizer state plus those activations, counted); rss_bytes,
    the process's peak resident set size during it (CPU).

    Memory is measured on the first step only: counting saved tensors slows a step, so
    the time that summary.csv reports (step_ms) is the median of the later steps. The
    baseline's steps include probing the other arms, if any.
    """

    def __init__(self) -> None:
        self.saved: memory.SavedTensors | None = None  # counting, during the first step

    @contextlib.contextmanager
    def around_step(self, run: ArmRun) -> Iterator[None]:
        device = run.setup.device
        cuda = device.type == "cuda"
        first = run.step == 1
        if first:
            self.saved = memory.SavedTensors(run.model.parameters())
            memory.reset_peak(device)
        with self.saved if first else contextlib.nullcontext():
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            yield
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        row = {**run.ids, "step": run.step, "seconds": seconds, "activation_bytes": math.nan,
               "memory_bytes": math.nan, "rss_bytes": math.nan}
        if first:
            peak, activations = memory.peak_bytes(device), self.saved.peak
            held = peak if cuda else memory.state_bytes(run.model, run.optimizer) + activations
            row.update(activation_bytes=activations, memory_bytes=held,
                       rss_bytes=math.nan if cuda else peak)
            self.saved = None
        run.rows["cost"].append(row)


class MaskAverageCheck(Observer):
    """checks.csv, with dropout and mask_draws = K: at step 1, the arm's gradient minus the
    big batch's (the same settings with N = 1), at the same weights on the same window, for
    K draws of the dropout masks, each pair from one random state. Each draw differs,
    because the masks differ; unbiased accumulation makes the mean difference zero within
    its standard error, sqrt(sum of |d_k - mean|^2 / (K - 1) / K). The check passes when
    |mean| <= 4 standard errors; value and tolerance are both relative to |mean big-batch
    gradient|.
    """

    def __init__(self, run: ArmRun):
        self.name = f"mean over {run.s.mask_draws} mask draws of accumulated - big batch = 0"
        self.row: dict[str, Any] | None = None

    def before_step(self, run: ArmRun, window: Examples) -> None:
        if run.step != 1:
            return
        s = run.s
        big = dataclasses.replace(s, accum_steps=1)
        scratch = run.fresh_model()
        seeds = torch.randint(2**62, (s.mask_draws,),
                              generator=torch.Generator().manual_seed(s.seed))
        differences, bigs = [], []
        for seed in seeds.tolist():
            pair = []
            for settings in (s, big):
                scratch.load_state_dict(replica.full_state_dict(run.model))
                scratch.zero_grad(set_to_none=True)
                with run.rng.replay(run.rng.state):  # a fork: seeding it moves no stream
                    torch.manual_seed(seed)
                    engine.window_gradient(scratch, window, settings, run.setup)
                pair.append(torch.cat([g.flatten() for g in metrics.grads_of(scratch).values()]))
            differences.append(pair[0] - pair[1])
            bigs.append(pair[1])
        d = torch.stack(differences)
        mean = d.mean(0)
        standard_error = float(((d - mean) ** 2).sum() / (len(d) - 1) / len(d)) ** 0.5
        scale = float(torch.stack(bigs).mean(0).norm())
        value = float(mean.norm()) / scale
        tolerance = 4 * standard_error / scale
        self.row = {**run.ids, "check": self.name, "value": value, "tolerance": tolerance,
                    "passed": value <= tolerance}

    def finished(self, run: ArmRun) -> None:
        if self.row is not None:
            run.rows["checks"].append(self.row)
