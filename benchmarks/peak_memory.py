"""Peak memory of a run through your own setup: it must not grow with the number of steps.

Not a test: run it by hand and copy the table into benchmarks/RESULTS.md with the
machine named.

    python benchmarks/peak_memory.py                   # a 50.4M-parameter mlp, N = 4
    python benchmarks/peak_memory.py --width 5792      # ~100M parameters

Each row is one `gradlab run` in a fresh process (baseline B x 1 against an
accumulated (B/N) x N arm, probed every step, float32, CPU) through the user-setup
path (`setup = "bigsetup:make"`, a module written to a temporary folder), and the
peak resident set size of that process (getrusage ru_maxrss), against the model's
own size in bytes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SETUP = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from gradlab.setup import Setup

    WIDTH, DEPTH = {width}, {depth}

    def summed_mse(model, batch):
        x, y = batch
        return F.mse_loss(model(x), y, reduction="sum"), len(x)

    def make(settings):
        layers = [torch.nn.Linear(64, WIDTH), torch.nn.ReLU()]
        for _ in range(DEPTH):
            layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, 1))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 64, generator=g)
        return Setup(model, (x, x[:, :1].clone()), summed_mse)
''')

SPEC = textwrap.dedent('''
    name = "peak-memory"
    [settings]
    setup = "bigsetup:make"
    batch_size = 16
    accum_steps = {accum_steps}
    lr = 0.0001
    [arms.big-batch]
    baseline = true
    accum_steps = 1
    [arms.accumulated]
    expect = "equivalent"
''')

# one gradlab run in a child of this child, so that ru_maxrss is that run's alone
MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
           "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN)"
           ".ru_maxrss)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=3, help="hidden WIDTH x WIDTH layers")
    parser.add_argument("--accum-steps", type=int, default=4)
    parser.add_argument("--steps", default="2,10,20")
    args = parser.parse_args()
    params = 64 * args.width + args.width + args.depth * (args.width ** 2 + args.width) \
        + args.width + 1
    model_mb = 4 * params / 1e6
    gradlab = str(Path(sys.executable).with_name("gradlab"))
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "bigsetup.py").write_text(SETUP.format(width=args.width, depth=args.depth))
        spec = Path(folder, "peak-memory.toml")
        spec.write_text(SPEC.format(accum_steps=args.accum_steps))
        print(f"{params / 1e6:.1f}M parameters ({model_mb:.0f} MB in float32), "
              f"N = {args.accum_steps}, B = 16")
        print("| steps | peak RSS MB | x model size |")
        print("| ---: | ---: | ---: |")
        for steps in map(int, args.steps.split(",")):
            out = subprocess.run(
                [sys.executable, "-c", MEASURE, gradlab, "run", str(spec), "--set",
                 f"steps={steps}", "--out", str(Path(folder, "runs"))],
                check=True, capture_output=True, text=True).stdout
            peak_mb = int(out.strip().splitlines()[-1]) * 1024 / 1e6  # ru_maxrss is in KiB
            print(f"| {steps} | {peak_mb:.0f} | {peak_mb / model_mb:.1f} |")


if __name__ == "__main__":
    main()
