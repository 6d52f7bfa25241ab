"""What accumulation costs and saves: time and peak memory per optimizer step vs micro-batch.

Not a test: run it by hand and copy the table into benchmarks/RESULTS.md with the
machine named.

    python benchmarks/step_cost.py                       # cnn on digits, CPU
    python benchmarks/step_cost.py --device cuda --dtype bfloat16 --batch-size 1024

Each row is one optimizer step of B examples split into N micro-batches, through
gradlab's own engine (gradlab.train.engine.train_step), timed over --repeats steps after
a warm-up. Peak memory is torch.cuda.max_memory_allocated on CUDA; on CPU it is
not measured (the process's RSS high-water mark says nothing about one step).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from gradlab.config.settings import Settings
from gradlab.lab import device, setups
from gradlab.train import engine, optim


def measure(settings: Settings, repeats: int) -> dict[str, float]:
    setup = setups.build_setup(settings, device.resolve_device(settings.device), {})
    optimizer = optim.make_optimizer(setup.model, settings)
    stream = setups.windows(setup, settings)
    cuda = setup.device.type == "cuda"

    def one_step() -> float:
        window = next(stream)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.train_step(setup.model, optimizer, window, settings, setup)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):  # warm-up: allocator, kernels, caches
        one_step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [one_step() for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return {"ms_per_step": 1e3 * statistics.median(times), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    base = Settings(model=args.model, dataset=args.dataset, channels=args.channels,
                    batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    print(f"{args.model} on {args.dataset}, B={args.batch_size}, {args.dtype}, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| N | micro-batch | ms / optimizer step | peak MiB |")
    print("| --- | --- | --- | --- |")
    n = 1
    while n <= args.batch_size and args.batch_size // n >= 1:
        row = measure(dataclasses.replace(base, accum_steps=n), args.repeats)
        print(f"| {n} | {args.batch_size // n} | {row['ms_per_step']:.2f} | "
              f"{row['peak_mib']:.1f} |")
        n *= 4


if __name__ == "__main__":
    main()
