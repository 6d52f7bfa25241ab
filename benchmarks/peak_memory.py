"""Peak memory of a run through your own setup: it must not grow with the number of steps.

Not a test: run it on an idle machine; --write puts its section into
benchmarks/RESULTS.md (machine named).

    python benchmarks/peak_memory.py --write                          # 50.4M parameters
    python benchmarks/peak_memory.py --width 5792 --steps 20 --write  # 100.9M parameters

Each row is one `gradlab run` in a fresh process (baseline B x 1 against an
accumulated (B/N) x N arm, probed every step, float32, CPU) through the user-setup
path (`setup = "bigsetup:make"`, a module written to a temporary folder), and the
peak resident set size of that process (getrusage ru_maxrss), against the model's
own size in bytes. The last column leaves out what the process holds before any
model is built (Python, torch and gradlab imported: the first line): what is left is
the run's, in copies of the model.

Where a trial's memory goes (2 arms): each arm's weights and gradients (4 copies); at a
probe, the exact gradient in float64 (2 copies) and the baseline's weights cast to
float64 in place (1 more), then, with the weights back in float32, one arm's gradient at
a time (1), compared with the exact one a chunk of 2^20 elements at a time; and the
activations. So 7 copies, and what Python and torch hold.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from results import machine, publish

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
# what a process holds before any model: Python, torch and gradlab imported
IMPORTED = "import resource, gradlab.cli; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=3, help="hidden WIDTH x WIDTH layers")
    parser.add_argument("--accum-steps", type=int, default=4)
    parser.add_argument("--steps", default="2,10,20")
    parser.add_argument("--write", action="store_true",
                        help="also replace this section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    params = 64 * args.width + args.width + args.depth * (args.width ** 2 + args.width) \
        + args.width + 1
    model_mb = 4 * params / 1e6
    gradlab = str(Path(sys.executable).with_name("gradlab"))
    started_on = machine()
    imported_mb = int(subprocess.run([sys.executable, "-c", IMPORTED], check=True,
                                     capture_output=True, text=True).stdout) * 1024 / 1e6
    rows = [f"| imported, no model | {imported_mb:.0f} | - | - |"]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "bigsetup.py").write_text(SETUP.format(width=args.width, depth=args.depth))
        spec = Path(folder, "peak-memory.toml")
        spec.write_text(SPEC.format(accum_steps=args.accum_steps))
        for steps in map(int, args.steps.split(",")):
            out = subprocess.run(
                [sys.executable, "-c", MEASURE, gradlab, "run", str(spec), "--set",
                 f"steps={steps}", "--out", str(Path(folder, "runs"))],
                check=True, capture_output=True, text=True).stdout
            peak_mb = int(out.strip().splitlines()[-1]) * 1024 / 1e6  # ru_maxrss is in KiB
            rows.append(f"| {steps} | {peak_mb:.0f} | {peak_mb / model_mb:.1f} | "
                        f"{(peak_mb - imported_mb) / model_mb:.1f} |")
    options = "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                      if k != "write" and v != parser.get_default(k))
    publish("\n".join([
        f"## Peak memory: a {params / 1e6:.1f}M-parameter mlp through gradlab", "",
        f"Machine: {started_on}.", "",
        f"Command: `python benchmarks/peak_memory.py{options} --write`: baseline B x 1 "
        f"against (B/N) x N, N = {args.accum_steps}, B = 16, float32, CPU, probed every step "
        f"against the exact float64 gradient; the model is {model_mb:.0f} MB.", "",
        "| steps | peak RSS MB | x model size | x model size, beyond the imports |",
        "| ---: | ---: | ---: | ---: |", *rows]) + "\n", args.write)


if __name__ == "__main__":
    main()
