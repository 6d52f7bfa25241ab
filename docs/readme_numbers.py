"""Every number the README quotes, from fresh runs: run the experiments, rewrite the blocks.

    python docs/readme_numbers.py                   # run everything, print the blocks
    python docs/readme_numbers.py --write README.md docs/*.md   # ... and replace them there
    python docs/readme_numbers.py --runs DIR        # reuse the runs in DIR (no running)

The README and the pages under docs/ mark each generated block with HTML comments,

    <!-- numbers: NAME -->  ...  <!-- /numbers: NAME -->

and this script replaces what lies between them. A block that the README does not
mark is printed only. Times are wall-clock seconds of `gradlab run NAME` on this
machine, so run it on an idle one (the README says which). Needs pandas (installed
with gradlab).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ["toy", "equivalence", "zero-grad-toy", "zero-grad", "batch-lr", "norm",
               "norm-training", "tokens", "tokens-training", "precision", "clipping",
               "scheduler", "last-window", "dropout", "cost", "ddp", "ddp-tokens", "fsdp",
               "sit-out", "context-parallel", "contrastive", "contrastive-training"]
LOCAL = ["my_lm"]  # examples of your own setup, run from the repository root
# runs of a spec with other settings: name -> gradlab run arguments
VARIANTS = {"norm-low": ["norm", "--set", "dtype=bfloat16,float16", "--set", "steps=11"],
            # the mask-average check alone (it runs at step 1), for 16 to 1024 draws
            "dropout-draws": ["dropout", "--set", "mask_draws=16,64,256,1024", "--set",
                              "steps=1"],
            "cost-budget": ["cost", "--set", "budget_mb=10"],
            # four ranks (on a 2-core machine they share the cores: the same gradients)
            "ddp-tokens-4": ["ddp-tokens", "--set", "world_size=4"],
            "context-parallel-4": ["context-parallel", "--set", "world_size=4"],
            "fsdp-4": ["fsdp", "--set", "world_size=4"]}
# figures the README shows: docs/figures/FILE <- the standard figure of that run
FIGURES = {"equivalence-grad-error.png": "equivalence", "norm-grad-error.png": "norm",
           "norm-training-accuracy.png": "norm-training", "toy-trace.png": "toy",
           "tokens-grad-error.png": "tokens", "tokens-training-loss.png": "tokens-training",
           "contrastive-grad-error.png": "contrastive",
           "contrastive-training-held-out.png": "contrastive-training",
           "clipping-grad-error.png": "clipping", "scheduler-lr.png": "scheduler",
           "scheduler-loss.png": "scheduler", "cost-cost.png": "cost",
           "precision-precision.png": "precision",
           "ddp-tokens-grad-error.png": "ddp-tokens", "fsdp-grad-error.png": "fsdp",
           "sit-out-loss.png": "sit-out"}
# figures of a named metric: docs/figures/FILE <- (run, `gradlab plot` options, file it makes)
PLOTTED = {"last-window-grad-error.png": ("last-window", ["-y", "exact_err"],
                                          "last-window-exact_err-vs-step.png"),
           "dropout-grad-error.png": ("dropout", ["-y", "exact_err"],
                                      "dropout-exact_err-vs-step.png"),
           "context-parallel-grad-error.png": ("context-parallel", ["-y", "exact_err"],
                                               "context-parallel-exact_err-vs-step.png")}


def gradlab() -> list[str]:
    return [str(Path(sys.executable).with_name("gradlab"))]


def run(name: str, out: Path) -> tuple[Path, float, str]:
    """`gradlab run NAME` into out/NAME; (run directory, wall seconds, the table it printed)."""
    start = time.perf_counter()
    args = VARIANTS.get(name, [name])
    done = subprocess.run([*gradlab(), "run", *args, "--out", str(out / name)], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "100", "NO_COLOR": "1"})
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"gradlab run {name} failed ({done.returncode}):\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1]), seconds, done.stderr


def latest(out: Path, name: str) -> Path:
    return sorted(p for p in (out / name).iterdir() if p.is_dir())[-1]  # not the .txt files


def read(run_dir: Path, table: str) -> pd.DataFrame:
    return pd.read_csv(run_dir / f"{table}.csv")


def summary(run_dir: Path) -> pd.DataFrame:
    return read(run_dir, "summary")


def g(x: float, digits: int = 3) -> str:
    """A number as the README writes it."""
    if pd.isna(x):
        return "-"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.{digits - 1}e}"


def span(values) -> str:
    values = [v for v in values if not pd.isna(v)]
    low, high = g(min(values)), g(max(values))
    return low if low == high else f"{low} … {high}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- blocks

def block_toy_output(runs: dict, printed: dict) -> str:
    return "```text\n$ gradlab run toy\n" + printed["toy"].rstrip() + "\n" + \
        str(runs["toy"].relative_to(ROOT) if runs["toy"].is_relative_to(ROOT)
            else runs["toy"]) + "\n```"


TASKS = {("mlp", "none"): "mlp", ("cnn", "none"): "cnn, no norm", ("cnn", "gn"): "cnn, GroupNorm"}


def block_equivalence(runs: dict, printed: dict) -> str:
    s = summary(runs["equivalence"])
    rows = []
    for (model, norm), label in TASKS.items():
        for dtype in ("float32", "float64"):
            part = s[(s.model == model) & (s.norm == norm) & (s.dtype == dtype)
                     & (s.accum_steps > 1)]
            good = part[part.arm == "accumulated"]
            bad = part[part.arm == "no-loss-scaling"].sort_values("accum_steps")
            exact_n_minus_1 = all(abs(r.max_rel_grad_err - (r.accum_steps - 1)) < 1e-4
                                  for r in bad.itertuples())
            rows.append([label, dtype, span(good.exact_floor), span(good.max_exact_err),
                         span(good.rel_tolerance),
                         f"{g(good.max_exact_err.max() / good.rel_tolerance.min(), 2)}",
                         "N − 1: " + ", ".join(g(v) for v in bad.max_rel_grad_err)
                         if exact_n_minus_1 else span(bad.max_rel_grad_err)])
    return table(["model", "dtype", "floor (big batch vs exact)",
                  "accumulated: vs exact, N = 2..16", "tolerance", "worst err / tolerance",
                  "no-loss-scaling: rel grad err"], rows)


def block_equivalence_losses(runs: dict, printed: dict) -> str:
    s = summary(runs["equivalence"])
    good = s[s.arm == "accumulated"]
    by = good.groupby("dtype").max_rel_loss_diff.max()
    diverged = s[(s.arm == "no-loss-scaling") & s.diverged_at_step.notna()]
    where = ", ".join(sorted({f"{r.model} N = {r.accum_steps} ({r.dtype})"
                              for r in diverged.itertuples()}))
    return (f"Over the 20 steps the accumulated arm's losses stay within "
            f"{g(by.get('float32'))} (float32) and {g(by.get('float64'))} (float64), relative, "
            f"of the big batch's. Forgetting to scale diverges (non-finite loss) for: "
            f"{where or 'none'}.")


def block_zero_grad_toy(runs: dict, printed: dict) -> str:
    trace = read(runs["zero-grad-toy"], "trace")
    weights = read(runs["zero-grad-toy"], "weights")
    arms = ["every-step", "never", "after-backward"]
    rows = []
    for step in (1, 2, 3):
        cells = []
        for arm in arms:
            value = trace[(trace.arm == arm) & (trace.step == step)].grad.iloc[-1]
            cells.append(g(value, 6) + (", then wiped" if arm == "after-backward" else ""))
        rows.append([str(step), *cells])
    final = weights[weights.step == 3].set_index("arm").value
    rows.append(["w after step 3", *(g(final[a], 6) for a in arms)])
    return table(["step", "every-step (ordinary loop)", "never", "after-backward"], rows)


def block_zero_grad(runs: dict, printed: dict) -> str:
    run_dir = runs["zero-grad"]
    s = summary(run_dir).set_index("arm")
    steps = read(run_dir, "steps")
    never = steps[steps.arm == "never"].set_index("step").grad_norm
    base_norm = steps[steps.arm == "every-step"].grad_norm
    checks = read(run_dir, "checks")
    evals = read(run_dir, "eval").set_index(["arm", "step"])
    rising = int((never.diff() > 0).sum())
    lines = [
        f"- **every-step** (baseline): final training loss {g(s.loc['every-step', 'final_loss'])}, "
        f"held-out loss {g(s.loc['every-step', 'final_test_loss'])}, accuracy "
        f"{g(s.loc['every-step', 'final_test_accuracy'])}.",
        f"- **every-n**: gradient {g(s.loc['every-n', 'max_rel_grad_err'])} from the big "
        f"batch's (relative), losses within {g(s.loc['every-n', 'max_rel_loss_diff'])}, weights "
        f"{g(s.loc['every-n', 'final_weight_dist'])} apart after 60 steps.",
        f"- **every-step-n**: gradient error {g(s.loc['every-step-n', 'max_rel_grad_err'])} "
        f"(cosine {g(s.loc['every-step-n', 'min_grad_cosine'])} at worst); held-out accuracy "
        f"{g(s.loc['every-step-n', 'final_test_accuracy'])}.",
        f"- **never**: gradient norm {g(never[1])} at step 1, {g(never[10])} at step 10, "
        f"{g(never[30])} at step 30, {g(never[60])} at step 60, rising at {rising} of the 59 "
        f"steps (the baseline's stays between {g(base_norm.min())} and {g(base_norm.max())}); "
        f"held-out loss {g(evals.loc[('never', 10), 'test_loss'])} vs "
        f"{g(evals.loc[('every-step', 10), 'test_loss'])} after 640 examples; final training "
        f"loss {g(s.loc['never', 'final_loss'])}, held-out loss "
        f"{g(s.loc['never', 'final_test_loss'])}, accuracy "
        f"{g(s.loc['never', 'final_test_accuracy'])}, weights "
        f"{g(s.loc['never', 'final_weight_dist'])} from the baseline's. Held gradient = sum of "
        f"fresh gradients: worst relative error {g(checks.value.max())} (tolerance "
        f"{g(checks.tolerance.max())}).",
        f"- **after-backward**: gradient norm and update norm "
        f"{g(steps[steps.arm == 'after-backward'].update_norm.abs().max())} at every step; "
        f"held-out accuracy {g(s.loc['after-backward', 'final_test_accuracy'])}; the baseline "
        f"moves {g(s.loc['after-backward', 'final_weight_dist'])} away.",
        f"- **set-to-none-false**: distance from the baseline's weights "
        f"{g(steps[steps.arm == 'set-to-none-false'].weight_dist.abs().max())} at every step.",
    ]
    return "\n".join(lines)


def block_batch_lr(runs: dict, printed: dict) -> str:
    run_dir = runs["batch-lr"]
    s = summary(run_dir).set_index("arm")
    evals = read(run_dir, "eval")
    labels = {"big-batch": "big-batch, 64×1 at lr 0.5, 60 steps",
              "accumulated": "accumulated, 16×4 at lr 0.5, 60 steps",
              "small-batch": "small-batch, 16×1 at lr 0.5, 240 steps",
              "small-batch-lr-over-n": "small-batch-lr-over-n, 16×1 at lr 0.125, 240 steps"}
    rows = []
    for arm, label in labels.items():
        acc = evals[evals.arm == arm].set_index("examples").test_accuracy
        rows.append([label, " / ".join(g(acc[e]) for e in (640, 1920, 3840)),
                     g(s.loc[arm, "final_test_loss"]), g(s.loc[arm, "final_weight_dist"])])
    return table(["arm", "held-out acc after 640 / 1920 / 3840 examples", "final held-out loss",
                  "distance from B×1 at the end"], rows)


def norm_case(frame: pd.DataFrame) -> pd.Series:
    return frame.norm.where(frame.bn_mode == "train", frame.norm + " frozen")


def block_norm(runs: dict, printed: dict) -> str:
    s = summary(runs["norm"])
    s = s[s.arm == "accumulated"].assign(case=norm_case)
    rows = []
    for case in ("bn", "bn frozen", "gn", "ln", "in", "none"):
        for dtype in ("float32", "float64"):
            part = s[(s.case == case) & (s.dtype == dtype)].set_index("accum_steps")
            rows.append([case, dtype, *(g(part.loc[n, "max_exact_err"])
                                        for n in (1, 2, 4, 8, 16, 32))])
    return table(["norm", "dtype", *(f"N={n}" for n in (1, 2, 4, 8, 16, 32))], rows)


def bn_probes(runs: dict, table_name: str) -> pd.DataFrame:
    """A table of the norm run (probe or buffers) for BatchNorm with batch statistics."""
    s = summary(runs["norm"])
    rows = read(runs["norm"], table_name).merge(
        s[["trial", "arm", "norm", "bn_mode", "dtype", "accum_steps"]], on=["trial", "arm"])
    return rows[(rows.norm == "bn") & (rows.bn_mode == "train")]


NS = (1, 2, 4, 8, 16, 32)


def block_norm_bn(runs: dict, printed: dict) -> str:
    s = summary(runs["norm"])
    bn = s[(s.arm == "accumulated") & (s.norm == "bn") & (s.bn_mode == "train")]
    f32 = bn[bn.dtype == "float32"].set_index("accum_steps")
    f64 = bn[bn.dtype == "float64"].set_index("accum_steps")
    same = max(abs(f32.loc[n, "max_exact_err"] / f64.loc[n, "max_exact_err"] - 1)
               for n in NS[1:])
    others = s[(s.arm == "accumulated") & ~((s.norm == "bn") & (s.bn_mode == "train"))]
    worst = others.groupby("dtype").max_exact_err.max()
    return "\n".join([
        f"- **bn** is {g(100 * f64.loc[2, 'max_exact_err'], 2)} % off at N = 2 and "
        f"{g(100 * f64.loc[32, 'max_exact_err'], 2)} % at N = 32. float32 and float64 agree "
        f"to {g(100 * same, 1)} %, so it is not rounding: the loss is a different function. "
        f"The smallest cosine between the two gradients (float64) is "
        + ", ".join(g(f64.loc[n, "min_grad_cosine"], 4) for n in NS[1:]) + " for N = 2..32.",
        f"- **gn, ln, in, none and frozen bn** stay at rounding level for every N: at most "
        f"{g(worst['float32'])} in float32 and {g(worst['float64'])} in float64 from the exact "
        f"gradient. In eval mode BatchNorm is a fixed per-channel affine map, so the batch "
        f"statistics cause the whole BN error."])


def block_norm_bn_steps(runs: dict, printed: dict) -> str:
    probes = bn_probes(runs, "probe")
    probes = probes[(probes.param == "*") & (probes.dtype == "float64")]
    pivot = probes.pivot_table(index="step", columns="accum_steps", values="exact_err")
    rows = [[str(step), *(g(pivot.loc[step, n]) for n in NS)] for step in pivot.index]
    return table(["step", *(f"N={n}" for n in NS)], rows)


def block_norm_buffers(runs: dict, printed: dict) -> str:
    buffers = bn_probes(runs, "buffers")
    first = buffers[(buffers.step == 1) & (buffers.dtype == "float64")]
    pivot = first.pivot_table(index="buffer", columns="accum_steps", values="rel_l2_err")
    order = [b for b in pivot.index if b != "*"] + ["*"]
    rows = [[b if b != "*" else "* (all four)", *(g(pivot.loc[b, n]) for n in NS)]
            for b in order]
    expected = ", ".join(g((1 - 0.9**n) / 0.1 - 1) for n in NS[1:])
    return table(["buffer", *(f"N={n}" for n in NS)], rows) + (
        f"\n\nThe running means start at 0. After one step the big batch's mean has moved "
        f"0.1 of the way to the batch mean and the accumulated arm's 1 − 0.9^N of the way, so "
        f"their relative difference is (1 − 0.9^N)/0.1 − 1: {expected} for N = 2..32.")


def block_norm_buffers_steps(runs: dict, printed: dict) -> str:
    buffers = bn_probes(runs, "buffers")
    whole = buffers[(buffers.buffer == "*") & (buffers.dtype == "float64")]
    pivot = whole.pivot_table(index="step", columns="accum_steps", values="rel_l2_err")
    rows = [[str(step), *(g(pivot.loc[step, n]) for n in NS)] for step in pivot.index]
    return table(["step", *(f"N={n}" for n in NS)], rows)


def block_norm_eval(runs: dict, printed: dict) -> str:
    buffers = bn_probes(runs, "buffers")
    whole = buffers[(buffers.buffer == "*") & (buffers.dtype == "float64")]
    arm = whole.pivot_table(index="step", columns="accum_steps", values="test_accuracy")
    ref = whole.groupby("step").ref_test_accuracy.first()
    rows = [[str(step), g(ref[step]), *(g(arm.loc[step, n]) for n in NS)] for step in arm.index]
    gain = arm.sub(ref, axis=0)
    best_step = gain.max(axis=1).idxmax()
    return table(["step", "big-batch stats", *(f"N={n}" for n in NS)], rows) + (
        f"\n\nThe N-fold update changed eval accuracy by {g(100 * gain.min().min(), 2)} to "
        f"{g(100 * gain.max().max(), 2)} points, most at step {best_step}; at the last probe "
        f"by up to {g(100 * gain.iloc[-1].max(), 2)} points.")


def block_norm_training_prose(runs: dict, printed: dict) -> str:
    s = summary(runs["norm-training"])
    err = (1 - s.groupby(["norm", "micro_batch"]).final_test_accuracy.mean()) * 100
    std = s.groupby(["norm", "micro_batch"]).final_test_accuracy.std() * 100
    bn, gn = err["bn"], err["gn"]
    gn_flat = s[s.norm == "gn"].groupby("seed").final_test_accuracy.nunique().max() == 1
    return "\n".join([
        f"- **GroupNorm** errs {span(gn)} % over the five micro-batch sizes"
        + (", identically per seed: its accumulated gradient *is* the big-batch gradient, so "
           "every micro-batch size trains the same model." if gn_flat else "."),
        f"- **BatchNorm** errs {g(bn[32])} % at micro-batch 32 and {g(bn[2])} % at "
        f"micro-batch 2 (std over seeds {g(std['bn'][32])} and {g(std['bn'][2])} points); its "
        f"best size is {int(bn.idxmin())} ({g(bn.min())} %).",
        f"- BatchNorm {'is' if (bn < gn).all() else 'is not'} ahead of GroupNorm at every "
        f"size here."])


def block_norm_low(runs: dict, printed: dict) -> str:
    s = summary(runs["norm-low"])
    s = s[s.arm == "accumulated"].assign(case=norm_case)
    rows = []
    for case in ("bn", "bn frozen", "gn", "ln", "in", "none"):
        for dtype in ("bfloat16", "float16"):
            part = s[(s.case == case) & (s.dtype == dtype)].set_index("accum_steps")
            cells = [f"{g(part.loc[n, 'max_exact_err'])} / {g(part.loc[n, 'rel_tolerance'])}"
                     for n in (2, 8, 32)]
            rows.append([case, dtype, g(part.exact_floor.max()), *cells,
                         ", ".join(sorted(set(part.loc[[2, 4, 8, 16, 32], "verdict"])))])
    return table(["norm", "dtype", "floor", "N=2: vs exact / tolerance", "N=8", "N=32",
                  "verdict, N = 2..32"], rows)


def block_norm_training(runs: dict, printed: dict) -> str:
    s = summary(runs["norm-training"])
    rows = []
    for micro, part in sorted(s.groupby("micro_batch"), key=lambda kv: -kv[0]):
        cells = []
        for norm in ("bn", "gn"):
            acc = part[part.norm == norm].final_test_accuracy * 100
            cells.append(f"{acc.mean():.1f} ± {acc.std():.1f} %")
        rows.append([str(micro), str(int(part.accum_steps.iloc[0])), *cells])
    return table(["micro-batch", "N", "BatchNorm", "GroupNorm"], rows)


def block_tokens(runs: dict, printed: dict) -> str:
    s = summary(runs["tokens"])
    s = s[~s.baseline]
    rows = []
    for (low, dtype), part in s.groupby(["min_len", "dtype"], sort=False):
        lengths = "8..64 (varying)" if low < 64 else "64 (all equal)"
        for arm in ("global-tokens", "mean-of-means"):
            byn = part[part.arm == arm].set_index("accum_steps")
            rows.append([lengths, dtype, arm, *(g(byn.loc[n, "max_exact_err"])
                                                for n in (1, 2, 4, 8)),
                         ", ".join(sorted(set(byn.verdict)))])
    return table(["lengths", "dtype", "arm", "N=1", "N=2", "N=4", "N=8", "verdict"], rows)


def block_tokens_training(runs: dict, printed: dict) -> str:
    run_dir = runs["tokens-training"]
    s = summary(run_dir).set_index("arm")
    evals = read(run_dir, "eval").pivot(index="step", columns="arm", values="test_loss")
    last = evals.index.max()
    probes = read(run_dir, "probe")
    bug = probes[(probes.arm == "mean-of-means") & (probes.param == "*")]
    return (f"Over {last} steps the mean-of-means gradient is "
            f"{span(bug.rel_l2_err)} away from the big batch's (cosine down to "
            f"{g(bug.cosine.min(), 4)}); global-tokens stays within "
            f"{g(s.loc['global-tokens', 'max_rel_grad_err'])}. Held-out loss per token after "
            f"{last} steps: big batch {g(evals.loc[last, 'big-batch'], 5)}, global-tokens "
            f"{g(evals.loc[last, 'global-tokens'], 5)}, mean-of-means "
            f"{g(evals.loc[last, 'mean-of-means'], 5)}; next-token accuracy "
            f"{g(s.loc['big-batch', 'final_test_accuracy'])}, "
            f"{g(s.loc['global-tokens', 'final_test_accuracy'])}, "
            f"{g(s.loc['mean-of-means', 'final_test_accuracy'])}.")


def block_my_lm(runs: dict, printed: dict) -> str:
    s = summary(runs["my_lm"])
    rows = [[r.arm, str(r.accum_steps), g(r.max_rel_grad_err), g(r.max_exact_err),
             g(r.rel_tolerance), r.verdict] for r in s[~s.baseline].itertuples()]
    return table(["arm", "N", "rel grad err", "vs exact", "tolerance", "verdict"], rows)


def block_ddp(runs: dict, printed: dict) -> str:
    s = summary(runs["ddp"])
    rows = [[r.dtype, r.arm, str(r.world_size), str(r.accum_steps), str(r.micro_batch),
             g(r.max_rel_grad_err), g(r.max_exact_err), g(r.rel_tolerance), r.verdict,
             g(r.allreduces_per_step), g(r.allreduce_bytes_per_step / 1024),
             g(r.step_seconds * 1000)] for r in s.itertuples()]
    return table(["dtype", "arm", "W", "N", "m", "rel grad err", "vs exact", "tolerance",
                  "verdict", "all-reduces / step", "KiB / step", "ms / step"], rows)


def block_ddp_findings(runs: dict, printed: dict) -> str:
    s = summary(runs["ddp"]).set_index(["dtype", "arm"])
    right = ["no-sync", "sync-every-micro-batch"]
    synced = s[s.index.get_level_values("arm").isin(right)]
    never = s.xs("never-synced", level="arm")
    n = int(s.loc[("float64", "no-sync"), "accum_steps"])
    ranks = int(s.loc[("float64", "no-sync"), "world_size"])

    def errors(dtype: str) -> str:
        return " and ".join(g(s.loc[(dtype, arm), "max_rel_grad_err"]) for arm in right)

    def per_step(arm: str, column: str) -> str:
        return span(s.xs(arm, level="arm")[column])

    def ms(arm: str) -> str:  # the median over dtypes of each trial's median step
        return g(s.xs(arm, level="arm").step_seconds.median() * 1000)

    return "\n".join([
        f"- **The window's gradient is the big batch's.** With `no-sync` and with "
        f"`sync-every-micro-batch`, the gradient after the window is the single-process big "
        f"batch's to {errors('float64')} relative in float64 and {errors('float32')} in "
        f"float32, at every probed step; their losses stay within "
        f"{g(synced.max_rel_loss_diff.max())} of the big batch's, relative.",
        f"- **Syncing once is enough.** `no-sync` all-reduced "
        f"{per_step('no-sync', 'allreduces_per_step')} time per optimizer step and "
        f"`sync-every-micro-batch` {per_step('sync-every-micro-batch', 'allreduces_per_step')} "
        f"times (N = {n}), for the same gradient; a step took {ms('no-sync')} ms against "
        f"{ms('sync-every-micro-batch')} ms on rank 0 ({ms('never-synced')} ms never "
        f"syncing, {ms('big-batch')} ms for the big batch in one process).",
        f"- **Never syncing is wrong.** `never-synced` steps on rank 0's own slice, 1/{ranks} "
        f"of the window: its gradient is {span(never.max_rel_grad_err)} away from the big "
        f"batch's (cosine {g(never.min_grad_cosine.min(), 2)}), in float32 and float64 alike.",
    ])


DDP_TOKENS_ARMS = ("global-tokens", "rank-tokens", "global-tokens-by-length",
                   "rank-tokens-by-length", "mean-of-means")


def rank_token_skew(arm_name: str, min_len: int, experiment: str = "ddp-tokens") -> float:
    """The mean over the run's windows of (most tokens on a rank) / (fewest), replayed from the
    experiment's spec with gradlab's own window stream, order and split (the run's windows)."""
    import torch

    from gradlab.config import spec as specs
    from gradlab.lab import setups
    from gradlab.train import engine

    trials = specs.expand(specs.load_spec(experiment))
    s = next(a.settings for t in trials for a in t.arms
             if a.name == arm_name and a.settings.min_len == min_len)
    setup = setups.build_setup(s, torch.device("cpu"), {})
    windows, ratios = setups.windows(setup, s), []
    for _ in range(s.steps):
        window = next(windows)
        shares = [int(engine.plan_window(window, s, setup, rank, s.world_size)
                      .micro_batches[0].rank_units) for rank in range(s.world_size)]
        ratios.append(max(shares) / min(shares))
    return sum(ratios) / len(ratios)


def block_ddp_tokens_skew(runs: dict, printed: dict) -> str:
    s = summary(runs["ddp-tokens"])
    s = s[~s.baseline]
    rows = []
    for low, part in s.groupby("min_len", sort=False):
        high = int(part.max_len.iloc[0])
        for arm, order in (("rank-tokens", "as drawn"), ("rank-tokens-by-length", "by length")):
            mine = part[part.arm == arm]
            rows.append([f"{low}..{high}", order, g(rank_token_skew(arm, low)),
                         g(mine.max_exact_err.max())])
    return table(["lengths", "window order", "tokens on the fuller rank / the emptier "
                  "(mean over windows)", "`rank-tokens` vs exact"], rows)


def block_ddp_tokens(runs: dict, printed: dict) -> str:
    s = summary(runs["ddp-tokens"])
    s = s[~s.baseline]
    rows = []
    for low, part in s.groupby("min_len", sort=False):
        high = int(part.max_len.iloc[0])
        lengths = f"{low}..{high}" if low < high else f"{high} (all equal)"
        for arm in DDP_TOKENS_ARMS:
            byn = part[part.arm == arm].set_index("accum_steps")
            rows.append([lengths, arm, *(g(byn.loc[n, "max_exact_err"]) for n in byn.index),
                         g(byn.min_grad_cosine.min(), 6), ", ".join(sorted(set(byn.verdict)))])
    ns = sorted(s.accum_steps.unique())
    return table(["lengths", "arm", *(f"N={n}" for n in ns), "min cosine", "verdict"], rows)


def block_ddp_tokens_findings(runs: dict, printed: dict) -> str:
    s = summary(runs["ddp-tokens"])
    s = s[~s.baseline]
    ranks = int(s.world_size.max())

    def worst(arm: str, low=None) -> str:
        part = s[(s.arm == arm) & ((s.min_len == low) if low is not None else True)]
        return g(part.max_exact_err.max())

    lows = sorted(s.min_len.unique())
    spread = ", ".join(f"{worst('rank-tokens', low)} at lengths {low}..{int(s.max_len.max())}"
                       for low in lows)
    return "\n".join([
        f"- **Only every rank's token count is the big batch.** `global-tokens` is within "
        f"{worst('global-tokens')} of the exact gradient (float64, W = {ranks}) at every "
        f"spread of lengths and N.",
        f"- **Each rank's own count is the bug, and it grows with the spread**: `rank-tokens` "
        f"is {spread}; it does not change with N (what differs is how the tokens fell across "
        f"the ranks, not across the micro-batches), while `mean-of-means` adds the "
        f"single-process bug and grows with N ({worst('mean-of-means', lows[0])} at the "
        f"widest spread).",
    ])


FSDP_ARMS = ("sync-last", "sync-every-micro-batch", "divided-by-global-batch",
             "keep-last-micro-batch", "ddp-no-sync")


def probe_alpha(run_dir: Path) -> pd.Series:
    """α = <g, g_ref> / |g_ref|² of every probe (the whole gradient), by trial and arm:
    what the arm's gradient is, as a multiple of the big batch's."""
    probe = read(run_dir, "probe").query("param == '*'")
    return (probe.cosine * probe.arm_norm / probe.ref_norm).groupby(
        [probe.trial, probe.arm]).agg(["min", "max"])


def block_fsdp(runs: dict, printed: dict) -> str:
    s = summary(runs["fsdp"])
    alpha = probe_alpha(runs["fsdp"])
    s = s[~s.baseline]
    ns = sorted(s.accum_steps.unique())
    rows = []
    for model in s.model.unique():
        for arm in FSDP_ARMS:
            part = s[(s.model == model) & (s.arm == arm)].set_index("accum_steps")
            a = alpha.loc[[(t, arm) for t in part.trial]]
            reductions = "allreduces_per_step" if arm.startswith("ddp") \
                else "reduce_scatters_per_step"
            kind = "all-reduce" if arm.startswith("ddp") else "reduce-scatter"
            rows.append([model, f"`{arm}`", *(g(part.loc[n, "max_exact_err"]) for n in ns),
                         span([a["min"].min(), a["max"].max()]),
                         " / ".join(f"{g(part.loc[n, reductions])}" for n in ns) + f" {kind}",
                         g(part.rank_state_bytes.max() / 1024),
                         ", ".join(sorted(set(part.verdict)))])
    return table(["model", "arm", *(f"vs exact N={n}" for n in ns), "α", "reductions / step "
                  f"(N={' / '.join(map(str, ns))})", "KiB state / rank", "verdict"], rows)


def block_fsdp_findings(runs: dict, printed: dict) -> str:
    s = summary(runs["fsdp"])
    alpha = probe_alpha(runs["fsdp"])
    base = s[s.baseline]
    s = s[~s.baseline]
    ranks = int(s.world_size.max())

    def arm(name: str) -> pd.DataFrame:
        return s[s.arm == name]

    def alphas(name: str) -> str:
        a = alpha.xs(name, level="arm")
        return span([a["min"].min(), a["max"].max()])

    shares = (arm("sync-last").set_index("trial").rank_state_bytes
              / arm("ddp-no-sync").set_index("trial").rank_state_bytes)
    whole = g(base.rank_state_bytes.max() / 1024)
    every, halved = arm("sync-every-micro-batch"), arm("divided-by-global-batch")
    synced = pd.concat([arm("sync-last"), every])
    return "\n".join([
        f"- **Sync on the last micro-batch is the big batch.** `sync-last` and "
        f"`sync-every-micro-batch` are within {g(synced.max_exact_err.max())} of the exact "
        f"gradient (float64, W = {ranks}) on both models at every N, as DDP's "
        f"`no_sync()` is ({g(arm('ddp-no-sync').max_exact_err.max())}); `sync-last` "
        f"reduce-scattered {span(arm('sync-last').reduce_scatters_per_step)} time per step and "
        f"`sync-every-micro-batch` N times "
        f"({', '.join(g(v) for v in sorted(every.reduce_scatters_per_step.unique()))}).",
        f"- **Dividing by the global batch halves the gradient.** `divided-by-global-batch` "
        f"points the right way (cosine {g(halved.min_grad_cosine.min(), 6)}) "
        f"at α = {alphas('divided-by-global-batch')} of the big batch's, 1/W with W = {ranks}: "
        f"FSDP's reduce-scatter takes the mean over the ranks, as DDP's all-reduce does.",
        f"- **Overwriting the shard keeps the last micro-batch only.** "
        f"`keep-last-micro-batch` is {span(arm('keep-last-micro-batch').max_exact_err)} "
        f"from the exact gradient (cosine down to "
        f"{g(arm('keep-last-micro-batch').min_grad_cosine.min(), 2)}, α = "
        f"{alphas('keep-last-micro-batch')}).",
        f"- **What a rank holds.** Parameters, gradient and optimizer state on one rank: "
        f"{span(arm('sync-last').rank_state_bytes / 1024)} KiB sharded against "
        f"{span(arm('ddp-no-sync').rank_state_bytes / 1024)} KiB for DDP's replica "
        f"({span(shares)} of it; one process holds {whole} KiB at most).",
    ])


def sit_out_counts(arm_name: str = "find-unused") -> dict[str, int]:
    """How often the rare task's head sat out, replayed from the spec with gradlab's own window
    stream and plan (the windows and micro-batches the run's arms took): micro-batches of
    any rank without the rare task, and windows where it was used under no_sync() but absent
    from every rank's synced last micro-batch."""
    import torch

    from gradlab.config import spec as specs
    from gradlab.lab import setups
    from gradlab.train import engine

    trial = specs.expand(specs.load_spec("sit-out"))[0]
    s = next(a for a in trial.arms if a.name == arm_name).settings
    setup = setups.build_setup(s, torch.device("cpu"), {})
    windows = setups.windows(setup, s)
    counts = {"micro_batches": 0, "sat_out": 0, "windows": s.steps, "bug_windows": 0}
    for _ in range(s.steps):
        window = next(windows)
        last_absent, used_before = [], False
        for rank in range(s.world_size):
            for mb in engine.plan_window(window, s, setup, rank, s.world_size).micro_batches:
                absent = not bool((mb.examples[0][:, -1] == 1).any())
                counts["micro_batches"] += 1
                counts["sat_out"] += absent
                if mb.last:
                    last_absent.append(absent)
                else:
                    used_before |= not absent
        # pytorch #69031's case: used under no_sync(), unused on every rank when it syncs
        counts["bug_windows"] += all(last_absent) and used_before
    return counts


def block_context_parallel(runs: dict, printed: dict) -> str:
    s = summary(runs["context-parallel"])
    alpha = probe_alpha(runs["context-parallel"])
    s = s[~s.baseline]
    rows = []
    for low, part in s.groupby("min_len", sort=False):
        high = int(part.max_len.iloc[0])
        skew = g(rank_token_skew("global-tokens", low, "context-parallel"))
        for _, row in part.iterrows():
            a = alpha.loc[(row.trial, row.arm)]
            rows.append([f"{low}..{high}", f"`{row.arm}`", skew, g(row.max_exact_err),
                         span([a["min"], a["max"]]), g(row.min_grad_cosine, 6), row.verdict])
    return table(["lengths", "arm", "shard tokens, fuller / emptier", "vs exact", "α",
                  "min cosine", "verdict"], rows)


# per experiment, the arms whose numbers change with W (the fix, and the bugs that scale)
FOUR_RANKS_ARMS = {"ddp-tokens": ("global-tokens", "rank-tokens", "rank-tokens-by-length"),
                   "context-parallel": ("global-tokens", "shard-tokens", "global-tokens-no-w"),
                   "fsdp": ("sync-last", "divided-by-global-batch", "keep-last-micro-batch")}


def block_four_ranks(runs: dict, printed: dict) -> str:
    """W = 2 beside W = 4: each arm's largest distance from the exact gradient over the trials,
    and the span of α over every probe."""
    rows = []
    for experiment, arms in FOUR_RANKS_ARMS.items():
        by_w = {}
        for w, name in ((2, experiment), (4, f"{experiment}-4")):
            s = summary(runs[name])
            by_w[w] = (s[~s.baseline].groupby("arm").max_exact_err.max(),
                       probe_alpha(runs[name]).groupby(level="arm").agg(
                           {"min": "min", "max": "max"}))
        for arm in arms:
            cells = []
            for w in (2, 4):
                err, alpha = by_w[w]
                cells += [g(err[arm]), span([alpha.loc[arm, "min"], alpha.loc[arm, "max"]])]
            rows.append([experiment, f"`{arm}`", *cells])
    return table(["experiment", "arm", "vs exact W=2", "α W=2", "vs exact W=4", "α W=4"], rows)


SIT_OUT_ARMS = ("find-unused", "find-unused-every-micro-batch", "never-synced")


def block_sit_out(runs: dict, printed: dict) -> str:
    s = summary(runs["sit-out"]).set_index("arm")
    probe = read(runs["sit-out"], "probe")
    rows = []
    for arm in SIT_OUT_ARMS:
        mine = probe[probe.arm == arm]
        head = mine[mine.param.str.startswith("heads.1.")].exact_err.max()
        rows.append([f"`{arm}`", g(s.loc[arm, "max_exact_err"]), g(head),
                     g(s.loc[arm, "rank_drift"]), g(s.loc[arm, "allreduces_per_step"]),
                     s.loc[arm, "verdict"]])
    return table(["arm", "vs exact", "rare head vs exact", "drift across ranks",
                  "all-reduces / step", "verdict"], rows)


def block_sit_out_findings(runs: dict, printed: dict) -> str:
    s = summary(runs["sit-out"]).set_index("arm")
    c = sit_out_counts()
    steps = int(read(runs["sit-out"], "steps").step.max())
    every = s.loc["find-unused-every-micro-batch", "rank_drift"]
    return "\n".join([
        f"- **How often the head sat out.** The rare task's head got no gradient in "
        f"{c['sat_out']} of the {c['micro_batches']} micro-batches (all ranks, "
        f"{c['windows']} windows); in {c['bug_windows']} of the {c['windows']} windows it was "
        f"used under `no_sync()` and absent from every rank's synced last micro-batch, the "
        f"case pytorch #69031 reported (its gradient never all-reduced before PR #124193).",
        f"- **This torch syncs what sat out.** With `find_unused_parameters=True`, `no_sync()` "
        f"is within {g(s.loc['find-unused', 'max_exact_err'])} of the exact gradient and "
        f"the ranks' weights are {g(s.loc['find-unused', 'rank_drift'])} apart after "
        f"{steps} steps (syncing every micro-batch: {g(every)}).",
        f"- **The control drifts.** `never-synced` ends {g(s.loc['never-synced', 'rank_drift'])} "
        f"apart (largest |θ_rank1 − θ_rank0|), its gradient "
        f"{g(s.loc['never-synced', 'max_exact_err'])} from the exact one.",
    ])


PRECISION_ARMS = ["float32", "bf16-native", "bf16-fp32-buffer", "autocast-bf16", "fp16-native",
                  "fp16-fp32-buffer", "autocast-fp16-scaler", "clip-before-unscale"]


def block_precision(runs: dict, printed: dict) -> str:
    """Per model and arm: the distance from the exact gradient against N, then the rise over
    N = 1 beside the bound (N - 1) u ‖Σ|g_i|‖/‖g‖."""
    s = summary(runs["precision"])
    s = s[~s.baseline]
    ns = sorted(s.accum_steps.unique())
    errors, rises = [], []
    for model in s.model.unique():
        for arm in PRECISION_ARMS:
            part = s[(s.model == model) & (s.arm == arm)].set_index("accum_steps")
            if part.empty:
                continue
            first = part.iloc[0]
            verdicts = ", ".join(sorted(set(part.verdict)))
            errors.append([model, f"`{arm}`", first.precision, g(first.exact_floor, 2),
                           *(g(part.loc[n, "max_exact_err"], 2) for n in ns), verdicts])
            rises.append([model, f"`{arm}`", *(f"{g(part.loc[n, 'accum_rise'], 2)} / "
                                                f"{g(part.loc[n, 'accum_bound'], 2)}"
                                                for n in ns if n > 1)])
    condition = s.groupby(["model", "accum_steps"]).max_sum_condition.max()
    conditions = "; ".join(
        f"{model}: " + ", ".join(f"{g(condition[(model, n)], 3)} at N = {n}" for n in ns
                                 if n > 1) for model in s.model.unique())
    skipped = int(s.skipped_steps.fillna(0).sum())
    steps = read(runs["precision"], "steps")
    scaled = steps[steps.arm == "autocast-fp16-scaler"].grad_norm.max()
    meta = json.loads((runs["precision"] / "run.json").read_text())
    clip = meta["trials"][0]["arms"]["autocast-fp16-scaler"]["settings"]["clip_norm"]
    return "\n".join([
        "Distance from the exact gradient (the big batch's, in float64, at the same weights "
        "on the same window), worst over the probes; floor: one big batch computed in the "
        "arm's precision:",
        "",
        table(["model", "arm", "computed in", "floor", *(f"N={n}" for n in ns), "verdict"],
              errors),
        "",
        "Rise over N = 1 (vs exact − floor, the share accumulating adds) / the bound "
        "(N − 1)·u·‖Σ|g_i|‖/‖g‖ for the arm's u:",
        "",
        table(["model", "arm", *(f"N={n}" for n in ns if n > 1)], rises),
        "",
        f"‖Σ|g_i|‖/‖g‖, the condition of the sum of the N partial gradients: {conditions}. "
        f"GradScaler steps skipped in the whole run: {skipped}. The largest gradient norm an "
        f"`autocast-fp16-scaler` step applied: {g(scaled)} (its clip_norm: {g(clip)}).",
    ])


def block_margins(runs: dict, printed: dict) -> str:
    """How far every verdict is from its tolerance, per experiment and dtype."""
    rows = []
    for name, run_dir in runs.items():
        s = summary(run_dir)
        judged = s[~s.baseline & s.max_exact_err.notna() & s.rel_tolerance.notna()]
        for dtype, part in judged.groupby("dtype", sort=False):
            ratio = part.max_exact_err / part.rel_tolerance
            good = ratio[part.verdict == "equivalent"]
            # an arm that differs by its learning rate alone has a gradient that agrees
            lr_only = part.get("max_rel_lr_diff", pd.Series(0, index=part.index)).fillna(0) > 0
            bad = ratio[(part.verdict == "differs") & ~lr_only]
            rows.append([name, dtype, str(len(good)), g(good.max()) if len(good) else "-",
                         str(len(bad)), g(bad.min()) if len(bad) else "-"])
    return table(["experiment", "dtype", "equivalent arms", "largest err / tolerance",
                  "differing arms", "smallest err / tolerance"], rows)


def contrastive_arms(run_dir: Path, dtype: str) -> pd.DataFrame:
    """summary.csv of a contrastive run in one dtype, indexed by (arm, N of the trial)."""
    s = summary(run_dir)
    s = s.assign(N=s.trial.map(s.groupby("trial").accum_steps.max()))
    return s[s.dtype == dtype].set_index(["arm", "N"])


def block_contrastive(runs: dict, printed: dict) -> str:
    ns = (2, 4, 8, 16, 32)
    rows = []
    for arm in ("naive-accumulation", "gradcache"):
        for dtype in ("float32", "float64"):
            s = contrastive_arms(runs["contrastive"], dtype).loc[arm]
            rows.append([arm, dtype, *(g(s.loc[n, "max_exact_err"]) for n in ns),
                         ", ".join(sorted(set(s.loc[list(ns), "verdict"])))])
    for dtype in ("float32", "float64"):
        s = contrastive_arms(runs["contrastive"], dtype).loc["gradcache"]
        rows.append(["tolerance", dtype, *(g(s.loc[n, "rel_tolerance"]) for n in ns), ""])
    return table(["arm", "dtype", *(f"N={n}" for n in ns), "verdict"], rows)


def block_contrastive_prose(runs: dict, printed: dict) -> str:
    f32, f64 = (contrastive_arms(runs["contrastive"], d) for d in ("float32", "float64"))
    n = [2, 4, 8, 16, 32]
    cached32, cached64 = f32.loc["gradcache"].loc[n], f64.loc["gradcache"].loc[n]
    naive32, naive64 = f32.loc["naive-accumulation"].loc[n], f64.loc["naive-accumulation"].loc[n]
    same = [g(a) for a in naive32.max_exact_err] == [g(b) for b in naive64.max_exact_err]
    rising = naive64.max_exact_err.is_monotonic_increasing
    return "\n".join([
        f"- **gradcache** is the big batch's gradient at every N. In float64 it is at most "
        f"{g(cached64.max_exact_err.max())} from the exact gradient. In float32 it is "
        f"{span(cached32.max_exact_err)} away, against the big batch's own float32 floor of "
        f"{g(cached32.exact_floor.max())}: GradCache adds nothing measurable to what one big "
        f"batch rounds.",
        f"- **naive-accumulation** differs, {'and more as N grows' if rising else 'at every N'}:"
        f" {g(100 * naive64.max_exact_err.iloc[0], 2)} % at N = 2, "
        f"{g(100 * naive64.max_exact_err.iloc[-1], 2)} % at N = 32."
        + (" The error is the same in float32 and float64 to three digits, so it is not "
           "rounding: the loss is a different function." if same else "")
        + " The smallest cosine between its gradient and the big batch's is "
        + ", ".join(f"{c:.3f}" for c in naive64.min_grad_cosine) + " for N = 2 … 32."])


def block_contrastive_chance(runs: dict, printed: dict) -> str:
    """Retrieval by the standardised pixels themselves, on the held-out pairs."""
    import torch
    import torch.nn.functional as F

    from gradlab.config.settings import Settings
    from gradlab.zoo.contrastive import digit_views

    a, b = (F.normalize(v, dim=1) for v in digit_views(Settings()).test)
    pixels = float(((a @ b.T).argmax(1) == torch.arange(len(a))).double().mean())
    return (f"Chance is 1/{len(a)} = {g(100 / len(a), 2)} %, and the cosine of the "
            f"standardised pixels themselves reaches {g(100 * pixels)} %.")


def block_contrastive_memory(runs: dict, printed: dict) -> str:
    s = contrastive_arms(runs["contrastive"], "float32")
    big = s.loc[("big-batch", 1), "max_saved_bytes"]
    rows = [["1 (big batch)", "64", *([g(s.loc[("big-batch", 1), "negatives"])] * 2),
             *([f"{big / 1024:.1f}"] * 2), "1"]]
    for n in (2, 4, 8, 16, 32):
        naive, cached = s.loc[("naive-accumulation", n)], s.loc[("gradcache", n)]
        ratio = g(cached.max_saved_bytes / big)
        rows.append([str(n), str(int(naive.micro_batch)), g(naive.negatives),
                     g(cached.negatives), f"{naive.max_saved_bytes / 1024:.1f}",
                     f"{cached.max_saved_bytes / 1024:.1f}", f"**{ratio}**" if n == 8 else ratio])
    return table(["N", "micro-batch", "negatives, naive", "negatives, gradcache",
                  "activation KiB, naive", "activation KiB, gradcache", "gradcache / big batch"],
                 rows)


def block_contrastive_memory_prose(runs: dict, printed: dict) -> str:
    import torch

    from gradlab.train.memory import saved_tensor_bytes
    from gradlab.zoo.contrastive import EMBEDDING, info_nce

    f32, f64 = (contrastive_arms(runs["contrastive"], d) for d in ("float32", "float64"))
    big = f32.loc[("big-batch", 1), "max_saved_bytes"]
    cached = f32.loc["gradcache"].max_saved_bytes
    batch = int(f32.loc[("big-batch", 1), "batch_size"])
    leaves = [torch.randn(batch, EMBEDDING, requires_grad=True) for _ in range(2)]
    _, loss_bytes = saved_tensor_bytes(lambda: info_nce(leaves, 0.1)[0].backward())
    return (f"GradCache's memory follows the micro-batch, not B. At micro-batch B/8 it holds "
            f"{g(cached.loc[8] / big)} of the big batch's activation bytes (the issue asked for "
            f"at most 0.3). It never goes below {cached.min() / 1024:.1f} KiB: the graph of the "
            f"loss itself over all {batch} pairs of embeddings (the {batch}×{batch} similarity "
            f"matrix and its two softmaxes: {loss_bytes} bytes in float32, measured on "
            f"`info_nce` alone{', the same number' if loss_bytes == cached.min() else ''}). The "
            f"loss's graph and the encoder's are never held at the same time, so once the "
            f"micro-batch is small the loss's graph is the peak. float64 holds twice the bytes "
            f"in the same proportions (big batch "
            f"{f64.loc[('big-batch', 1), 'max_saved_bytes'] / 1024:.1f} KiB, gradcache at "
            f"N = 8 {f64.loc[('gradcache', 8), 'max_saved_bytes'] / 1024:.1f} KiB).")


def contrastive_evals(run_dir: Path) -> pd.DataFrame:
    """eval.csv of contrastive-training with the N of each trial."""
    s = summary(run_dir)
    evals = read(run_dir, "eval")
    return evals.assign(N=evals.trial.map(s.groupby("trial").accum_steps.max()))


def block_contrastive_training(runs: dict, printed: dict) -> str:
    run_dir = runs["contrastive-training"]
    s = summary(run_dir)
    s = s.assign(N=s.trial.map(s.groupby("trial").accum_steps.max()))
    evals = contrastive_evals(run_dir)
    steps = [50, 100, 150, 200]
    rows = []
    order = [("big-batch", s.N.min())] + [(arm, n) for arm in ("gradcache", "naive-accumulation")
                                          for n in sorted(s.N.unique())]
    for arm, n in order:
        mine = evals[(evals.arm == arm) & (evals.N == n)].set_index("step")
        row = s[(s.arm == arm) & (s.N == n)].iloc[0]
        rows.append([arm, str(int(row.accum_steps)), g(row.negatives),
                     *(f"{100 * mine.loc[t, 'test_accuracy']:.1f} %" for t in steps),
                     g(row.final_loss)])
    return table(["arm", "N", "negatives", *(f"step {t}" for t in steps),
                  "final training loss"], rows)


def block_contrastive_training_prose(runs: dict, printed: dict) -> str:
    run_dir = runs["contrastive-training"]
    s = summary(run_dir)
    s = s.assign(N=s.trial.map(s.groupby("trial").accum_steps.max()))
    evals = contrastive_evals(run_dir)
    base = evals[(evals.arm == "big-batch") & (evals.N == s.N.min())].set_index("step")
    gap = {}
    for arm in ("gradcache", "naive-accumulation"):
        for n in sorted(s.N.unique()):
            mine = evals[(evals.arm == arm) & (evals.N == n)].set_index("step")
            gap[arm, n] = 100 * (base.test_accuracy - mine.test_accuracy)
    cached = s[s.arm == "gradcache"].set_index("N")
    naive = s[s.arm == "naive-accumulation"].set_index("N")
    big = s[s.arm == "big-batch"].iloc[0]
    worst = max(gap["gradcache", n].abs().max() for n in cached.index)
    last = base.index.max()
    return "\n".join([
        "- **gradcache** trains the big batch's model: "
        + ("the same held-out accuracy as the big batch's" if worst == 0 else
           f"held-out accuracy within {g(worst, 2)} points of the big batch's")
        + f" at every evaluation and every N. The {last} float32 steps drift apart by "
        f"rounding alone (the gradient at every probe is within the float32 floor): the "
        f"training loss stays within "
        + ", ".join(f"{g(cached.loc[n, 'max_rel_loss_diff'], 2)} (N = {n})"
                    for n in cached.index) + " of the big batch's, relative.",
        f"- **naive-accumulation** *looks* better on its own training loss "
        f"({g(naive.final_loss.iloc[-1])} at N = {naive.index[-1]} against "
        f"{g(big.final_loss)}), because picking the partner among "
        f"{int(naive.negatives.iloc[-1]) + 1} candidates is easier than among "
        f"{int(big.batch_size)}. It is a different, easier task, and it learns less: after "
        f"{last} steps its held-out retrieval accuracy is "
        + ", ".join(f"{g(gap['naive-accumulation', n].loc[last], 2)} points lower at N = {n}"
                    for n in naive.index) + "."])
def block_cost(runs: dict, printed: dict) -> str:
    s = summary(runs["cost"]).sort_values(["model", "micro_batch"], ascending=[True, False])
    rows = [[r.model, r.micro_batch, r.accum_steps, g(r.activation_mb), g(r.memory_mb),
             f"{r.step_ms:.1f}", f"{r.example_us:.0f}"] for r in s.itertuples()]
    return table(["model", "micro-batch", "N", "activations MB", "step MB", "ms/step",
                  "µs/example"], rows)


def block_cost_prose(runs: dict, printed: dict) -> str:
    s = summary(runs["cost"])
    cnn = s[s.model == "cnn"].set_index("micro_batch")
    mlp = s[s.model == "mlp"].set_index("micro_batch")
    smallest, largest = int(cnn.index.min()), int(cnn.index.max())
    return (f"For the cnn the activations are {g(cnn.activation_mb[largest])} MB at "
            f"{largest} examples, {g(cnn.activation_mb[largest // 4])} MB at {largest // 4} "
            f"({g(cnn.activation_mb[largest // 4] / cnn.activation_mb[largest])}×) and "
            f"{g(cnn.activation_mb[smallest])} MB at {smallest}; the mlp's step never needs "
            f"less than {g(mlp.memory_mb.min())} MB, nearly all weights and gradients. Time per "
            f"example: {cnn.example_us[largest]:.0f} µs for the cnn at {largest}, "
            f"{cnn.example_us.min():.0f} µs at best, {cnn.example_us[smallest]:.0f} µs at "
            f"{smallest}; the mlp {mlp.example_us[largest]:.0f}, {mlp.example_us.min():.0f} "
            f"and {mlp.example_us[smallest]:.0f} µs.")


def block_cost_budget(runs: dict, printed: dict) -> str:
    """The budget lines of the run, computed from its files as compare computes them (the
    printed ones wrap at the terminal's width)."""
    from gradlab.readers import compare
    from gradlab.record import store

    loaded = store.load_runs([runs["cost-budget"]])
    rows = compare.arm_rows(loaded)
    lines = [line for line in compare.budget_notes(rows, compare.setting_columns(loaded, rows))
             if line.startswith("budget ")]
    return "```text\n$ gradlab run cost --set budget_mb=10\n…\n" + "\n".join(lines) + "\n```"


def overall_probes(run_dir: Path) -> pd.DataFrame:
    """The all-parameter rows of probe.csv, with the arm's swept settings."""
    probes = read(run_dir, "probe")
    return probes[probes.param == "*"].merge(summary(run_dir).drop(columns="step",
                                                                   errors="ignore"),
                                             on=["trial", "arm"])


def block_pitfalls(runs: dict, printed: dict) -> str:
    clip = summary(runs["clipping"]).set_index(["arm", "accum_steps"])
    after, per = clip.loc["after-accumulation"], clip.loc["per-micro-batch"]
    sched = summary(runs["scheduler"]).set_index("arm")
    lr = read(runs["scheduler"], "steps").pivot(index="step", columns="arm", values="lr")
    stopped = lr.index[lr["per-micro-batch"] == 0].min()
    last = overall_probes(runs["last-window"])
    short = read(runs["last-window"], "steps").query("arm == 'big-batch'")
    short_steps = short[short.window_size < short.window_size.max()].step
    at_short = last[last.step.isin(short_steps)].set_index("arm").exact_err
    drop = summary(runs["dropout"])
    drop = drop[~drop.baseline].set_index("trial")
    checks = read(runs["dropout"], "checks")
    per_step = drop.loc[1]
    rows = [
        ["`clipping`", f"vs exact {span(after.max_exact_err)} (floor "
                       f"{g(after.exact_floor.max(), 2)}, float32)",
         f"vs exact {g(per.max_exact_err.min(), 2)} (N = {per.index.min()}) … "
         f"{g(per.max_exact_err.max(), 2)} (N = {per.index.max()})"],
        ["`scheduler`", f"lr diff {g(sched.loc['per-step', 'max_rel_lr_diff'])}, losses within "
                        f"{g(sched.loc['per-step', 'max_rel_loss_diff'], 2)}",
         f"lr diff {g(sched.loc['per-micro-batch', 'max_rel_lr_diff'])}; lr 0 from step "
         f"{stopped}; final loss {g(sched.loc['per-micro-batch', 'final_loss'])} vs "
         f"{g(sched.loc['big-batch', 'final_loss'])}"],
        ["`last-window`", f"vs exact {g(at_short['by-size'].max(), 2)} on the short windows",
         f"/ N anyway: {span(at_short['divided-by-n'])} at each short window; not flushed: "
         f"{span(last[last.arm == 'not-flushed'].exact_err.nlargest(2))}"],
        ["`dropout`", f"eval {g(drop.loc[0, 'max_exact_err'], 2)}, per-example masks "
                      f"{g(drop.loc[2, 'max_exact_err'], 2)}",
         f"nn.Dropout's masks: up to {g(per_step.max_exact_err, 2)}; the mean of "
         f"{per_step.mask_draws} draws {g(checks.value.iloc[0], 2)} (tolerance "
         f"{g(checks.tolerance.iloc[0], 2)})"],
    ]
    return table(["experiment", "the fix", "the bug"], rows)


def block_clipping(runs: dict, printed: dict) -> str:
    run_dir = runs["clipping"]
    s = summary(run_dir).set_index(["arm", "accum_steps"])
    probes = overall_probes(run_dir)
    median = probes[probes.arm == "per-micro-batch"].groupby("accum_steps").exact_err.median()
    steps = read(run_dir, "steps")
    base = steps[steps.arm == "big-batch"]
    rows = [[str(n), g(s.loc[("after-accumulation", n), "max_exact_err"]),
             f"{g(s.loc[('per-micro-batch', n), 'max_exact_err'])} ({g(median[n])})",
             g(s.loc[("per-micro-batch", n), "min_grad_cosine"]),
             g(s.loc[("per-micro-batch", n), "final_test_accuracy"])]
            for n in sorted(median.index)]
    after = s.loc["after-accumulation"]
    return table(["N", "after accumulation: vs exact",
                  "per micro-batch: vs exact (median over steps)", "per micro-batch: min cosine",
                  "per micro-batch: test accuracy"], rows) + (
        f"\n\nThe big batch applies a gradient of norm {span(base.grad_norm)} at all "
        f"{base.step.max()} steps "
        f"(the clip is active at every one) and reaches test accuracy "
        f"{span(s.loc['big-batch'].final_test_accuracy)}. After accumulation: floor "
        f"{span(after.exact_floor)}, tolerance {span(after.rel_tolerance)}.")


def block_scheduler(runs: dict, printed: dict) -> str:
    run_dir = runs["scheduler"]
    s = summary(run_dir).set_index("arm")
    steps = read(run_dir, "steps")
    lr = steps.pivot(index="step", columns="arm", values="lr")
    loss = steps.pivot(index="step", columns="arm", values="loss")
    last = int(lr.index.max())
    shown_lr = [1, 2, 3, 8, 10, 11, 20]
    shown_loss = [10, 20, last]
    rows = []
    for arm in ("big-batch", "per-step", "per-micro-batch"):
        same = arm == "per-step" and (lr[arm] == lr["big-batch"]).all()
        rows.append([arm, "the same, to the last bit" if same
                     else ", ".join(g(lr.loc[t, arm]) for t in shown_lr),
                     ", ".join(g(loss.loc[t, arm], 4) for t in shown_loss),
                     g(s.loc[arm, "final_test_accuracy"])])
    fix, bug = s.loc["per-step"], s.loc["per-micro-batch"]
    return table(["arm", "lr at steps " + ", ".join(map(str, shown_lr)),
                  "training loss at steps " + ", ".join(map(str, shown_loss)),
                  "held-out accuracy"], rows) + (
        f"\n\nper-step: vs exact {g(fix.max_exact_err)}, lr diff {g(fix.max_rel_lr_diff)}, "
        f"losses within {g(fix.max_rel_loss_diff)} and weights within "
        f"{g(steps[steps.arm == 'per-step'].weight_dist.max())} of the big batch's. "
        f"per-micro-batch: vs exact {g(bug.max_exact_err)} (its gradient is right), lr diff "
        f"{g(bug.max_rel_lr_diff)}, verdict {bug.verdict}.")


def block_last_window(runs: dict, printed: dict) -> str:
    run_dir = runs["last-window"]
    probes = overall_probes(run_dir)
    steps = read(run_dir, "steps")
    base = steps[steps.arm == "big-batch"].set_index("step")
    short = base.index[base.window_size < base.window_size.max()]
    rows = []
    for arm in ("by-size", "divided-by-n", "not-flushed"):
        mine = probes[probes.arm == arm].set_index("step")
        bad = mine[mine.exact_err > mine.rel_tolerance]
        at_short = [g(mine.exact_err[t]) for t in short if t in mine.index]
        rest = mine.drop(index=bad.index.union(short), errors="ignore")
        rows.append([arm, ", ".join(at_short) or "not probed (no step of it ends there)",
                     span(rest.exact_err),
                     ", ".join(f"{g(v)} (step {t})" for t, v in bad.exact_err.items())
                     or "none"])
    by_step = steps.pivot(index="step", columns="arm", values="grad_norm")
    t = short[0]
    held = steps[(steps.arm == "not-flushed") & (steps.window_size > base.window_size.max())]
    return table(["arm", "vs exact at the short windows (steps "
                  + ", ".join(map(str, short)) + ")", "at the other probes",
                  "steps over the tolerance"], rows) + (
        f"\n\nThe short windows hold {base.loc[t, 'window_size']} examples. Gradient norm at "
        f"step {t}: big batch {g(by_step.loc[t, 'big-batch'])}, divided-by-n "
        f"{g(by_step.loc[t, 'divided-by-n'])}. not-flushed steps on "
        f"{held.window_size.iloc[0]} examples at its step {held.step.iloc[0]}, gradient norm "
        f"{g(held.grad_norm.iloc[0])}; cosine with the big batch's down to "
        f"{g(probes[probes.arm == 'not-flushed'].cosine.min())}.")


def block_dropout(runs: dict, printed: dict) -> str:
    run_dir = runs["dropout"]
    s = summary(run_dir)
    s = s[~s.baseline].set_index("trial")
    probes = overall_probes(run_dir)
    cases = {0: "eval mode: no masks", 1: "train mode, `nn.Dropout`'s masks",
             2: "train mode, per-example masks"}
    rows = [[label, span(probes[probes.trial == trial].exact_err),
             g(s.loc[trial, "max_rel_loss_diff"]), s.loc[trial, "verdict"]]
            for trial, label in cases.items()]
    checks = read(run_dir, "checks").iloc[0]
    return table(["case", "vs exact, over the steps", "losses: largest relative difference",
                  "verdict"], rows) + (
        f"\n\nMean over {s.loc[1, 'mask_draws']} mask draws at step 1: "
        f"{g(checks.value)} of the mean big-batch gradient's norm, tolerance (4 standard "
        f"errors) {g(checks.tolerance)}: {'passed' if checks.passed else 'FAILED'}.")


def block_dropout_draws(runs: dict, printed: dict) -> str:
    s = summary(runs["dropout-draws"])
    checks = read(runs["dropout-draws"], "checks").merge(
        s[["trial", "arm", "mask_draws"]], on=["trial", "arm"]).sort_values("mask_draws")
    return table(["mask draws", "mean difference / mean gradient", "tolerance", "passed"],
                 [[str(r.mask_draws), g(r.value), g(r.tolerance), str(bool(r.passed))]
                  for r in checks.itertuples()])


def block_times(runs: dict, printed: dict, seconds: dict) -> str:
    rows = [[f"`gradlab run {name}`", f"{seconds[name]:.0f} s"] for name in seconds]
    return table(["command", "wall time"], rows)


BLOCKS: dict[str, Callable] = {
    "toy-output": block_toy_output, "equivalence": block_equivalence,
    "equivalence-losses": block_equivalence_losses, "zero-grad-toy": block_zero_grad_toy,
    "zero-grad": block_zero_grad, "batch-lr": block_batch_lr, "norm": block_norm,
    "norm-training": block_norm_training, "norm-low": block_norm_low, "tokens": block_tokens,
    "norm-bn": block_norm_bn, "norm-bn-steps": block_norm_bn_steps,
    "norm-buffers": block_norm_buffers, "norm-buffers-steps": block_norm_buffers_steps,
    "norm-eval": block_norm_eval, "norm-training-prose": block_norm_training_prose,
    "tokens-training": block_tokens_training, "my_lm": block_my_lm, "ddp": block_ddp,
    "ddp-findings": block_ddp_findings, "margins": block_margins,
    "ddp-tokens": block_ddp_tokens, "ddp-tokens-findings": block_ddp_tokens_findings,
    "ddp-tokens-skew": block_ddp_tokens_skew,
    "fsdp": block_fsdp, "fsdp-findings": block_fsdp_findings,
    "sit-out": block_sit_out, "sit-out-findings": block_sit_out_findings,
    "context-parallel": block_context_parallel, "four-ranks": block_four_ranks,
    "precision": block_precision,
    "cost": block_cost, "cost-prose": block_cost_prose, "cost-budget": block_cost_budget,
    "pitfalls": block_pitfalls, "clipping": block_clipping, "scheduler": block_scheduler,
    "last-window": block_last_window, "dropout": block_dropout,
    "dropout-draws": block_dropout_draws,
    "contrastive": block_contrastive, "contrastive-prose": block_contrastive_prose,
    "contrastive-chance": block_contrastive_chance,
    "contrastive-memory": block_contrastive_memory,
    "contrastive-memory-prose": block_contrastive_memory_prose,
    "contrastive-training": block_contrastive_training,
    "contrastive-training-prose": block_contrastive_training_prose,
}


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        # an empty block (the two markers on consecutive lines) is filled too
        pattern = re.compile(rf"(<!-- numbers: {re.escape(name)} -->\n)(?:.*?\n)?"
                             rf"(<!-- /numbers: {re.escape(name)} -->)", re.S)
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="reuse the latest runs in this folder")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "readme")
    parser.add_argument("--write", type=Path, nargs="+",
                        help="rewrite the marked blocks of these files (README.md docs/*.md)")
    parser.add_argument("--only", help="comma-separated experiments to run")
    args = parser.parse_args()
    names = [*EXPERIMENTS, *LOCAL, *VARIANTS]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    runs, printed, seconds = {}, {}, {}
    for name in names:
        if args.runs:
            runs[name] = latest(args.runs, name)
            printed[name] = (args.runs / name / "printed.txt").read_text() \
                if (args.runs / name / "printed.txt").exists() else ""
            timed = args.runs / name / "seconds.txt"
            seconds[name] = float(timed.read_text()) if timed.exists() else float("nan")
        else:
            runs[name], seconds[name], printed[name] = run(name, args.out)
            (args.out / name / "printed.txt").write_text(printed[name])
            (args.out / name / "seconds.txt").write_text(f"{seconds[name]:.1f}")
            print(f"{name}: {seconds[name]:.1f} s", file=sys.stderr)
    blocks = {key: make(runs, printed) for key, make in BLOCKS.items()
              if all(n in runs for n in needs(key))}
    blocks["times"] = block_times(runs, printed, seconds)
    if "equivalence" in seconds:
        blocks["default-time"] = f"{seconds['equivalence']:.0f} s"
    blocks["machine"] = (f"{platform.machine()}, {os.cpu_count()} cores, Python "
                         f"{platform.python_version()}, torch "
                         f"{__import__('torch').__version__}")
    for key, body in blocks.items():
        print(f"<!-- numbers: {key} -->\n{body}\n<!-- /numbers: {key} -->\n")
    for figure, name in FIGURES.items():
        if name in runs:
            copy_figure(runs[name], figure)
    for figure, (name, options, made) in PLOTTED.items():
        if name in runs:
            copy_figure(runs[name], figure, options, made)
    for page in args.write or []:
        page.write_text(replace_blocks(page.read_text(), blocks))


def copy_figure(run_dir: Path, figure: str, options: tuple[str, ...] = (),
                made_as: str | None = None) -> None:
    """docs/figures/FIGURE from `gradlab plot RUN [OPTIONS]` (the run's standard figures, or
    the ones the options ask for, which gradlab names MADE_AS)."""
    subprocess.run([*gradlab(), "plot", str(run_dir), *options], cwd=ROOT, check=True,
                   capture_output=True)
    made = run_dir / "figures" / (made_as or figure)
    if not made.exists():
        raise SystemExit(f"gradlab plot {run_dir} made no {figure}: "
                         f"{sorted(p.name for p in (run_dir / 'figures').iterdir())}")
    (ROOT / "docs" / "figures" / figure).write_bytes(made.read_bytes())


def needs(block: str) -> list[str]:
    """The runs a block reads."""
    if block.startswith("norm-training"):
        return ["norm-training"]
    if block.startswith("contrastive-training"):
        return ["contrastive-training"]
    if block.startswith("contrastive"):
        return ["contrastive"]
    if block.startswith("norm-") and block != "norm-low":
        return ["norm"]
    if block.startswith("ddp-tokens"):
        return ["ddp-tokens"]
    if block.startswith("fsdp"):
        return ["fsdp"]
    if block.startswith("sit-out"):
        return ["sit-out"]
    if block.startswith("context-parallel"):
        return ["context-parallel"]
    if block.startswith("ddp"):
        return ["ddp"]
    return {"toy-output": ["toy"], "equivalence-losses": ["equivalence"],
            "margins": [], "cost-prose": ["cost"],
            "four-ranks": [*FOUR_RANKS_ARMS, *(f"{e}-4" for e in FOUR_RANKS_ARMS)],
            "pitfalls": ["clipping", "scheduler", "last-window", "dropout"]
            }.get(block, [block])


if __name__ == "__main__":
    main()
