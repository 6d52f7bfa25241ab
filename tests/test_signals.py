"""Ctrl-C (SIGINT) and kill/timeout/schedulers (SIGTERM), sent to a real gradlab process.

At any moment, while importing, preparing or running, gradlab ends with one line on
stderr and exit 130 (SIGINT) or 143 (SIGTERM); a run directory that exists is marked
'interrupted' with its end time, and the trials finished so far are kept.

All the processes start at once and are signalled when each reaches its moment, so the
whole module takes about as long as one process (mostly importing torch).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from conftest import gradlab

# many Python processes, each importing torch: outside the default run, in CI's second
pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
# the equivalence experiment on the mlp, many short trials: long enough to stop half-way
TRIALS = 60
MANY_TRIALS = ["equivalence", "--set", "model=mlp", "--set", "dataset=regression",
               "--set", "norm=none", "--set", "dtype=float64", "--set", "accum_steps=2",
               "--set", "steps=100", "--set", "seed=" + ",".join(map(str, range(TRIALS)))]
SLOW_PREFLIGHT = ["toy", "--set", "model=user_factories:tiny_net",
                  "--set", "dataset=user_factories:slow_data", "--set", "batch_size=8"]
# what `python -m gradlab.cli` does, after leaving a mark that Python is up and gradlab is
# about to be imported: a signal before that reaches Python itself, not gradlab
LAUNCH = """import pathlib, runpy, sys
pathlib.Path(sys.argv.pop(1)).touch()
runpy.run_module("gradlab.cli", run_name="__main__", alter_sys=True)
"""


@dataclass
class Case:
    args: list[str]
    signum: int
    # seconds after gradlab started importing, "preflight" (the slow factory was called)
    # or "mid-run" (a trial has finished)
    when: str | float
    folder: Path = None
    proc: subprocess.Popen = None
    sent_at: float | None = None
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.folder / "results"

    def due(self) -> bool:
        if isinstance(self.when, float):
            started = self.folder / "importing"
            return started.exists() and time.time() - started.stat().st_mtime >= self.when
        if self.when == "preflight":
            return (self.folder / "marker").exists()
        return any(self.out.glob("*/summary.csv"))  # a trial has finished


CASES = {
    # well inside the seconds torch takes to import, and past the handlers cli.py installs
    # first (under load even they take a while to reach)
    "SIGINT while importing, --json": Case([*SLOW_PREFLIGHT, "--json"], signal.SIGINT, 0.8),
    "SIGINT in a factory": Case(SLOW_PREFLIGHT, signal.SIGINT, "preflight"),
    "SIGINT in a factory that swallows it":
        Case([*SLOW_PREFLIGHT[:-4], "--set", "dataset=user_factories:swallowing_data",
              "--set", "batch_size=8"], signal.SIGINT, "preflight"),
    "SIGTERM in a factory": Case(SLOW_PREFLIGHT, signal.SIGTERM, "preflight"),
    "SIGTERM mid-run, --json": Case([*MANY_TRIALS, "--json"], signal.SIGTERM, "mid-run"),
}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> dict[str, Case]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    for case in CASES.values():
        case.folder = tmp_path_factory.mktemp("signal")
        case.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, str(case.folder / "importing"), "run", *case.args,
             "--out", str(case.out)],
            cwd=case.folder, env={**env, "GRADLAB_TEST_MARKER": str(case.folder / "marker")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiting = dict(CASES)
    while waiting and time.monotonic() - start < 120:
        for name, case in list(waiting.items()):
            if case.proc.poll() is not None:  # ended before its moment: the test says so
                del waiting[name]
            elif case.due():
                case.proc.send_signal(case.signum)
                case.sent_at = time.monotonic() - start
                del waiting[name]
        time.sleep(0.05)
    for case in CASES.values():
        try:
            case.stdout, case.stderr = case.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            case.proc.kill()
            case.stdout, case.stderr = case.proc.communicate()
        case.returncode = case.proc.returncode
    return CASES


def check_one_line(case: Case, expected_code: int) -> str:
    assert case.sent_at is not None, f"ended before the signal: {case.stderr}"
    assert case.returncode == expected_code, (case.returncode, case.stderr)
    assert "Traceback" not in case.stderr, case.stderr
    last = case.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), case.stderr
    return last


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.when != "mid-run"])
def test_a_signal_before_the_run_starts_is_one_line_and_writes_nothing(stopped, name):
    case = stopped[name]
    code = 128 + case.signum
    line = check_one_line(case, code)
    assert case.stderr.strip() == line  # nothing else on stderr: no plan, no progress
    word = "interrupted (Ctrl-C)" if case.signum == signal.SIGINT else "stopped by SIGTERM"
    assert line.startswith(f"error: {word} before the run started; nothing was written"), line
    assert "failed" not in line
    assert not case.out.exists() or not any(case.out.iterdir())
    if "--json" in case.args:
        doc = json.loads(case.stdout)
        assert doc == {"status": "interrupted", "error": line.removeprefix("error: "),
                       "run_dir": None}
    else:
        assert case.stdout == ""


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.when == "mid-run"])
def test_a_signal_mid_run_marks_the_run_interrupted_and_keeps_finished_trials(stopped, name):
    case = stopped[name]
    line = check_one_line(case, 128 + case.signum)
    (run,) = case.out.iterdir()
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "interrupted"
    assert meta["ended"] and meta["started"] <= meta["ended"]
    assert signal.Signals(case.signum).name in meta["error"]
    summary = pd.read_csv(run / "summary.csv")
    finished = set(summary["trial"])
    assert 0 < len(finished) < TRIALS
    assert (summary.groupby("trial").size() == 3).all()  # every kept trial is whole
    assert str(run) in line and f"{len(finished)} of {TRIALS} trials" in line
    if "--json" in case.args:
        doc = json.loads(case.stdout)
        assert doc == {"status": "interrupted", "error": line.removeprefix("error: "),
                       "run_dir": str(run)}
    result = gradlab("compare", run)
    assert result.exit_code == 2 and "was interrupted" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_that_arrives_inside_an_import_waits_for_it_to_finish(tmp_path, signum):
    """A module that gets the signal while it loads and swallows what the signal raised there
    (tests/stop_in_import.py): gradlab raises nothing inside the import, then stops."""
    marker = tmp_path / "said"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")]), "GRADLAB_TEST_MARKER": str(marker),
        "GRADLAB_TEST_SIGNAL": str(int(signum))}
    done = subprocess.run([sys.executable, "-m", "gradlab", "run", "toy", "--set",
                           "model=stop_in_import:tiny_net", "--set",
                           "dataset=user_factories:noisy_line", "--set", "batch_size=8",
                           "--out", str(tmp_path / "results")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert marker.read_text() == "imported whole"  # not "... raised inside the import"
    assert done.returncode == 128 + signum, done.stderr
    word = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "stopped by SIGTERM"
    assert done.stderr == f"error: {word} before the run started; nothing was written\n"
    assert not (tmp_path / "results").exists()


def test_ctrl_c_to_the_process_group_while_the_fork_server_imports_is_one_line(tmp_path):
    """A terminal's Ctrl-C reaches every process of the group: the workers' fork server, still
    importing torch, must not print a KeyboardInterrupt traceback beside gradlab's line."""
    def default_sigint():  # as in a terminal (a background job of a script ignores SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen(
        [sys.executable, "-m", "gradlab", "run", "equivalence", "--jobs", "2", "--out",
         str(tmp_path / "results")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path, preexec_fn=default_sigint, start_new_session=True)
    deadline = time.monotonic() + 60
    while not any(importing_torch(pid) for pid in fork_servers_of(process.pid)):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)  # torch's library is loaded, its modules not yet
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)"), stderr


def importing_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def fork_servers_of(parent: int) -> list[int]:
    """The multiprocessing fork servers among ``parent``'s children (Linux: /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and \
                    b"forkserver" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_sigterm_at_twenty_moments_of_the_first_second_is_exit_143_and_one_line(tmp_path):
    """Twenty runs, each stopped at its own moment of its first second (while Python starts,
    gradlab's commands load, torch imports), four at a time: every one ends with the shell's
    exit status 143 and no traceback, and nothing is left looking complete."""
    moments = sorted(random.Random(27).uniform(0, 1) for _ in range(20))
    ended = []
    for batch in range(0, len(moments), 4):
        started = []
        for moment in moments[batch:batch + 4]:
            out = tmp_path / f"at-{moment:.3f}"
            started.append((moment, out, subprocess.Popen(
                [sys.executable, "-m", "gradlab", "run", "toy", "--out", str(out)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)))
        begun = time.monotonic()
        for moment, _, process in started:
            time.sleep(max(0.0, begun + moment - time.monotonic()))
            process.send_signal(signal.SIGTERM)
        for moment, out, process in started:
            _, stderr = process.communicate(timeout=120)
            ended.append((moment, out, process.returncode, stderr))
    for moment, out, code, stderr in ended:
        # before Python has installed gradlab's handlers (its first milliseconds) SIGTERM ends
        # it by the signal itself: the shell says 143 for both
        assert code in (128 + signal.SIGTERM, -signal.SIGTERM), (moment, code, stderr)
        assert "Traceback" not in stderr, (moment, stderr)
        if code > 0:
            line = stderr.strip()
            assert line.startswith("error: stopped by SIGTERM") and "\n" not in line, \
                (moment, stderr)
        for meta in out.glob("*/run.json"):  # complete only if the stop came after that
            status = json.loads(meta.read_text())["status"]
            assert status == "interrupted" or (status == "complete" and "after the run "
                                               "completed" in stderr), (moment, meta, stderr)
