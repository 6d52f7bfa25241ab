"""What `gradlab audit` costs over running the user's two loops bare.

    python benchmarks/audit_overhead.py [--steps 5 200] [--repeats 5] [--hooks-only]

Bare: the two calls an audit makes, train(8, 4, K) and train(32, 1, K) of
experiments/tutorial_loop.py, each as its own `python -c` process with no hooks,
one after the other (how a user runs a script twice) and side by side. Audit: the
whole `gradlab audit experiments.tutorial_loop:train -n 4 -k K` command, start-up
included. The runs alternate so that load from elsewhere hits both alike; the table
gives medians of wall-clock time and of CPU time (user + system of the processes).

--hooks-only leaves process start-up out: the two train() calls in this process, bare
and under the audit's hooks (the big-batch run leading, the accumulated one following
its weights), CPU time of this process, alternating.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRADLAB = Path(sys.executable).with_name("gradlab")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(commands: list[list[str]], parallel: bool) -> tuple[float, float]:
    """Wall and CPU seconds of running the commands, one after the other or side by side."""
    cpu, start = cpu_seconds(), time.perf_counter()
    if parallel:
        for process in [subprocess.Popen(c, cwd=REPO, stdout=subprocess.DEVNULL)
                        for c in commands]:
            assert process.wait() == 0
    else:
        for c in commands:
            subprocess.run(c, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, cpu_seconds() - cpu


def hooks_only(steps: list[int], repeats: int) -> None:
    sys.path.insert(0, str(REPO))
    from experiments.tutorial_loop import train
    from gradlab.auditing.result import COPY_LIMIT
    from gradlab.auditing.worker import Recorder

    train(8, 4, 2)  # torch's lazy imports happen once, in neither column
    print("| K steps | train() x 2 bare, CPU s | under the hooks, CPU s | ratio |  "
          f"({repeats} repeats, medians)")
    print("| ---: | ---: | ---: | ---: |")
    for k in steps:
        samples: dict[str, list[float]] = {"bare": [], "hooked": []}
        for _ in range(repeats):
            start = time.process_time()
            train(32, 1, k)
            train(8, 4, k)
            samples["bare"].append(time.process_time() - start)
            with tempfile.TemporaryDirectory(dir="/dev/shm") as shared:  # as audit does
                start = time.process_time()
                for (m, n), role in (((32, 1), "lead"), ((8, 4), "follow")):
                    recorder = Recorder(k, COPY_LIMIT, **{role: Path(shared)})
                    recorder.install()
                    try:
                        train(m, n, k)
                    finally:
                        recorder.uninstall()
                    (Path(shared) / "done").touch()
                samples["hooked"].append(time.process_time() - start)
        bare, hooked = (statistics.median(samples[key]) for key in ("bare", "hooked"))
        print(f"| {k} | {bare:.3f} | {hooked:.3f} | {hooked / bare:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 200])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hooks-only", action="store_true")
    args = parser.parse_args()
    if args.hooks_only:
        hooks_only(args.steps, args.repeats)
        return
    env_note = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    print(f"| K steps | bare, one after the other | bare, side by side | audit | "
          f"audit / bare one after the other | audit / bare side by side |  ({env_note}, "
          f"{args.repeats} repeats, medians; wall s (CPU s))")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as out:
        for k in args.steps:
            bare = [[sys.executable, "-c", f"from experiments.tutorial_loop import train; "
                                           f"train({m}, {n}, {k})"] for m, n in ((8, 4), (32, 1))]
            audit = [[str(GRADLAB), "audit", "experiments.tutorial_loop:train", "-n", "4",
                      "-k", str(k), "--out", out]]
            samples: dict[str, list[tuple[float, float]]] = {"seq": [], "par": [], "audit": []}
            for _ in range(args.repeats):
                samples["seq"].append(timed(bare, parallel=False))
                samples["par"].append(timed(bare, parallel=True))
                samples["audit"].append(timed(audit, parallel=False))
            med = {key: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
                   for key, v in samples.items()}
            cells = [f"{med[key][0]:.2f} ({med[key][1]:.2f})" for key in ("seq", "par", "audit")]
            ratios = [f"{med['audit'][0] / med[key][0]:.2f}x ({med['audit'][1] / med[key][1]:.2f}x)"
                      for key in ("seq", "par")]
            print(f"| {k} | {' | '.join(cells + ratios)} |", flush=True)


if __name__ == "__main__":
    main()
