"""What GradCache costs and saves: time and activation memory per optimizer step vs N.

Not a test: run it by hand and copy the table into the README (contrastive section)
with the machine named.

    OMP_NUM_THREADS=1 python benchmarks/contrastive_cost.py        # the contrastive setup, CPU
    python benchmarks/contrastive_cost.py --device cuda --repeats 50

Each row is one optimizer step of the `contrastive` experiment's setup (its
[settings]: the digit-views encoder, B = 64, float32) through gradlab's own engine
(gradlab.train.engine.train_step), timed over --repeats steps after a warm-up, the arms
taking turns step by step: the median wall-clock time and the median CPU time
(user + sys of this process, which a loaded machine inflates less), without
gradlab's saved-tensor meter. Activation bytes are the most bytes autograd held
saved for backward at once during a step, metered on the warm-up steps
(gradlab.train.memory.SavedTensors, the `saved_bytes` column of steps.csv):
deterministic, the same on every machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from gradlab.config.settings import Settings
from gradlab.config.spec import load_spec
from gradlab.lab import device, setups
from gradlab.train import engine, optim

ARMS = {"naive-accumulation": "plain", "gradcache": "gradcache"}  # and the big batch, N = 1


class Arm:
    """One arm's setup, optimizer and stream of windows, stepped on demand."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.setup = setups.build_setup(settings, device.resolve_device(settings.device), {})
        self.optimizer = optim.make_optimizer(self.setup.model, settings)
        self.stream = setups.windows(self.setup, settings)
        self.walls, self.cpus, self.saved = [], [], 0

    def step(self, metered: bool = False) -> None:
        """One step, timed; ``metered``: with gradlab's saved-tensor meter (not timed then)."""
        cuda = self.setup.device.type == "cuda"
        window = next(self.stream)
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        stats = engine.train_step(self.setup.model, self.optimizer, window, self.s, self.setup,
                                  measure_memory=metered)
        if cuda:
            torch.cuda.synchronize()
        if metered:
            self.saved = max(self.saved, stats.saved_bytes)
        else:
            self.walls.append(time.perf_counter() - wall)
            self.cpus.append(time.process_time() - cpu)

    def row(self) -> dict[str, float]:
        return {"ms": 1e3 * statistics.median(self.walls),
                "cpu_ms": 1e3 * statistics.median(self.cpus), "saved": self.saved,
                "negatives": engine.negatives(self.s, self.setup)}


def measure(arms: list[Arm], repeats: int) -> list[dict[str, float]]:
    """Every arm steps in turn, repeat after repeat: a machine whose load drifts slows them
    all alike, so their ratios hold better than their times."""
    for _ in range(3):  # warm-up (allocator, kernels, caches), metering the activations
        for arm in arms:
            arm.step(metered=True)
    for _ in range(repeats):
        for arm in arms:
            arm.step()
    return [arm.row() for arm in arms]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--n", default="1,2,4,8,16,32", help="the values of N")
    args = parser.parse_args()
    spec = load_spec("contrastive")
    base = Settings(**{**spec.settings, "device": args.device})
    print(f"contrastive's setup ({base.setup}, hidden {base.hidden}, depth {base.depth}), "
          f"B={base.batch_size}, {base.dtype}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| arm | N | micro-batch | negatives | ms / step | CPU ms / step | vs big batch "
          "| activation KiB | vs big batch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    runs = [("big-batch", dataclasses.replace(base, accum_steps=1))]
    runs += [(arm, dataclasses.replace(base, accum_steps=n, accumulation=accumulation))
             for n in (int(v) for v in args.n.split(",")) if n > 1
             for arm, accumulation in ARMS.items()]
    rows = measure([Arm(s) for _, s in runs], args.repeats)
    big = rows[0]
    for (arm, s), row in zip(runs, rows, strict=True):
        print(f"| {arm} | {s.accum_steps} | {s.micro_batch} | {row['negatives']:.0f} | "
              f"{row['ms']:.2f} | {row['cpu_ms']:.2f} | {row['cpu_ms'] / big['cpu_ms']:.2f}x "
              f"| {row['saved'] / 1024:.1f} | {row['saved'] / big['saved']:.3f} |")

if __name__ == "__main__":
    main()
