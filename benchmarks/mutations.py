"""A mutation check: do the tests catch the bugs they were written to catch?

Not a test, and not run in CI. Run it from the project folder, on an idle machine
(about five minutes on the project's 2-core machine):

    .venv/bin/python benchmarks/mutations.py                  # every mutation
    .venv/bin/python benchmarks/mutations.py --only NAME[,NAME]
    .venv/bin/python benchmarks/mutations.py --list           # the mutations, one a line
    .venv/bin/python benchmarks/mutations.py --write          # and update RESULTS.md

Each mutation below is one deliberate bug: an exact snippet of a file under gradlab/
(found exactly once, or the script stops before running anything) and what replaces it,
with the few tests expected to catch it. For each, the project (gradlab/, tests/,
experiments/, docs/, benchmarks/, pyproject.toml, README.md, LICENSE) is copied into a
fresh temporary folder, the bug is put into the copy, and

    python -m pytest -x -q -p no:cacheprovider -W ignore TESTS

runs there, with the copy first on PYTHONPATH and as the working directory, so the copy's
gradlab is the one imported (checked in each copy: `import gradlab` from a subprocess
must find the copy's, not the editable install's). A mutation is *caught* when pytest
exits 1 (tests failed), *survived* when it exits 0 and *error* on any other exit
(a collection error, no tests collected, a timeout): a mutation that breaks the import
probes nothing. Before any mutation, every listed test must pass on an unmutated copy,
or a failure would mean nothing. Tests marked slow run with -m "slow or not slow" only
for the mutations that say slow=True.

What it proves: each listed test fails when its bug is there, so the test pins the
behaviour it names (a test that survives its mutation pins less than it says). It does
not prove that the tests catch every bug: only these.

--write replaces what lies between the <!-- mutations --> and <!-- /mutations -->
markers in benchmarks/RESULTS.md (the section is appended, markers included, when they
are missing) with the table printed on stdout. Exit status: 0 when every mutation is
caught, 1 otherwise; 2 when a snippet is not in its file exactly once.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from results import RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]
# what the tests need of the project (test_audit imports experiments/, some tests read docs/)
COPIED = ("gradlab", "tests", "experiments", "docs", "benchmarks", "pyproject.toml",
          "README.md", "LICENSE")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
PYTEST = ("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore")
TIMEOUT = 600  # seconds for one pytest run; far more than any listed test takes
START, END = "<!-- mutations -->", "<!-- /mutations -->"
HEADING = "## Mutation check: do the tests catch the bugs they name?"
INTRO = """\
`benchmarks/mutations.py` puts one deliberate bug at a time into a copy of the project
and runs the tests named for it there: *caught* means they failed (pytest exit 1),
*survived* that they passed, *error* any other exit. Every listed test first passes on
an unmutated copy. Regenerate with `.venv/bin/python benchmarks/mutations.py --write`
(only the table between the markers is replaced)."""


@dataclass(frozen=True)
class Mutation:
    name: str
    description: str  # the bug, in one line
    file: str  # relative to the project folder, under gradlab/
    old: str  # occurs exactly once in the file
    new: str
    tests: tuple[str, ...]  # test files or node ids expected to catch it
    slow: bool = False  # a listed test is marked slow: run with -m "slow or not slow"


MUTATIONS = (
    # ---------------------------------------------------------------- the reported numbers
    Mutation("next-token-unshifted",
             "next-token accuracy compares position t's prediction with label t, not t + 1",
             "gradlab/zoo/text.py",
             '    targets = batch["labels"][:, 1:]\n    scored = targets != IGNORE_INDEX',
             '    targets = batch["labels"][:, :-1]\n    scored = targets != IGNORE_INDEX',
             ("tests/test_reported_numbers.py",)),
    Mutation("summary-abs-err-mean",
             "summary.csv's max_abs_grad_err is the mean over the probes, not the max",
             "gradlab/record/schema.py",
             '"max_abs_grad_err": _worst(overall, "max_abs_err"),',
             '"max_abs_grad_err": _mean(overall, "max_abs_err"),',
             ("tests/test_reported_numbers.py",)),
    Mutation("rel-loss-own-loss",
             "steps.csv's rel_loss_diff divides by the arm's own loss, not the baseline's",
             "gradlab/lab/observers.py",
             '"rel_loss_diff": abs(stats.loss - ref_loss) / abs(ref_loss) if ref_loss',
             '"rel_loss_diff": abs(stats.loss - ref_loss) / abs(stats.loss) if ref_loss',
             ("tests/test_reported_numbers.py",)),
    Mutation("mlp-bn-stats-frozen",
             "the mlp's BatchNorm1d never updates its running statistics (momentum 0)",
             "gradlab/zoo/models.py",
             "            return nn.BatchNorm1d(width)",
             "            return nn.BatchNorm1d(width, momentum=0.0)",
             ("tests/test_norm.py::"
              "test_the_mlps_batchnorm1d_running_statistics_follow_each_micro_batch",)),
    Mutation("star-row-min-abs-err",
             "the probe's '*' row keeps the smallest max |a - r| of the parameters (0), "
             "not the largest",
             "gradlab/train/metrics.py",
             "self.max_abs = max(self.max_abs, other.max_abs)",
             "self.max_abs = min(self.max_abs, other.max_abs)",
             ("tests/test_reported_numbers.py",)),
    Mutation("exact-err-vs-baseline",
             "probe.csv's exact_err is the arm's distance from the baseline's gradient, "
             "not from the exact float64 one",
             "gradlab/lab/probing.py",
             "compare_grads(grads, exact)",
             "compare_grads(grads, baseline)",
             ("tests/test_precision.py::"
              "test_the_floor_is_one_big_batch_in_the_arms_own_precision",)),
    Mutation("not-probed-equivalent",
             "an arm whose gradient error was not measured (NaN) is called equivalent, "
             "not 'not probed'",
             "gradlab/record/verdict.py",
             "    if missing(rel_err):\n        return Verdict.NOT_PROBED",
             "    if missing(rel_err):\n        return Verdict.EQUIVALENT",
             ("tests/test_reported_numbers.py",)),
    Mutation("exact-no-dropout-replay",
             "the exact float64 gradient draws its own dropout masks instead of replaying "
             "the baseline's random state",
             "gradlab/lab/probing.py",
             "with base.rng.replay(self.start_state):  # the baseline's dropout masks",
             "with contextlib.nullcontext():  # the baseline's dropout masks",
             ("tests/test_reported_numbers.py",)),
    # ---------------------------------------------------------------- the engine and the rest
    Mutation("loss-not-divided-by-n",
             "by-size divides each micro-batch's summed loss by its own units, not the "
             "window's: N times the gradient",
             "gradlab/train/engine.py",
             "            return (loss * ranks if ranks > 1 else loss) / window_units",
             "            return (loss * ranks if ranks > 1 else loss) / units",
             ("tests/test_engine.py",)),
    Mutation("tokens-per-micro-batch",
             "each micro-batch's loss is divided by its own token count, not the window's",
             "gradlab/train/engine.py",
             "planned.append(MicroBatch(micro_batch, mine, part_units, rank_units, "
             "last=False))",
             "planned.append(MicroBatch(micro_batch, mine, setup.count_units(micro_batch), "
             "rank_units, last=False))",
             ("tests/test_engine.py::test_token_batches_global_normalisation_equals_big_batch",)),
    Mutation("zero-grad-never-called",
             "zero_grad=every-n never clears .grad after the optimizer step",
             "gradlab/train/engine.py",
             "        if s.zero_grad == ZeroGrad.EVERY_N:  # the accumulation pattern: clear once "
             "per step\n            optimizer.zero_grad(set_to_none=s.set_to_none)",
             "        if s.zero_grad == ZeroGrad.EVERY_N:  # the accumulation pattern: clear once "
             "per step\n            pass",
             ("tests/test_zero_grad.py",)),
    Mutation("no-sync-never-syncs",
             "sync=no-sync never all-reduces, not even with the window's last micro-batch",
             "gradlab/train/replica.py",
             "            reduce = last",
             "            reduce = False",
             ("tests/test_ddp.py::test_the_hook_counts_the_all_reduces_each_sync_policy_makes",),
             slow=True),
    Mutation("tolerance-times-100",
             "the verdict's relative tolerance is 100 times the measured one",
             "gradlab/record/verdict.py",
             "    tol = rel_tolerance(dtype, accum_steps, 0.0 if missing(floor) else floor)",
             "    tol = 100 * rel_tolerance(dtype, accum_steps, 0.0 if missing(floor) else floor)",
             ("tests/test_verdict.py::test_float64_arms_are_held_to_float64_rounding",)),
    Mutation("audit-big-batch-vs-itself",
             "gradlab audit compares the big-batch run's gradients with its own, not the "
             "accumulated run's",
             "gradlab/auditing/parent.py",
             'tables = gradient_tables(ref["steps"], own["steps"], estimate)',
             'tables = gradient_tables(ref["steps"], ref["steps"], estimate)',
             ("tests/test_audit.py::test_not_divided_in_process_matches_the_example",)),
    Mutation("clip-each-micro-batch",
             "clip_at=after-accumulation also clips each micro-batch's partial sum",
             "gradlab/train/engine.py",
             "        case ClipAt.AFTER_ACCUMULATION | ClipAt.BEFORE_UNSCALE:\n"
             "            return False",
             "        case ClipAt.AFTER_ACCUMULATION | ClipAt.BEFORE_UNSCALE:\n"
             "            return True",
             ("tests/test_pitfalls.py::"
              "test_clipping_once_after_accumulation_is_the_clipped_big_batch",)),
    Mutation("scheduler-per-micro-batch",
             "scheduler_step=per-step steps the LR scheduler N times per optimizer step",
             "gradlab/train/engine.py",
             "        case SchedulerStep.PER_STEP:\n            return 1",
             "        case SchedulerStep.PER_STEP:\n            return s.accum_steps",
             ("tests/test_pitfalls.py::test_scheduler_per_step_matches_the_big_batch_exactly_"
              "per_micro_batch_runs_n_times_fast",)),
    Mutation("groupnorm-as-batchnorm",
             "the cnn's norm=gn builds BatchNorm2d (statistics over the micro-batch)",
             "gradlab/zoo/models.py",
             "            return nn.GroupNorm(groups, channels)",
             "            return nn.BatchNorm2d(channels)",
             ("tests/test_norm.py::test_groupnorm_training_is_independent_of_micro_batch_size",)),
    Mutation("float32-buffer-keeps-last",
             "grad_accum_dtype=float32 overwrites its buffer with each partial gradient "
             "instead of adding it",
             "gradlab/train/engine.py",
             "total.add_(p.grad.detach().to(torch.float32))",
             "total.copy_(p.grad.detach().to(torch.float32))",
             ("tests/test_precision.py::"
              "test_the_float32_buffer_sums_like_float64_to_float32_rounding",)),
    Mutation("dropout-keys-not-offset",
             "per-example dropout keys restart at each micro-batch instead of following "
             "the example's place in the window",
             "gradlab/train/engine.py",
             "mine = None if keys is None else keys[offset:offset + size]",
             "mine = None if keys is None else keys[:size]",
             ("tests/test_pitfalls.py::"
              "test_dropout_stream_masks_differ_per_example_masks_agree",)),
    Mutation("bn-frozen-still-trains",
             "bn_mode=frozen leaves BatchNorm in train mode (batch statistics, running "
             "ones updated)",
             "gradlab/train/engine.py",
             "                if isinstance(module, nn.modules.batchnorm._BatchNorm):\n"
             "                    module.eval()",
             "                if isinstance(module, nn.modules.batchnorm._BatchNorm):\n"
             "                    pass",
             ("tests/test_norm.py::"
              "test_the_mlps_batchnorm1d_running_statistics_follow_each_micro_batch",)),
)


@dataclass
class Outcome:
    mutation: Mutation
    result: str  # caught | survived | error
    seconds: float
    detail: str  # the first failing test, or why it is an error


def check_snippets(mutations: tuple[Mutation, ...]) -> None:
    """Every ``old`` once in its file, here, before anything runs (exit 2 otherwise)."""
    problems = []
    for m in mutations:
        if not m.file.startswith("gradlab/"):
            problems.append(f"{m.name}: {m.file} is not under gradlab/")
            continue
        count = (ROOT / m.file).read_text(encoding="utf-8").count(m.old)
        if count != 1:
            problems.append(f"{m.name}: its snippet occurs {count} times in {m.file}, not once")
        if m.old == m.new:
            problems.append(f"{m.name}: new is old: nothing would change")
    if problems:
        sys.exit("mutations.py: " + "; ".join(problems))


def copy_project(into: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=IGNORED)
        elif source.exists():
            shutil.copy2(source, into / name)


def mutate(folder: Path, m: Mutation) -> None:
    path = folder / m.file
    text = path.read_text(encoding="utf-8")
    if text.count(m.old) != 1:
        raise SystemExit(f"mutations.py: {m.name}: its snippet occurs {text.count(m.old)} "
                         f"times in the copy of {m.file}, not once")
    path.write_text(text.replace(m.old, m.new), encoding="utf-8")


def environment(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_imports_copy(folder: Path) -> None:
    """`import gradlab` in the copy must find the copy's package, not the installed one."""
    found = subprocess.run([sys.executable, "-c", "import gradlab; print(gradlab.__file__)"],
                           cwd=folder, env=environment(folder), capture_output=True,
                           text=True, check=True).stdout.strip()
    if Path(found).resolve() != (folder / "gradlab" / "__init__.py").resolve():
        raise SystemExit(f"mutations.py: the copy in {folder} imports gradlab from {found}, "
                         f"not its own: the mutations would not be tested")


def pytest(folder: Path, tests: list[str], slow: bool) -> tuple[int, str, float]:
    """(exit status, output, seconds) of pytest on ``tests`` in ``folder``."""
    marks = ("-m", "slow or not slow") if slow else ()
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *PYTEST, *marks, *tests], cwd=folder,
                              env=environment(folder), capture_output=True, text=True,
                              timeout=TIMEOUT)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as timeout:
        code = -1
        output = f"timed out after {TIMEOUT} s\n{timeout.stdout or ''}{timeout.stderr or ''}"
    return code, output, time.perf_counter() - started


def first_failure(output: str) -> str:
    """The first FAILED or ERROR line of pytest's short summary, without its message."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    return ""


def last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "(no output)"


def counted(output: str) -> str:
    """What pytest ran, from its progress lines (-q over the project's -q prints no totals)."""
    marks = "".join(line.split()[0] for line in output.splitlines()
                    if re.fullmatch(r"[.sxXFE]+\s+\[\s*\d+%\]", line.strip()))
    words = {".": "passed", "s": "skipped", "x": "xfailed", "X": "xpassed", "F": "failed",
             "E": "errors"}
    parts = [f"{marks.count(k)} {v}" for k, v in words.items() if marks.count(k)]
    return ", ".join(parts) or last_line(output)


def in_copy(m: Mutation | None, tests: list[str], slow: bool) -> tuple[int, str, float]:
    with tempfile.TemporaryDirectory(prefix="gradlab-mutation-") as name:
        folder = Path(name)
        copy_project(folder)
        if m is not None:
            mutate(folder, m)
        check_imports_copy(folder)
        return pytest(folder, tests, slow)


def unique(tests) -> list[str]:
    """The tests once each, and no node id of a file listed whole."""
    tests = list(tests)
    whole = {t for t in tests if "::" not in t}
    out: list[str] = []
    for t in tests:
        if t not in out and t.split("::")[0] not in whole - {t}:
            out.append(t)
    return out


def check_unmutated(mutations: tuple[Mutation, ...]) -> str:
    """Every listed test passes on an unmutated copy; returns a line saying so."""
    said = []
    for slow in (False, True):
        tests = unique(t for m in mutations if m.slow == slow for t in m.tests)
        if not tests:
            continue
        code, output, seconds = in_copy(None, tests, slow)
        print(f"unmutated{' (slow too)' if slow else ''}: {counted(output)} "
              f"[{seconds:.1f} s]", flush=True)
        if code != 0:
            print(output[-4000:], file=sys.stderr)
            sys.exit(f"mutations.py: the listed tests do not pass on the unmutated project "
                     f"(pytest exit {code}): a mutation's result would mean nothing")
        marked = " (slow ones too)" if slow else ""
        ids = f"{len(tests)} test id{'s' if len(tests) > 1 else ''}"
        said.append(f"{ids}{marked}, {counted(output)} in {seconds:.0f} s")
    if not said:
        sys.exit("mutations.py: no tests to check the unmutated project with")
    return "; ".join(said)


def run_one(m: Mutation) -> Outcome:
    code, output, seconds = in_copy(m, list(m.tests), m.slow)
    if code == 1:
        return Outcome(m, "caught", seconds, first_failure(output) or last_line(output))
    if code == 0:
        return Outcome(m, "survived", seconds, counted(output))
    why = "timed out" if code == -1 else f"pytest exit {code}: {last_line(output)}"
    return Outcome(m, "error", seconds, why)


def table(outcomes: list[Outcome]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| mutation | file | tests | result | seconds | first failure |",
             "| --- | --- | --- | --- | ---: | --- |"]
    for o in outcomes:
        m = o.mutation
        tests = "<br>".join(f"`{t}`" for t in m.tests)
        failed = re.sub(r"^(FAILED|ERROR) ", "", o.detail) if o.result == "caught" else o.detail
        lines.append(f"| `{m.name}`: {cell(m.description)} | `{m.file}` | {tests} | "
                     f"{o.result} | {o.seconds:.1f} | {cell(failed)} |")
    return lines


def write(block: str) -> None:
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = f"{head}{START}\n{block}\n{END}{tail}"
    else:
        text = (text.rstrip("\n") + f"\n\n{HEADING}\n\n{INTRO}\n\n{START}\n{block}\n{END}\n")
    RESULTS.write_text(text, encoding="utf-8")
    print(f"(written into {RESULTS})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutation names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--write", action="store_true",
                        help="replace the mutations section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:28} {m.file:28} {m.description}")
        return 0
    chosen = MUTATIONS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        known = {m.name for m in MUTATIONS}
        if unknown := [n for n in names if n not in known]:
            parser.error(f"no mutation named {', '.join(unknown)} (see --list)")
        chosen = tuple(m for m in MUTATIONS if m.name in names)
    check_snippets(chosen)
    started = time.perf_counter()
    where = machine()
    baseline = check_unmutated(chosen)
    outcomes = []
    for m in chosen:
        outcome = run_one(m)
        print(f"{m.name}: {outcome.result} [{outcome.seconds:.1f} s] {outcome.detail}",
              flush=True)
        outcomes.append(outcome)
    caught = sum(o.result == "caught" for o in outcomes)
    total = time.perf_counter() - started
    subset = f" (--only: {len(chosen)} of the {len(MUTATIONS)} mutations)" \
        if len(chosen) < len(MUTATIONS) else ""
    summary = (f"{datetime.date.today().isoformat()}, torch "
               f"{importlib.metadata.version('torch')}, Python {sys.version.split()[0]}: "
               f"**{caught} of {len(outcomes)} caught**{subset}, {total:.0f} s in all. "
               f"Unmutated: {baseline}. Machine: {where}.")
    block = "\n".join([*table(outcomes), "", summary])
    print()
    print(block)
    if args.write:
        write(block)
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
