"""--jobs: trials in worker processes. The same bytes for any number of workers, one
progress count, a worker's error as the run's, and no worker outliving gradlab."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from conftest import gradlab
from gradlab.config import spec
from gradlab.lab import plan, trial
from gradlab.record import store
from gradlab.record.meta import RunMeta

TESTS = Path(__file__).parent
# the equivalence experiment cut down: mlp, cnn and cnn+GroupNorm at N = 1, 2, 4; 9 trials
SMALL = ["equivalence", "--set", "dtype=float32", "--set", "accum_steps=1,2,4",
         "--set", "steps=3"]


def run_with_jobs(out: Path, jobs: int, *args: str) -> Path:
    result = gradlab("run", *args, "--jobs", str(jobs), "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    return Path(json.loads(result.stdout)["run_dir"])


def test_the_csvs_are_the_same_bytes_for_any_number_of_jobs(tmp_path):
    one = run_with_jobs(tmp_path / "one", 1, *SMALL)
    three = run_with_jobs(tmp_path / "three", 3, *SMALL)
    names = sorted(p.name for p in one.glob("*.csv"))
    assert names == sorted(p.name for p in three.glob("*.csv"))
    assert {"summary.csv", "steps.csv", "probe.csv"} <= set(names)
    for name in names:
        assert filecmp.cmp(one / name, three / name, shallow=False), name
    summary = pd.read_csv(three / "summary.csv")
    assert list(summary["trial"]) == sorted(summary["trial"])  # written in trial order
    assert set(summary["trial"]) == set(range(9))
    meta1, meta3 = (json.loads((d / "run.json").read_text()) for d in (one, three))
    assert (meta1["jobs"], meta1["workers"], meta1["threads"]) == (1, 1, 1)
    assert (meta3["jobs"], meta3["workers"], meta3["threads"]) == (3, 3, 1)


def test_fewer_trials_than_jobs_give_each_trial_the_cores_left_over():
    trials = spec.expand(spec.apply_overrides(spec.load_spec("toy"), ["seed=0,1"]))
    estimate = plan.Plan(2, 4, 1.0, 2**20, None)
    workers = plan.spread(trials, 7, estimate).workers
    assert (workers.processes, workers.threads) == (2, 3)
    alone = plan.spread(trials[:1], 4, estimate).workers
    assert (alone.processes, alone.threads) == (1, 4)  # one trial gets every core
    assert plan.spread(trials, 1, estimate).workers.threads == 1
    # what does not fit in memory twice runs once at a time
    tight = plan.Plan(2, 4, 1.0, 2**30, available_bytes=int(1.5 * (2**30 + 400 * 2**20)))
    assert plan.spread(trials, 2, tight).workers.processes == 1


def test_a_threads_setting_is_the_trials_own():
    trials = spec.expand(spec.apply_overrides(spec.load_spec("toy"), ["threads=3"]))
    workers = plan.Workers(jobs=2, processes=2, threads=1)
    assert workers.threads_of(trials[0]) == 3
    with pytest.raises(spec.GradlabError, match="one thread count"):
        spec.expand(spec.apply_overrides(spec.load_spec("toy"), ["accumulated.threads=2"]))


def test_progress_from_every_worker_reaches_the_parent(tmp_path):
    trials = spec.expand(spec.apply_overrides(spec.load_spec("toy"), ["seed=0,1,2"]))
    run_dir = store.RunDir(tmp_path, RunMeta("toy", "", [{"trial": t.index, "swept": t.swept}
                                                         for t in trials], "cpu"))
    steps: list[int] = []
    results = trial.run_trials(trials, run_dir, steps.append,
                                plan.Workers(jobs=2, processes=2, threads=1))
    assert sum(steps) == sum(a.settings.steps for t in trials for a in t.arms) == 6
    assert [r["summary"][0]["trial"] for r in results] == [0, 1, 2]
    assert list(pd.read_csv(run_dir.path / "summary.csv")["trial"]) == [0, 0, 1, 1, 2, 2]


def test_an_error_in_a_worker_fails_the_run_with_the_workers_traceback(tmp_path):
    result = gradlab("run", "toy", "--set", "setup=user_setups:breaks_for_seed_1",
                     "--set", "seed=0,1,2", "--jobs", "2", "--out", tmp_path)
    assert result.exit_code == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run failed: FloatingPointError: overflow in the user's model")
    (run_dir,) = tmp_path.iterdir()
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "failed"
    assert "user_setups.py" in meta["error"] and "in forward" in meta["error"]  # the worker's
    summary = run_dir / "summary.csv"  # none when no trial had finished when it failed
    kept = set(pd.read_csv(summary)["trial"]) if summary.exists() else set()
    assert 1 not in kept and kept <= {0, 2}


def test_bad_input_a_worker_meets_is_one_line_and_exit_2(tmp_path):
    result = gradlab("run", "toy", "--set", "setup=user_setups:refuses_seed_1",
                     "--set", "seed=0,1", "--jobs", "2", "--out", tmp_path)
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: setup 'user_setups:refuses_seed_1' failed: ValueError: no data for seed 1; a "
        "setup factory is called as factory(settings)")
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


# ----------------------------------------------------------------------------- stops

# 40 trials of 100 steps: long enough to stop with workers mid-trial
TRIALS = 40
MANY = ["equivalence", "--set", "model=mlp", "--set", "dataset=regression",
        "--set", "dtype=float64", "--set", "accum_steps=2", "--set", "steps=100",
        "--set", "seed=" + ",".join(map(str, range(TRIALS))), "--jobs", "2"]


@dataclass
class Stop:
    signum: int
    whole_group: bool  # Ctrl-C in a terminal reaches every process of the foreground group
    folder: Path | None = None
    proc: subprocess.Popen | None = None
    before: set[int] | None = None  # the run's processes when the signal went
    after: set[int] | None = None  # those still there once gradlab had exited
    stderr: str = ""


STOPS = {"SIGTERM": Stop(signal.SIGTERM, False), "SIGKILL": Stop(signal.SIGKILL, False),
         "Ctrl-C": Stop(signal.SIGINT, True)}


def session(sid: int) -> set[int]:
    """The processes of a session: gradlab, its fork server, its workers."""
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[3] == str(sid) and fields[0] != "Z":  # a zombie is gone, only not reaped
            pids.add(int(entry))
    return pids


def wait_until(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture(scope="module")
def stops(tmp_path_factory) -> dict[str, Stop]:
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc (Linux) to see the worker processes")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    for case in STOPS.values():  # all at once: the module takes about as long as one
        case.folder = tmp_path_factory.mktemp("stop")
        case.proc = subprocess.Popen([sys.executable, "-m", "gradlab.cli", "run", *MANY,
                                      "--out", str(case.folder)], env=env,
                                     start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
    for case in STOPS.values():
        # a trial on disk: the workers are running
        wait_until(lambda c=case: any(c.folder.glob("*/summary.csv")) or
                   c.proc.poll() is not None, 240)
        case.before = session(case.proc.pid)
        if case.whole_group:
            os.killpg(case.proc.pid, case.signum)
        else:
            case.proc.send_signal(case.signum)
    for case in STOPS.values():
        try:
            case.stderr = case.proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            case.proc.kill()
            case.stderr = case.proc.communicate()[1]
        wait_until(lambda c=case: not session(c.proc.pid), 30)
        case.after = session(case.proc.pid)
    return STOPS


@pytest.mark.slow  # three runs stopped, with their workers
@pytest.mark.parametrize("name", list(STOPS))
def test_no_worker_outlives_gradlab(stops, name):
    case = stops[name]
    # gradlab, the fork server (and resource tracker) and two workers were running
    assert len(case.before) >= 4, (case.before, case.stderr)
    assert case.after == set()


@pytest.mark.slow  # three runs stopped, with their workers
@pytest.mark.parametrize("name", ["SIGTERM", "Ctrl-C"])
def test_a_stop_ends_in_one_line_and_keeps_the_finished_trials(stops, name):
    case = stops[name]
    assert case.proc.returncode == 128 + case.signum, case.stderr
    assert "Traceback" not in case.stderr
    last = case.stderr.strip().splitlines()[-1]
    (run_dir,) = case.folder.iterdir()
    summary = pd.read_csv(run_dir / "summary.csv")
    kept = summary["trial"].nunique()
    assert 0 < kept < TRIALS
    assert (summary.groupby("trial").size() == 3).all()  # every kept trial is whole
    assert f"{kept} of {TRIALS} trials finished" in last
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "interrupted" and meta["workers"] == 2


@pytest.mark.slow  # three runs stopped, with their workers
def test_a_killed_gradlab_leaves_its_run_marked_running(stops):
    case = stops["SIGKILL"]
    assert case.proc.returncode == -signal.SIGKILL
    (run_dir,) = case.folder.iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    result = gradlab("compare", run_dir)  # and compare says its process is gone
    assert result.exit_code == 2 and "is gone" in result.stderr


def test_the_default_jobs_are_the_cores_the_load_leaves_idle(monkeypatch):
    from gradlab.lab import parallel, plan

    monkeypatch.setattr(parallel, "usable_cores", lambda: 4)
    monkeypatch.setattr(parallel, "busy_elsewhere", lambda: 2)
    long_run = plan.Plan(1, 1, 60.0, 0, None)
    assert plan.default_jobs([], long_run, parallel.idle_cores()) == 2
    monkeypatch.setattr(parallel, "busy_elsewhere", lambda: 7)
    assert plan.default_jobs([], long_run, parallel.idle_cores()) == 1  # busier than the cores
    assert plan.default_jobs([], plan.Plan(1, 1, 3.0, 0, None), 4) == 1  # a short run
    assert plan.default_jobs([], None, 4) == 4  # before preflight: not known to be short


@pytest.mark.parametrize("seeds, idle, jobs, warmed, threads", [
    ("0,1,2", 2, None, True, 1), ("0,1,2", 1, None, False, 1), ("0,1,2", 1, 2, True, 1),
    ("0,1,2", 2, 1, False, 1), ("0", 2, None, False, 2)])
def test_the_fork_server_starts_before_torch_is_imported_when_workers_are_likely(
        seeds, idle, jobs, warmed, threads, tmp_path):
    # the fork server's imports (torch, torch._dynamo: 2 to 3 s) overlap this process's
    # imports and preflight, which times the setups with the threads each trial will get
    probe = tmp_path / "probe.py"
    probe.write_text(f"""
import os
import sys
from gradlab import cli
from gradlab.lab import parallel
parallel.idle_cores = lambda: {idle}
parallel.warm_up = lambda: print("warm_up", "torch" in sys.modules)
def spread(trials, jobs, idle):
    import torch
    from gradlab.lab import plan, preflight
    preflight.preflight = lambda trials: print("preflight", torch.get_num_threads()) or \
        plan.Plan(len(trials), len(trials), 60.0, 0, None)
    estimate = spread_as_is(trials, jobs, idle)
    print("workers", estimate.workers.processes, estimate.workers.threads, flush=True)
    os._exit(0)  # here, before the run (a SystemExit would be the user's code exiting)
from gradlab.lab import experiment
spread_as_is, experiment.spread = experiment.spread, spread
jobs = {[f"--jobs={jobs}"] if jobs else []!r}
sys.argv = ["gradlab", "run", "toy", "--set", "seed={seeds}", *jobs]
cli.main()
""")
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True,
                          cwd=tmp_path, check=True)
    processes = min(jobs or idle, len(seeds.split(",")))
    assert done.stdout.splitlines() == ["warm_up False"] * warmed + [
        f"preflight {threads}", f"workers {processes} {threads}"], done.stderr


def test_processes_running_elsewhere_are_read_off_this_moment():
    from gradlab.lab import parallel

    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        assert parallel.busy_elsewhere() >= 2
    finally:
        for spinner in spinners:
            spinner.kill()


def test_digits_are_read_without_importing_scikit_learn():
    # importing scikit-learn costs about 1 s, in the gradlab process and in every worker
    from sklearn.datasets import load_digits

    from gradlab.zoo import data

    done = subprocess.run([sys.executable, "-c", "import sys; from gradlab.zoo import data; "
                                                 "data.digits_table(); print('sklearn' in "
                                                 "sys.modules)"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    pixels, labels = data.digits_table()
    bunch = load_digits()
    assert pixels.shape == (1797, 64) and pixels.dtype == bunch.data.dtype
    assert (pixels == bunch.data).all() and (labels == bunch.target).all()


def test_a_pipe_reading_the_run_directory_ends_when_gradlab_does(tmp_path):
    # the fork server outlives gradlab by its own exit (about a second): were it holding
    # gradlab's stdout, `gradlab run | xargs gradlab report` would wait for it too
    done = subprocess.Popen([sys.executable, "-m", "gradlab.cli", "run", "toy", "--set",
                             "seed=0,1", "--jobs", "2", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert done.wait(timeout=120) == 0
    os.set_blocking(done.stdout.fileno(), False)
    printed = done.stdout.read()  # everything, and the end: no writer is left
    assert printed is not None and printed.decode().strip() == str(next(tmp_path.iterdir()))
    assert os.read(done.stdout.fileno(), 1) == b""


def test_preflight_leaves_torch_dynamo_to_the_workers():
    # building an optimizer imports torch._dynamo (about 1 s); preflight needs one only for
    # a GradScaler, so a run whose trials go to workers does not pay for it in gradlab
    probe = ("import sys\nfrom gradlab import cli\nfrom gradlab.lab import preflight\n"
             "from gradlab.lab import experiment\n"
             "_, trials = experiment.resolve('equivalence', ['accum_steps=1,2'])\n"
             "preflight.preflight(trials)\nprint('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False", done.stderr


def test_workers_take_the_longest_trials_first_and_the_files_keep_trial_order(tmp_path):
    trials = spec.expand(spec.apply_overrides(spec.load_spec("toy"), ["seed=0,1,2"]))
    estimate = plan.Plan(3, 6, 6.0, 2**20, None, trial_seconds=[1.0, 3.0, 2.0])
    assert plan.spread(trials, 2, estimate).workers.order == [1, 2, 0]
    run_dir = store.RunDir(tmp_path, RunMeta("toy", "", [{"trial": t.index, "swept": t.swept}
                                                         for t in trials], "cpu"))
    trial.run_trials(trials, run_dir, workers=plan.Workers(2, 2, 1, order=[2, 1, 0]))
    assert list(pd.read_csv(run_dir.path / "summary.csv")["trial"]) == [0, 0, 1, 1, 2, 2]
