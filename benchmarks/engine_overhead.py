"""What gradlab's engine costs: its step against a bare hand-written loop doing the same work.

Not a test: run it on an idle machine and paste its output into benchmarks/RESULTS.md
(it prints the whole section, machine named):

    python benchmarks/engine_overhead.py                 # mlp and cnn, B = 256, N = 1, 4, 16
    python benchmarks/engine_overhead.py --repeats 200   # tighter medians

Every row is one optimizer step of B examples in N micro-batches, three ways, each
on its own copy of the same model (same initial weights, same windows):

    bare        the loop a person writes: forward, loss / B, backward per micro-batch;
                step; zero_grad
    measured    the same loop, also recording what gradlab's step records in steps.csv:
                the window's loss and the gradient norm (torch.nn.utils.get_total_norm:
                the norm clip_grad_norm_ takes, without the clipping), one host sync
    gradlab     gradlab.train.engine.train_step with the default settings
    accelerate  Hugging Face Accelerate's `with accelerator.accumulate(model)` loop
                (the `bench` extra: pip install -e ".[bench]"); left out when not installed

The three are interleaved step by step in one process after a warm-up, so a change
in the machine's load hits them alike; each number is the median over --repeats
steps, and a ratio is that median over the bare loop's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gradlab.config.settings import Settings
from gradlab.lab import setups
from gradlab.train import engine, optim
from results import machine, publish

# mlp 64-256-256-10 and the built-in cnn (8 and 16 channels) on digits
MODELS = {
    "mlp": dict(model="mlp", dataset="digits", hidden=256, depth=2),
    "cnn": dict(model="cnn", dataset="digits"),
}


def bare_step(model, optimizer, window, n: int) -> None:
    x, y = window
    for xm, ym in zip(x.tensor_split(n), y.tensor_split(n), strict=True):
        loss = F.cross_entropy(model(xm), ym, reduction="sum") / len(x)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def measured_step(model, optimizer, window, n: int) -> tuple[float, float]:
    x, y = window
    params = [p for p in model.parameters() if p.requires_grad]
    window_loss = torch.zeros(())
    for xm, ym in zip(x.tensor_split(n), y.tensor_split(n), strict=True):
        loss = F.cross_entropy(model(xm), ym, reduction="sum")
        (loss / len(x)).backward()
        window_loss += loss.detach()
    grad_norm = total_norm([p.grad for p in params])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (window_loss / len(x)).item(), grad_norm.item()


def accelerate_step(accelerator, model, optimizer, window, n: int) -> None:
    x, y = window
    for xm, ym in zip(x.tensor_split(n), y.tensor_split(n), strict=True):
        with accelerator.accumulate(model):  # steps the optimizer on every N-th call
            loss = F.cross_entropy(model(xm), ym)  # Accelerate divides by N itself
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def contenders(s: Settings) -> dict[str, Callable[[tuple], None]]:
    """name -> one optimizer step on a window, each on its own copy of the model."""
    setup = setups.build_setup(s, torch.device(s.device), {})
    steps: dict[str, Callable[[tuple], None]] = {}
    bare_model = copy.deepcopy(setup.model)
    bare_opt = optim.make_optimizer(bare_model, s)
    steps["bare"] = lambda w: bare_step(bare_model, bare_opt, w, s.accum_steps)
    measured_model = copy.deepcopy(setup.model)
    measured_opt = optim.make_optimizer(measured_model, s)
    steps["measured"] = lambda w: measured_step(measured_model, measured_opt, w, s.accum_steps)
    opt = optim.make_optimizer(setup.model, s)
    steps["gradlab"] = lambda w: engine.train_step(setup.model, opt, w, s, setup)
    try:
        from accelerate import Accelerator
    except ImportError:
        return steps
    accelerator = Accelerator(cpu=s.device == "cpu", gradient_accumulation_steps=s.accum_steps)
    acc_model = copy.deepcopy(setup.model)
    acc_model, acc_opt = accelerator.prepare(acc_model, optim.make_optimizer(acc_model, s))
    steps["accelerate"] = lambda w: accelerate_step(accelerator, acc_model, acc_opt, w,
                                                    s.accum_steps)
    return steps


def measure(s: Settings, repeats: int, warmup: int, clock=time.perf_counter
            ) -> dict[str, float]:
    """Median seconds per optimizer step of each contender, interleaved step by step."""
    setup = setups.build_setup(s, torch.device(s.device), {})
    stream = setups.windows(setup, s)
    windows = [next(stream) for _ in range(8)]
    steps = contenders(s)
    cuda = s.device == "cuda"
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        window = windows[i % len(windows)]
        for name, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            step(window)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--accum-steps", default="1,4,16")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (gradlab's workers run with 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this thread's CPU time (steadier on a busy machine; "
                             "--threads 1 only)")
    parser.add_argument("--write", action="store_true",
                        help="also replace this section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import accelerate
        peer = f"accelerate {accelerate.__version__}"
    except ImportError:
        peer = "accelerate not installed (pip install -e \".[bench]\")"
    lines = ["## Engine overhead: gradlab's step against a bare loop", "",
             f"Machine: {machine()}; torch {torch.__version__}, "
             f"{torch.get_num_threads()} intra-op thread(s); {peer}.", ""]
    options = "".join(f" --{k} {v}" for k, v in (("repeats", args.repeats),
                                                 ("threads", args.threads),
                                                 ("clock", args.clock))
                      if v != parser.get_default(k))
    lines += [f"Command: `python benchmarks/engine_overhead.py{options} --write`; SGD, "
              f"float32, {args.device}, B = {args.batch_size}, median of {args.repeats} "
              f"interleaved steps after {args.warmup} of warm-up ({args.clock} clock).", "",
              "| model | N | micro-batch | bare ms/step | measured ms/step | gradlab ms/step "
              "| gradlab / bare | gradlab / measured | accelerate ms/step | accelerate / bare |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in args.models.split(","):
        for n in map(int, args.accum_steps.split(",")):
            s = Settings(**MODELS[name], batch_size=args.batch_size, accum_steps=n,
                         device=args.device, lr=0.01)
            t = measure(s, args.repeats, args.warmup,
                        time.thread_time if args.clock == "cpu" else time.perf_counter)
            acc = t.get("accelerate")
            acc_cells = f"{1e3 * acc:.3f} | {acc / t['bare']:.3f}" if acc else "- | -"
            lines.append(f"| {name} | {n} | {args.batch_size // n} | {1e3 * t['bare']:.3f} | "
                         f"{1e3 * t['measured']:.3f} | {1e3 * t['gradlab']:.3f} | "
                         f"{t['gradlab'] / t['bare']:.3f} | {t['gradlab'] / t['measured']:.3f} | "
                         f"{acc_cells} |")
    lines += ["", "The issue's target: gradlab at most 1.05 times the loop that does the same "
              "work. gradlab's step records the loss and the gradient norm in every step (one "
              "pass over .grad, one host sync), so `measured` is that loop; `bare` records "
              "nothing. update_norm is off, as in every experiment but zero-grad."]
    publish("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
