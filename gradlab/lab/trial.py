"""Trials in lockstep: every arm from the same weights, on the same examples in the same order.

The arms of a trial train side by side; the arm that has seen the fewest examples
steps next, the baseline first on a tie. So when the baseline is about to take
step t, every arm can be probed at the baseline's weights on the baseline's
window (the gradient alone: nothing else differs), and after an arm's step its
weights can be compared with the baseline's at equal examples seen, without
keeping the baseline's history. What a trial holds costs O(parameters) per arm,
whatever the number of steps.

What gets recorded is up to observers (trajectory, probe, trace, held-gradient
check, evaluation): each watches an arm's steps and owns its rows. The loop
itself is ``run_trial`` and ``ArmRun.advance``: a few lines.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from gradlab.config.settings import ZeroGrad
from gradlab.config.spec import Trial
from gradlab.lab import parallel, setups
from gradlab.lab.arm import ArmRun
from gradlab.lab.device import resolve_device
from gradlab.lab.observers import (
    Cost,
    CudaMemory,
    Evaluation,
    HeldGradientCheck,
    MaskAverageCheck,
    RankDrift,
    RankState,
    Trace,
    Trajectory,
    same_architecture,
)
from gradlab.lab.plan import Workers, torch_threads
from gradlab.lab.probing import Probe
from gradlab.record import schema
from gradlab.record.store import RunDir, whole_write
from gradlab.record.verdict import accumulation_bound, compute_dtype, judge


def start(trial: Trial, data_cache: dict) -> list[ArmRun]:
    """Every arm of a trial, built and watched; the baseline first."""
    arms = sorted(trial.arms, key=lambda a: not a.baseline)
    runs = []
    for arm in arms:
        setup = setups.build_setup(arm.settings, resolve_device(arm.settings.device), data_cache)
        runs.append(ArmRun(trial, arm, setup, data_cache))
    base, others = runs[0], runs[1:]
    probed = [r for r in others if same_architecture(r.model, base.model)
              and r.s.batch_size == base.s.batch_size]
    base.observers.append(Probe(base, probed))
    for run in runs:
        if run.setup.device.type == "cuda":  # first: it reads the peak before the probe runs
            run.observers.insert(0, CudaMemory(run))
        run.observers += [Trajectory(base, same_architecture(run.model, base.model)),
                          Evaluation()]
        if any(r.s.world_size > 1 for r in runs):
            run.observers.append(RankState())
        if isinstance(run.replica, DistributedDataParallel):
            run.observers.append(RankDrift())
        if run.s.trace:
            run.observers.append(Trace(run))
        if run.s.zero_grad == ZeroGrad.NEVER:
            run.observers.append(HeldGradientCheck(run))
        if run.s.cost:
            run.observers.append(Cost())
        if run.s.mask_draws and not run.arm.baseline:
            run.observers.append(MaskAverageCheck(run))
    return runs


def run_trial(trial: Trial, data_cache: dict,
              advance: Callable[[int], None] = lambda n: None) -> dict[str, list[dict]]:
    """Train every arm of a trial in lockstep; returns the trial's rows, table by table."""
    runs = start(trial, data_cache)
    while pending := [r for r in runs if not r.done]:
        # the fewest examples after its next step goes next; the baseline first on a tie
        run = min(pending, key=lambda r: (r.next_examples, not r.arm.baseline))
        run.advance()
        advance(1)
    rows: dict[str, list[dict]] = {t: [] for t in schema.TABLES}
    for run in runs:
        for o in run.observers:
            o.finished(run)
        run.rows["summary"].append(summary_row(run))
        for table in schema.TABLES:
            rows[table] += run.rows[table]
    return rows


def summary_row(run: ArmRun) -> dict[str, Any]:
    s, arm = run.s, run.arm
    metrics = schema.summarise(run.rows["steps"], run.rows["probe"], run.rows["eval"],
                               run.rows["buffers"])
    computed_in = compute_dtype(s.dtype, s.autocast)
    tolerance, verdict = judge(arm.baseline, computed_in, s.accum_steps,
                               {**metrics, "world_size": s.world_size})
    memory = [o.bytes() for o in run.observers if isinstance(o, CudaMemory)]
    state = [o.peak for o in run.observers if isinstance(o, RankState)]
    drift = [o.drift for o in run.observers if isinstance(o, RankDrift)]
    if s.cost:
        metrics.update(schema.summarise_cost(run.rows["cost"], s.batch_size))
    return {**run.ids, "baseline": arm.baseline,
            **{key: getattr(s, key) for key in run.trial.swept},  # the arm's own value of each
            "batch_size": s.batch_size, "accum_steps": s.accum_steps,
            "micro_batch": s.micro_batch, "world_size": s.world_size, "dtype": s.dtype,
            "precision": computed_in, **metrics,
            "accum_bound": math.nan if arm.baseline else accumulation_bound(
                computed_in, s.accum_steps, metrics["max_sum_condition"]),
            "cuda_peak_bytes": memory[0] if memory else math.nan,
            "rank_state_bytes": state[0] if state else math.nan,
            "rank_drift": drift[0] if drift else math.nan,
            "rel_tolerance": tolerance, "expect": arm.expect or "", "verdict": verdict}


def run_trials(trials: list[Trial], run_dir: RunDir | None,
               advance: Callable[[int], None] = lambda n: None,
               workers: Workers | None = None) -> list[dict[str, list[dict]]]:
    """Run every trial, in this process or in worker processes, and append each trial's
    rows to the run directory in trial order, as soon as every earlier trial is there: the
    files are the same bytes for any number of workers. Returns every trial's rows.

    When the run stops early (a stop signal, an error), the trials that finished are
    written too, even those after one that did not. Ranks other than 0 of a data-parallel
    run train alike and write nothing (run_dir None)."""
    workers = workers or Workers(1, 1, torch.get_num_threads())
    results: list[dict[str, list[dict]] | None] = [None] * len(trials)
    written = 0

    def write(rows: dict[str, list[dict]]) -> None:
        if run_dir is None:
            return
        with whole_write():  # a stop signal waits until the trial is on disk whole
            for table in schema.TABLES:
                run_dir.append(table, rows[table])

    def finished(position: int, rows: dict[str, list[dict]]) -> None:
        nonlocal written
        results[position] = rows
        while written < len(trials) and results[written] is not None:
            written += 1
            write(results[written - 1])

    try:
        if workers.processes == 1:
            cache: dict = {}
            for position, trial in enumerate(trials):
                with torch_threads(workers.threads_of(trial)):
                    rows = run_trial(trial, cache, advance)
                finished(position, rows)
        else:
            parallel.run(trials, run_trial, workers.processes, workers.threads_of, finished,
                         advance, workers.order)
    except BaseException:
        with contextlib.suppress(OSError):  # the disk may be why it stopped
            for rows in results[written:]:
                if rows is not None:
                    write(rows)
        raise
    return results
