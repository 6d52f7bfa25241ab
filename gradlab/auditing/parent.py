"""The audit's parent: runs the two calls of the user's train() in lockstep, each in a fresh
worker process (gradlab.auditing.worker), compares what their optimizers received step by
step with the verdict rule every gradlab verdict uses, asks the diagnosis why when they
differ, and writes the run directory.

The big-batch run leads: after each optimizer step it leaves its weights where the
accumulated run, which follows, takes them after its own step; so both runs' gradients are
taken at the same weights at every step, and rounding cannot drift them apart.

The parent imports no torch: the workers hand it numpy arrays, and it starts them without
first spending the seconds torch takes to import.

With ``nproc_per_node = W > 1`` the accumulated run is W ranks that torch's launcher
(torchrun) starts, and the big batch one process under it with m·N·W examples a step:
every rank's record is read, the ranks must agree on what they stepped on, and rank 0's
is the one compared.
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradlab import entrypoints
from gradlab.auditing.diagnosis import diagnose
from gradlab.auditing.result import (
    CHUNK,
    COPY_LIMIT,
    LR_RTOL,
    PROJECTIONS,
    Arm,
    AuditResult,
    beat_of,
    locate_entrypoint,
    records_of,
    twins,
)
from gradlab.auditing.rundir import write_run
from gradlab.errors import GradlabError
from gradlab.record.verdict import UNIT_ROUNDOFF, Verdict, judge


def verdict_of(dtype: str, pieces: int, rel_err: float) -> tuple[Verdict, float]:
    """equivalent or differs, and the tolerance: gradlab's one verdict rule (record/verdict.py).

    A user's loop gives no float64 reference to measure the big batch's own rounding
    against, so the floor is 0 and the accumulated run is judged on its distance from
    its big-batch twin: (P - 1)·u + 32·u_acc, for a gradient summed from P = N pieces on
    one process, P = N·W over W ranks (each rank's N, then the ranks' reduction).
    """
    tolerance, verdict = judge(False, dtype, pieces, {"max_rel_grad_err": rel_err})
    return verdict, tolerance


# A loop that takes no optimizer step for this long (since it started, or since its last step)
# is stopped, with its twin: one that hangs, or never returns. Unless --timeout says how long,
# the limit follows the loops' pace: PACE_FACTOR times the slowest step seen so far in either,
# and never less than NO_STEP_SECONDS, which covers imports, data and a first step.
NO_STEP_SECONDS = 300.0
PACE_FACTOR = 10
# how often the parent reads the beat files, and how long a stopped worker gets before SIGKILL
WATCH_EVERY = 0.25
END_GRACE = 5.0


def audit(entrypoint: str | Callable, accum_steps: int, *,
          micro_batch_size: int = 8, steps: int = 5, out: str | Path = "results",
          copy_limit: int = COPY_LIMIT, parallel: bool = True, nproc_per_node: int = 1,
          timeout: float | None = None,
          say: Callable[[str], object] = lambda message: None) -> AuditResult:
    """Run train(m, N, K) and train(m*N, 1, K), compare them step by step, diagnose, and
    write the run directory. ``entrypoint``: 'pkg.module:function', or a module-level
    function (the workers import it by its name). ``nproc_per_node``: W > 1 runs
    train(m, N, K) on W ranks and the big batch train(m*N*W, 1, K) on one, both under
    torch's launcher. ``timeout``: seconds a loop may go without an optimizer step before
    both are stopped (None: from their pace, see NO_STEP_SECONDS; 0: no limit). ``say``:
    progress, one line at a time."""
    if callable(entrypoint):
        entrypoint = entrypoints.import_path_of(entrypoint)
    max_steps, out = steps, Path(out)  # K, as the worker calls it
    for value, flag, least in ((accum_steps, "--accum-steps", 2),
                               (micro_batch_size, "--micro-batch-size", 1),
                               (max_steps, "--steps", 1), (copy_limit, "--copy-limit", 0),
                               (nproc_per_node, "--nproc-per-node", 1)):
        if value < least:
            extra = " (N = 1 would compare the loop with itself)" if least == 2 else ""
            raise GradlabError(f"{flag} {value}: give an integer >= {least}{extra}")
    if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
        raise GradlabError(f"--timeout {timeout}: give the seconds a loop may go without an "
                           f"optimizer step (> 0), or 0 for no limit")
    locate_entrypoint(entrypoint)  # imports nothing: the user's module may be slow to import
    if nproc_per_node > 1 and not _has_distributed():
        raise GradlabError("--nproc-per-node needs torch.distributed, which this torch build "
                           "lacks; install a build with it (the PyPI wheels have it)")
    base, arm = twins(micro_batch_size, accum_steps, nproc_per_node)

    start = time.perf_counter()
    say(f"running {arm.call(max_steps)} and {base.call(max_steps)}, each in its own "
        f"process{'es' * (arm.ranks > 1)}")
    # memory-backed where there is one: the weights pass through it at every step
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="gradlab-audit-", dir=shm) as tmp:
        runs = [(base, "big-batch", "lead"), (arm, "accumulated", "follow")]
        captured = run_loops(entrypoint, runs, max_steps, copy_limit, Path(tmp), parallel,
                             timeout)
        result = examine(entrypoint, base, arm, max_steps, captured)
        result.copy_limit = copy_limit
        diagnosis = diagnose(result) if result.failed else None
        result.rechecked = bool(diagnosis and not diagnosis.certain)
        if result.rechecked:  # before blaming accumulation: does the loop repeat itself?
            say(f"they differ; running {base.call(max_steps)} again: is the loop deterministic?")
            again = run_loops(entrypoint, [(base, "again", "alone")], max_steps, copy_limit,
                              Path(tmp), parallel, timeout)
            check_deterministic(base, max_steps, captured["big-batch"], again["again"],
                                result.dtype)
    result.diagnosis = diagnosis.text if diagnosis else None
    result.seconds = {"audit": time.perf_counter() - start,
                      **{f"train {name}": c["seconds"] for name, c in captured.items()}}
    result.run_dir = write_run(result, out)
    return result


def _has_distributed() -> bool:
    import torch  # only here: torch's launcher needs torch.distributed

    return torch.distributed.is_available()


def load_record(path: Path) -> dict[str, Any]:
    """What a worker saved (gradlab.auditing.worker.worker): plain values and numpy arrays."""
    with path.open("rb") as f:
        return pickle.load(f)


def run_loops(entrypoint: str, runs: list[tuple[Arm, str, str]], max_steps: int,
              copy_limit: int, tmp: Path, parallel: bool,
              timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """Each (arm, label, role) in a fresh process; what its hooks saw, by label.

    role: 'lead' leaves its weights after every step in tmp/weights, 'follow' takes
    them after each of its own steps; the parent marks the leader done when it exits,
    so a follower never waits for a leader that failed or stopped early. Loops that stop
    stepping are ended (Watch), and no process outlives this call.
    """
    # the worker imports the user's module from where the parent could, and gradlab itself
    env = {**os.environ, "PYTHONPATH": entrypoints.subprocess_path()}
    shared = tmp / "weights"
    shared.mkdir(exist_ok=True)
    (shared / "done").unlink(missing_ok=True)
    started = []
    watch = Watch(timeout, max_steps)
    try:
        for arm, label, role in runs:
            out, log = tmp / f"{label}.pkl", tmp / f"{label}.log"
            # on ranks: torch's own launcher (torchrun), on this machine alone, one worker a rank
            launcher = ["-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={arm.ranks}"] if arm.ranks else []
            command = [sys.executable, *launcher, "-m", "gradlab.auditing.worker", entrypoint,
                       str(arm.micro_batch_size), str(arm.accum_steps), str(max_steps),
                       str(copy_limit), str(out), role, str(shared)]
            with log.open("wb") as sink:  # the loop's own prints: shown only if it dies
                process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                           env=env, stdin=subprocess.DEVNULL)
            started.append((arm, label, role, process, out, log))
            watch.add(arm.call(max_steps), process, [beat_of(r) for r in records_of(arm, out)])
            if not parallel:
                watch.wait([process])
                if role == "lead":
                    (shared / "done").touch()
        # while the loops start: what writing the run directory needs (pandas, half a second)
        import gradlab.record.store  # noqa: F401
        while any(process.poll() is None for *_, process, _, _ in started):
            if all(process.poll() is not None for _, _, role, process, _, _ in started
                   if role == "lead"):
                (shared / "done").touch()
            watch.check()
            time.sleep(0.01)
    finally:
        end(process for *_, process, _, _ in started)
    captured = {}
    for arm, label, _, process, out, log in started:
        records = read_records(arm, out, log, process.returncode, max_steps)
        captured[label] = records[0]
        if len(records) > 1:
            captured[label]["ranks"] = records
    return captured


class Watch:
    """When each loop last took an optimizer step (the beat files its workers rewrite at
    every step, beside their records), and the limit past which the audit ends them."""

    def __init__(self, timeout: float | None, max_steps: int):
        self.timeout, self.max_steps = timeout, max_steps
        self.loops: list[dict[str, Any]] = []
        self.slowest = 0.0  # the longest time between two steps of a loop, so far
        self.read_at = 0.0

    def add(self, call: str, process: subprocess.Popen, beats: list[Path]) -> None:
        self.loops.append({"call": call, "process": process, "beats": beats, "steps": 0,
                           "since": time.monotonic()})

    def limit(self) -> float:
        if self.timeout is not None:
            return self.timeout or math.inf
        return max(NO_STEP_SECONDS, PACE_FACTOR * self.slowest)

    def wait(self, processes: list[subprocess.Popen]) -> None:
        while any(p.poll() is None for p in processes):
            self.check()
            time.sleep(0.01)

    def check(self) -> None:
        """GradlabError when no running loop has stepped for longer than the limit."""
        now = time.monotonic()
        if now - self.read_at < WATCH_EVERY:
            return
        self.read_at = now
        running = [loop for loop in self.loops if loop["process"].poll() is None]
        for loop in running:
            steps = max(_steps_in(beat) for beat in loop["beats"])
            if steps > loop["steps"]:
                if loop["steps"]:  # the time to the first step holds imports and data
                    self.slowest = max(self.slowest, (now - loop["since"]) / (steps - loop[
                        "steps"]))
                loop["steps"], loop["since"] = steps, now
        if not running or now - max(loop["since"] for loop in running) <= self.limit():
            return
        waited = now - max(loop["since"] for loop in running)
        said = "; ".join(
            f"{loop['call']} {'is still running' if loop in running else 'ended'} after "
            f"{loop['steps']} of {self.max_steps} steps" for loop in self.loops)
        rule = (f"--timeout {self.timeout:g}" if self.timeout is not None else
                f"the limit: {PACE_FACTOR} x the slowest step so far, {NO_STEP_SECONDS:g} s at "
                f"least")
        raise GradlabError(f"stopped the audit: no optimizer step for {waited:.0f} s ({rule}); "
                           f"{said}. A loop that hangs, or does not return after max_steps "
                           f"steps, never ends; if a step takes longer, give --timeout "
                           f"SECONDS (0: no limit)")


def _steps_in(beat: Path) -> int:
    try:
        return int(beat.read_text() or 0)
    except (OSError, ValueError):  # not yet written, or being rewritten this moment
        return 0


def end(processes) -> None:
    """Every process still running ended: SIGTERM (torch's launcher passes it on to its ranks),
    then SIGKILL after END_GRACE seconds."""
    alive = [p for p in processes if p.poll() is None]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + END_GRACE
    for process in alive:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def read_records(arm: Arm, out: Path, log: Path, code: int, max_steps: int) -> list[dict]:
    """What the run's workers saved: one record, or one per rank (label.rankR.pkl); the first
    error any of them met, or which rank died without a record."""
    paths = records_of(arm, out)
    records = [load_record(p) if p.is_file() else None for p in paths]
    failed = [r for r, c in enumerate(records) if c is None or c["error"]]
    if failed:
        raise _failure(arm, records, failed, log.read_text(errors="replace"), code, max_steps)
    if len(records) > 1:
        counts = [len(c["steps"]) for c in records]
        if len(set(counts)) > 1:
            made = ", ".join(f"rank {r} made {n}" for r, n in enumerate(counts))
            raise GradlabError(f"the ranks of {arm.call(max_steps)} made different numbers of "
                               f"optimizer steps ({made}); every rank must step at the same "
                               f"micro-batches (give each rank as many: DistributedSampler "
                               f"with drop_last=True)")
    return records


def _failure(arm: Arm, records: list[dict | None], failed: list[int], log: str, code: int,
             max_steps: int) -> GradlabError:
    """Why the run has no result: the error its worker recorded, or that it died.

    When one rank fails, the others fail too: a collective that waits for it breaks (a lost
    peer), or the launcher stops them. So a rank's own error comes first, then a rank that
    died without a record (the launcher's first observed failure among them), and a lost
    peer only when nothing else is known."""
    own = [r for r in failed if records[r] is not None and not records[r].get("lost_peer")]
    dead = [r for r in failed if records[r] is None]
    # torch's launcher lists each failed rank's exit code; one it stopped has a signal's
    # (negative), one that died by itself its own
    codes = {int(rank): int(exit_code) for rank, exit_code in re.findall(
        r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", log)}
    dead.sort(key=lambda r: (codes.get(r, -1) < 0, r))
    rank = (own or dead or failed)[0]
    code = codes.get(rank, code)
    if records[rank] is not None:
        error = records[rank]["error"]
        return GradlabError(f"rank {rank}: {error}" if arm.ranks > 1 else error)
    if arm.ranks:
        alone = (f"torchrun --nproc-per-node {arm.ranks} with train({arm.micro_batch_size}, "
                 f"{arm.accum_steps}, {max_steps})")
        return GradlabError(f"rank {rank} of {arm.call(max_steps)} died without a result (exit "
                            f"code {code}); run the loop alone ({alone}) to see why")
    said = (log.strip().splitlines() or ["no output"])[-1].strip()
    return GradlabError(f"{arm.call(max_steps)} died without a result (exit code {code}: "
                        f"{said}); run it alone to see why")


def check_runs(captured: dict[str, dict], arms: dict[str, Arm], max_steps: int) -> None:
    """Both runs stepped, equally often, over parameters of the same names and shapes."""
    calls = {label: arms[label].call(max_steps) for label in arms}
    for label, c in captured.items():
        if not c["steps"]:
            raise GradlabError(f"{calls[label]} never called optimizer.step() (no torch.optim "
                               f"optimizer stepped); the audit compares what reaches step(), "
                               f"so train() must train with a torch.optim optimizer")
    counts = {label: len(c["steps"]) for label, c in captured.items()}
    if len(set(counts.values())) > 1 and any(s["optimizer"] for c in captured.values()
                                             for s in c["steps"]):
        raise GradlabError(f"train() steps several optimizers, at rates that depend on N: "
                           f"{_steps_per_optimizer(captured, calls)}; each optimizer must step "
                           f"once per window of N micro-batches (a loop stepping one per "
                           f"micro-batch does not accumulate for it)")
    if len(set(counts.values())) > 1:
        made = ", ".join(f"{calls[label]} made {n}" for label, n in counts.items())
        raise GradlabError(f"the two runs made different numbers of optimizer steps ({made}); "
                           f"train() must stop after max_steps = {max_steps} optimizer steps, "
                           f"counting optimizer.step() calls, not micro-batches")
    base, arm = captured["big-batch"], captured["accumulated"]
    for step, (b, a) in enumerate(zip(base["steps"], arm["steps"], strict=True), start=1):
        if b["names"] != a["names"]:
            only = sorted(set(b["names"]) ^ set(a["names"]))[:3] or b["names"][:3]
            raise GradlabError(f"at step {step} the two runs' optimizers hold different "
                               f"parameters (e.g. {', '.join(only)}); train() must build the "
                               f"same model and optimizer whatever the batch size")
        for name, sb, sa in zip(b["names"], b["shapes"], a["shapes"], strict=True):
            if sb != sa:
                raise GradlabError(f"parameter '{name}' has shape {list(sa)} in "
                                   f"{calls['accumulated']} but {list(sb)} in "
                                   f"{calls['big-batch']}; train() must build the same model "
                                   f"whatever the batch size")


def _steps_per_optimizer(captured: dict[str, dict], calls: dict[str, str]) -> str:
    """'optimizer 1 (over a, b) stepped 5 times in train(..) and 20 in train(..); ...'."""
    said = []
    for k in sorted({s["optimizer"] for c in captured.values() for s in c["steps"]}):
        mine = {label: [s for s in c["steps"] if s["optimizer"] == k]
                for label, c in captured.items()}
        names = next(s["names"] for steps in mine.values() for s in steps)
        over = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
        said.append(f"optimizer {k + 1} (over {over}) stepped " + " and ".join(
            f"{len(steps)} times in {calls[label]}" for label, steps in mine.items()))
    return "; ".join(said)


def dtype_of(capture: dict[str, Any]) -> str:
    """The least precise dtype among the gradients: the one that sets the rounding floor."""

    dtypes = set(capture["steps"][0]["dtypes"])
    unknown = sorted(d for d in dtypes if d not in UNIT_ROUNDOFF)
    if unknown:
        raise GradlabError(f"the gradients are {', '.join(unknown)}; gradlab judges "
                           f"{', '.join(UNIT_ROUNDOFF)} gradients")
    return max(dtypes, key=UNIT_ROUNDOFF.get)


def examine(entrypoint: str, base: Arm, arm: Arm, max_steps: int,
            captured: dict[str, dict]) -> AuditResult:
    """The two runs' records compared step by step (checked first: comparable at all?)."""
    check_runs(captured, {base.name: base, arm.name: arm}, max_steps)
    ref, own = captured["big-batch"], captured["accumulated"]
    dtype = dtype_of(ref)
    estimate = ref["sketch"] or own["sketch"]
    steps, params = [], []
    tables = gradient_tables(ref["steps"], own["steps"], estimate)
    spreads = rank_spreads(own, estimate)
    for step, (b, a, rows, spread) in enumerate(zip(ref["steps"], own["steps"], tables, spreads,
                                                    strict=True), start=1):
        overall = rows[-1]
        verdict, tolerance = verdict_of(dtype, arm.pieces, overall["rel_l2_err"])
        lr_diff = max(abs(x - y) / abs(y) if y else abs(x - y)
                      for x, y in zip(a["lrs"], b["lrs"], strict=False))
        settings = settings_differences(b["settings"], a["settings"])
        if lr_diff > LR_RTOL or len(a["lrs"]) != len(b["lrs"]) or settings or spread > tolerance:
            verdict = Verdict.DIFFERS
        steps.append({
            "trial": 0, "arm": arm.name, "step": step, "rel_grad_err": overall["rel_l2_err"],
            "max_abs_grad_err": overall["max_abs_err"], "cosine": overall["cosine"],
            "grad_norm_big_batch": overall["ref_norm"],
            "grad_norm_accumulated": overall["arm_norm"],
            "lr_big_batch": b["lrs"][0], "lr_accumulated": a["lrs"][0], "rel_lr_diff": lr_diff,
            "loss_big_batch": b["loss"], "loss_accumulated": a["loss"],
            "tolerance": tolerance, "verdict": verdict, "estimate": estimate,
            "settings_differ": "; ".join(settings), "rank_grad_spread": spread,
            "syncs_big_batch": b["syncs"], "syncs_accumulated": a["syncs"],
            "scale": overall["scale"], "scaler_updates_big_batch": b["scaler_updates"],
            "scaler_updates_accumulated": a["scaler_updates"]})
        params += [{"trial": 0, "arm": arm.name, "step": step, **r} for r in rows]
    if all(s["grad_norm_big_batch"] == 0 and s["grad_norm_accumulated"] == 0 for s in steps):
        raise GradlabError(f"neither {base.call(max_steps)} nor {arm.call(max_steps)} handed "
                           f"the optimizer a gradient at any of the {len(steps)} steps (every "
                           f".grad None or zero): there is nothing to compare; call "
                           f"loss.backward() before optimizer.step()")
    broken = next((s for s in steps if not math.isfinite(s["grad_norm_big_batch"])), None)
    if broken is not None:  # before any verdict: a NaN is neither equal nor deterministic
        raise GradlabError(f"{base.call(max_steps)} hands the optimizer a non-finite gradient "
                           f"from step {broken['step']} (|g| = {broken['grad_norm_big_batch']}, "
                           f"loss {broken['loss_big_batch']:.4g}): there is no big-batch "
                           f"gradient to compare with. Make the loop's loss finite there (the "
                           f"data, the learning rate), then audit again")
    for s in steps:  # the big batch's is finite: a non-finite accumulated one differs
        if not math.isfinite(s["grad_norm_accumulated"]):
            s["verdict"] = Verdict.DIFFERS
    result = AuditResult(entrypoint, base, arm, max_steps, dtype, estimate, steps, params, captured,
                   same_weights=own["forced"] == len(own["steps"]))
    differing = [s for s in steps if s["verdict"] != Verdict.EQUIVALENT]
    if differing:
        result.verdict, result.first_difference = Verdict.DIFFERS, differing[0]
    return result


def rank_spreads(capture: dict[str, Any], estimate: bool) -> list[float]:
    """For each step, how far the other ranks' gradients lie from rank 0's (the largest rel
    err): 0 when the ranks reduced them before the step, as data parallelism must; NaN on
    one process."""
    ranks = capture.get("ranks", [capture])
    if len(ranks) == 1:
        return [math.nan] * len(capture["steps"])
    spreads = [0.0] * len(capture["steps"])
    for other in ranks[1:]:
        if [s["names"] for s in other["steps"]] != [s["names"] for s in capture["steps"]]:
            return [math.inf] * len(spreads)
        tables = gradient_tables(capture["steps"], other["steps"], estimate)
        spreads = [max(s, rows[-1]["rel_l2_err"]) for s, rows in zip(spreads, tables,
                                                                      strict=True)]
    return spreads


def settings_differences(ref: list[dict], own: list[dict]) -> list[str]:
    """The optimizer settings (but lr) in which the accumulated run differs, one per line.

    The accumulated run steps at the big batch's weights, so a setting that changes the
    update and not the gradient (weight decay or momentum scaled with N) shows only here.
    """
    def same(a, b) -> bool:
        if isinstance(a, tuple) and isinstance(b, tuple):
            return len(a) == len(b) and all(map(same, a, b))
        if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
            return abs(a - b) <= LR_RTOL * abs(b) if b else a == b
        return a == b
    out = []
    for g, (b, a) in enumerate(zip(ref, own, strict=False)):
        for key in sorted(set(a) | set(b)):
            if not same(a.get(key), b.get(key)):
                where = f"group {g} " if len(ref) > 1 else ""
                out.append(f"{where}{key} {a.get(key)!r} (big batch: {b.get(key)!r})")
    return out


def gradient_tables(ref: list[dict], own: list[dict],
                    estimate: bool) -> list[list[dict[str, Any]]]:
    """For each step, per parameter and then '*' for all together: probe.compare_tensors's
    metrics, computed for runs of steps with the same parameters at once (a long audit
    would otherwise spend milliseconds a step on tiny tensor operations), or estimated."""
    if estimate:
        return [estimated_rows(b, a) for b, a in zip(ref, own, strict=True)]
    tables: list[list[dict[str, Any]]] = []
    start = 0
    while start < len(ref):
        layout = (ref[start]["names"], ref[start]["shapes"])
        most = max(1, CHUNK // max(1, ref[start]["grad"].size))  # bounds the temporaries
        end = start + 1
        while end < len(ref) and end - start < most and \
                (ref[end]["names"], ref[end]["shapes"]) == layout:
            end += 1
        tables += batched_rows(np.stack([s["grad"].astype(np.float64) for s in ref[start:end]]),
                               np.stack([s["grad"].astype(np.float64) for s in own[start:end]]),
                               *layout)
        start = end
    return tables


def batched_rows(ref: np.ndarray, arm: np.ndarray, names: list[str],
                 shapes: list[tuple]) -> list[list[dict[str, Any]]]:
    """probe.compare for each row of (steps x elements) matrices, per parameter and '*'."""
    sizes = [math.prod(shape) for shape in shapes]
    bounds = [0, *itertools.accumulate(sizes)]
    columns = [*zip(names, bounds, bounds[1:], strict=False), ("*", 0, bounds[-1])]
    metrics = {}
    for name, lo, hi in columns:
        r, a = ref[:, lo:hi], arm[:, lo:hi]
        d = a - r
        diff, ref_norm, arm_norm = (np.linalg.norm(x, axis=1) for x in (d, r, a))
        dot = (a * r).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):  # the zeros are chosen below
            rel = np.where(ref_norm > 0, diff / ref_norm, np.where(diff == 0, 0.0, math.inf))
            both = (ref_norm > 0) & (arm_norm > 0)
            # a zero gradient has no direction: the same only if both are zero (as probe.py)
            cosine = np.where(both, dot / (arm_norm * ref_norm),
                              np.where(arm_norm == ref_norm, 1.0, math.nan))
            # alpha: the accumulated gradient's component along the big batch's, in its units
            scale = np.where(ref_norm > 0, dot / ref_norm ** 2, math.nan)
        max_abs = np.abs(d).max(axis=1) if hi > lo else np.zeros(len(d))
        metrics[name] = zip(max_abs.tolist(), rel.tolist(), cosine.tolist(),
                            ref_norm.tolist(), arm_norm.tolist(), scale.tolist(), strict=True)
    keys = ("max_abs_err", "rel_l2_err", "cosine", "ref_norm", "arm_norm", "scale")
    by_step = zip(*(metrics[name] for name, _, _ in columns), strict=True)
    return [[{"param": name, **dict(zip(keys, values, strict=True))}
             for (name, _, _), values in zip(columns, step, strict=True)] for step in by_step]


def estimated_rows(ref: dict, own: dict) -> list[dict[str, Any]]:
    """Per parameter and '*', from the norms and projections of the two gradients."""
    rows = []
    for name, nb, na, pb, pa in zip(ref["names"], ref["norms"], own["norms"],
                                    ref["projections"], own["projections"], strict=True):
        rows.append({"param": name, **_estimated(pb, pa, nb, na)})
    rows.append({"param": "*", **_estimated(np.concatenate(ref["projections"]),
                                            np.concatenate(own["projections"]),
                                            math.hypot(*ref["norms"]), math.hypot(*own["norms"]))})
    return rows


def _estimated(ref_proj: np.ndarray, arm_proj: np.ndarray, ref_norm: float,
               arm_norm: float) -> dict[str, float]:
    """probe.compare's metrics from exact norms and the projections of the two gradients.

    Each parameter's PROJECTIONS projections estimate |g_arm - g_ref|^2 (their mean
    square difference) and the cosine (that of the projected vectors: exactly 1 when one
    gradient is a positive multiple of the other, as without the division by N).
    """
    diff2 = float(((arm_proj - ref_proj) ** 2).sum()) / PROJECTIONS
    rel = math.sqrt(diff2) / ref_norm if ref_norm else (0.0 if diff2 == 0 else math.inf)
    norms = float(np.linalg.norm(arm_proj) * np.linalg.norm(ref_proj))
    cosine = float(arm_proj @ ref_proj) / norms if norms else float(ref_norm == arm_norm)
    # E[(r.a)(r.b)] = a.b for the same r: alpha from the projections and the exact norm
    scale = float(arm_proj @ ref_proj) / PROJECTIONS / ref_norm ** 2 if ref_norm else math.nan
    return {"max_abs_err": math.nan, "rel_l2_err": rel, "cosine": cosine,
            "ref_norm": ref_norm, "arm_norm": arm_norm, "scale": scale}


def check_deterministic(base: Arm, max_steps: int, first: dict, again: dict, dtype: str) -> None:
    """The same call twice must give the same record, or no difference means anything."""
    call = base.call(max_steps)
    fix = ("seed everything inside train() (torch.manual_seed, the DataLoader's generator, "
           "random and numpy) and avoid nondeterministic kernels, then audit again")
    if len(first["steps"]) != len(again["steps"]):
        raise GradlabError(f"the loop is not deterministic: {call} made {len(first['steps'])} "
                           f"optimizer steps once and {len(again['steps'])} the next time; {fix}")
    estimate = first["sketch"] or again["sketch"]
    for step, (a, b) in enumerate(zip(again["steps"], first["steps"], strict=True), start=1):
        rel = gradient_tables([b], [a], estimate)[0][-1]["rel_l2_err"] \
            if a["names"] == b["names"] else math.inf
        verdict, tolerance = verdict_of(dtype, base.pieces, rel)
        if verdict != Verdict.EQUIVALENT or a["lrs"] != b["lrs"]:
            raise GradlabError(
                f"the loop is not deterministic: {call} run twice hands the optimizer "
                f"different gradients at step {step} (rel err {rel:.3g}, tolerance "
                f"{tolerance:.3g}), so the difference between the big batch and the "
                f"accumulated run says nothing about accumulation; {fix}")

