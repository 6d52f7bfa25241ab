"""Bad input of every kind gets one line naming where it came from, exit 2, and no run.

Each test reproduces a case a user hit (issue 9): a traceback, a wrong place named, an
override silently ignored, or a run directory left behind.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import gradlab, run_json
from gradlab.config import spec
from gradlab.errors import GradlabError
from gradlab.lab import preflight
from gradlab.lab import trial as lab_trial
from gradlab.record import store
from gradlab.record.meta import RunMeta


def assert_bad_input(result, out: Path | None, *fragments: str, absent: tuple = ()) -> str:
    """Exit 2, one line on stderr starting 'error:', naming every fragment; no run written."""
    assert result.exit_code == 2, (result.exception, result.output)
    message = result.stderr.strip()
    assert message.startswith("error:"), message
    assert len(message.splitlines()) == 1, message
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    for fragment in absent:
        assert fragment not in message, (fragment, message)
    if out is not None:
        assert not out.exists() or not any(out.rglob("run.json")), list(out.rglob("*"))
    return message


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- user modules

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module into a folder on sys.path; returns a function (name, source) -> path."""
    folder = tmp_path / "user"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    importlib.invalidate_caches()  # modules written this second must be found

    def make(name: str, source: str) -> Path:
        return write(folder, f"{name}.py", source)
    return make


def test_a_user_module_with_a_syntax_error_names_the_file_and_line(tmp_path, user_module):
    user_module("broken_syntax", "import torch\n\ndef make_net(settings, data:\n    pass\n")
    out = tmp_path / "results"
    result = gradlab("run", "toy", "--set", "model=broken_syntax:make_net", "--out", out)
    assert_bad_input(result, out, "model 'broken_syntax:make_net'", "broken_syntax.py",
                     "line 3", "SyntaxError")


def test_an_exception_while_importing_a_user_module_names_the_file_and_line(tmp_path,
                                                                            user_module):
    user_module("raises_on_import", "import os\nraise RuntimeError('needs a GPU')\n")
    out = tmp_path / "results"
    result = gradlab("run", "toy", "--set", "dataset=raises_on_import:make", "--out", out)
    assert_bad_input(result, out, "dataset 'raises_on_import:make'", "raises_on_import.py",
                     "line 2", "RuntimeError: needs a GPU")


@pytest.mark.parametrize("value", [":make", "pkg.module:", ".relative:make", "a..b:make",
                                   "mod ule:make"])
def test_an_import_path_without_a_module_or_a_factory_is_refused(tmp_path, value):
    out = tmp_path / "results"
    result = gradlab("run", "toy", "--set", f"model={value}", "--out", out)
    assert_bad_input(result, out, "--set model", "pkg.module:factory")


# ----------------------------------------------------------------------------- --out

def test_out_that_cannot_hold_a_run_directory_is_one_line(tmp_path):
    a_file = write(tmp_path, "a-file", "not a folder")
    cases = {"/proc/gradlab-forbidden": "/proc/gradlab-forbidden",
             str(a_file): "is a file", str(a_file / "under"): "is a file",
             # a folder name longer than the system allows (255 bytes), at any depth
             str(tmp_path / ("d" * 300)): "File name too long",
             str(tmp_path / ("d" * 300) / "runs"): "File name too long"}
    for out, fragment in cases.items():
        result = gradlab("run", "toy", "--out", out)
        assert_bad_input(result, None, "--out", fragment)
    assert a_file.read_text() == "not a folder"
    assert not Path("/proc/gradlab-forbidden").exists()


def test_out_in_a_folder_without_write_permission(tmp_path, monkeypatch):
    import os
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere: refuse the way the system would
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self.parent == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    result = gradlab("run", "toy", "--out", locked / "runs")
    assert_bad_input(result, locked, "--out", "Permission denied", str(locked / "runs"))
    assert list(locked.iterdir()) == []


def test_a_run_directory_that_cannot_be_written_is_removed(tmp_path, monkeypatch):
    def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.RunDir, "_write_meta", disk_full)
    out = tmp_path / "new" / "results"
    result = gradlab("run", "toy", "--out", out)
    assert_bad_input(result, None, "No space left on device", "--out")
    assert not (tmp_path / "new").exists()  # the folders it created are gone too


# ----------------------------------------------------------------------------- --set and arms

def test_a_set_that_every_arm_overrides_is_refused_naming_the_arms(tmp_path):
    out = tmp_path / "results"
    result = gradlab("run", "toy", "--set", "accum_steps=1", "--out", out)
    assert_bad_input(result, out, "--set accum_steps=1", "big-batch", "accumulated",
                     "--set accumulated.accum_steps=1")


def test_a_set_value_is_always_validated(tmp_path):
    out = tmp_path / "results"
    assert_bad_input(gradlab("run", "toy", "--set", "accum_steps=0", "--out", out), out,
                     "--set accum_steps", "accum_steps=0", "at least 1")
    assert_bad_input(gradlab("run", "toy", "--set", "accumulated.accum_steps=0", "--out", out),
                     out, "--set accumulated.accum_steps", "at least 1")


def test_a_set_for_one_arm_beats_the_arms_own_value(tmp_path):
    doc = run_json("toy", "--set", "accumulated.accum_steps=1", "--set", "lr=0.02",
                   "--out", tmp_path)
    arms = {a["arm"]: a for a in doc["trials"][0]["arms"]}
    assert arms["accumulated"]["accum_steps"] == 1
    assert arms["big-batch"]["accum_steps"] == 1
    meta = json.loads((Path(doc["run_dir"]) / "run.json").read_text())
    assert meta["trials"][0]["arms"]["accumulated"]["settings"]["lr"] == 0.02
    assert meta["overrides"] == ["accumulated.accum_steps=1", "lr=0.02"]


def test_a_set_some_arms_override_says_which_keep_their_own(tmp_path):
    result = gradlab("run", "toy", "--set", "loss_scale=by-size", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "note: --set loss_scale=by-size applies to arm big-batch; arm accumulated keeps " \
           "its own loss_scale = 'by-count'" in result.stderr


@pytest.mark.parametrize(("args", "fragments"), [
    (["nobody.lr=0.1"], ("--set nobody.lr", "no arm 'nobody'", "big-batch, accumulated")),
    (["accumulated.lr=0.1,0.2"], ("--set accumulated.lr", "one value")),
    (["accumulated.colour=red"], ("--set accumulated.colour", "unknown setting 'colour'")),
])
def test_bad_per_arm_sets(tmp_path, args, fragments):
    out = tmp_path / "results"
    assert_bad_input(gradlab("run", "toy", *[x for a in args for x in ("--set", a)],
                             "--out", out), out, *fragments)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay"])
def test_non_finite_floats_are_refused(tmp_path, key, value):
    out = tmp_path / "results"
    assert_bad_input(gradlab("run", "toy", "--set", f"{key}={value}", "--out", out), out,
                     f"--set {key}", "finite")


def test_non_finite_floats_in_a_spec_name_the_section(tmp_path):
    path = write(tmp_path, "nan.toml", "[settings]\nlr = nan\n[arms.a]\nbaseline = true\n"
                                       "[arms.b]\naccum_steps = 2\n")
    out = tmp_path / "results"
    assert_bad_input(gradlab("run", path, "--out", out), out, "nan.toml [settings]", "lr",
                     "finite")


# ----------------------------------------------------------------------------- empty specs

SPECS_WITHOUT_ARMS = {
    "empty.toml": "",
    "comment-only.toml": "# gradlab run comment-only.toml\n",
    "settings-only.toml": "[settings]\nlr = 0.1\n",
    "empty-arms.toml": "[settings]\nlr = 0.1\n[arms]\n",
}


@pytest.mark.parametrize("name", SPECS_WITHOUT_ARMS)
def test_a_spec_without_arms_says_what_to_add(tmp_path, name):
    path = write(tmp_path, name, SPECS_WITHOUT_ARMS[name])
    out = tmp_path / "results"
    assert_bad_input(gradlab("run", path, "--out", out), out, name, "no arms",
                     "[arms.big-batch]", "baseline = true")


def test_a_lone_baseline_arm_needs_a_sweep(tmp_path):
    out = tmp_path / "results"
    lone = write(tmp_path, "lone.toml", "[arms.only]\nbaseline = true\n")
    assert_bad_input(gradlab("run", lone, "--out", out), out, "lone.toml", "one arm",
                     "[sweep]", "add an arm")
    swept = write(tmp_path, "swept.toml", "[settings]\nsteps = 1\n[arms.only]\nbaseline = true\n"
                                          "[sweep]\nlr = [0.01, 0.02]\n")
    doc = run_json(swept, "--out", out)
    assert [t["settings"] for t in doc["trials"]] == [{"lr": 0.01}, {"lr": 0.02}]
    assert spec.load_spec("norm-training").arms.keys() == {"trained"}  # the built-in still loads


def test_baseline_must_be_true_or_false(tmp_path):
    path = write(tmp_path, "yes.toml", "[arms.a]\nbaseline = true\n[arms.b]\nbaseline = 'no'\n")
    out = tmp_path / "results"
    assert_bad_input(gradlab("run", path, "--out", out), out, "yes.toml [arms.b]", "baseline",
                     "true or false")


# ----------------------------------------------------------------------------- many trials

def test_more_than_a_thousand_trials_need_yes(tmp_path, monkeypatch):
    seeds = ",".join(str(i) for i in range(1001))
    out = tmp_path / "results"
    preflights = []
    monkeypatch.setattr(preflight, "preflight", lambda trials: preflights.append(len(trials)))
    message = assert_bad_input(gradlab("run", "toy", "--set", f"seed={seeds}", "--out", out),
                               out, "1001 trials", "--yes")
    assert preflights == [], message  # refused before any model was built

    def stop(trials):
        preflights.append(len(trials))
        raise GradlabError("stopped after the count")

    monkeypatch.setattr(preflight, "preflight", stop)
    assert_bad_input(gradlab("run", "toy", "--set", f"seed={seeds}", "--yes", "--out", out),
                     out, "stopped after the count")
    assert preflights == [1001]


def test_the_plan_is_printed_before_the_run(tmp_path):
    result = gradlab("run", "toy", "--set", "lr=0.01,0.02", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "toy: 2 trials x 2 arms (big-batch, accumulated) = 4 trainings, 4 optimizer " \
           "steps in all" in result.stderr


# ----------------------------------------------------------------------------- zipped axes

def test_setting_a_key_of_a_zipped_axis_drops_the_axis(tmp_path):
    result = gradlab("run", "equivalence", "--set", "model=user_factories:tiny_net",
                     "--set", "dataset=user_factories:noisy_line", "--set", "accum_steps=4",
                     "--set", "dtype=float64", "--set", "steps=2", "--json", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [t["settings"] for t in doc["trials"]] == [{}]  # one trial: nothing left to sweep
    assert "note: --set model replaces the sweep axis 'task'" in result.stderr
    summary = pd.read_csv(Path(doc["run_dir"]) / "summary.csv")
    assert list(summary["arm"]) == ["big-batch", "accumulated", "no-loss-scaling"]


# ----------------------------------------------------------------------------- messages

@pytest.mark.parametrize(("text", "fragments"), [
    ("[arms.a]\nbaseline = true\n[arms.b]\nexpect = 'same'\n",
     ("bad.toml [arms.b]", "expect = 'same'", "'equivalent', 'differs'")),
    ("[arms.a]\nbaseline = true\n[arms.b]\nlearning = 1\n",
     ("bad.toml [arms.b]", "unknown setting 'learning'")),
    ("[arms.a]\nbaseline = true\n[arms.b]\naccum_steps = 0\n",
     ("bad.toml [arms.b]", "accum_steps=0")),
    ("[arms]\na = 3\n", ("bad.toml", "[arms.a]", "must be a table")),
    ("[arms.a]\nbaseline = true\n[arms.b]\n[sweep]\nlr = [0.1, -1.0]\n",
     ("bad.toml [sweep] lr", "lr=-1.0", "cannot be negative")),
    ("[arms.a]\nbaseline = true\n[arms.b]\n[sweep]\ncase = [{norm = 'gn'}, {lr = -1}]\n",
     ("bad.toml [sweep] case", "lr=-1.0")),
    ("name = '../elsewhere'\n[arms.a]\nbaseline = true\n[arms.b]\n",
     ("bad.toml", "name = '../elsewhere'", "without '/'")),
    ("[settings]\nbatch_size = 8\n[arms.a]\nbaseline = true\n[arms.b]\naccum_steps = 16\n",
     ("arm 'b'", "accum_steps=16 (", "bad.toml [arms.b]) is larger than batch_size=8 (",
      "bad.toml [settings])")),
])
def test_messages_name_the_section_and_arm(tmp_path, text, fragments):
    path = write(tmp_path, "bad.toml", text)
    out = tmp_path / "results"
    assert_bad_input(gradlab("run", path, "--out", out), out, *fragments)


def test_a_bad_set_blames_the_set_not_the_spec(tmp_path):
    out = tmp_path / "results"
    assert_bad_input(gradlab("run", "toy", "--set", "lr=-1", "--out", out), out,
                     "--set lr", "lr=-1.0", "cannot be negative", absent=("toy.toml",))
    assert_bad_input(gradlab("run", "equivalence", "--set", "accum_steps=128", "--out", out),
                     out, "accum_steps=128 (--set accum_steps)", "batch_size=64")


def test_a_folder_given_as_the_spec(tmp_path):
    out = tmp_path / "results"
    assert_bad_input(gradlab("run", tmp_path, "--out", out), out, "is a folder",
                     absent=("does not exist",))


# ----------------------------------------------------------------------------- run.json

def test_run_json_records_the_process_and_host(tmp_path):
    import os
    import socket
    doc = run_json("toy", "--out", tmp_path)
    meta = json.loads((Path(doc["run_dir"]) / "run.json").read_text())
    assert meta["pid"] == os.getpid()  # in-process here; the gradlab process in real use
    assert meta["host"] == socket.gethostname()


def fake_running(run: Path, pid: int, host: str) -> None:
    meta = json.loads((run / "run.json").read_text())
    meta.update(status="running", ended=None, pid=pid, host=host)
    (run / "run.json").write_text(json.dumps(meta))


def test_compare_tells_a_dead_run_from_a_running_one(tmp_path):
    import socket
    import subprocess
    import sys
    run = Path(run_json("toy", "--out", tmp_path)["run_dir"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    fake_running(run, gone.pid, socket.gethostname())
    for command in ("compare", "plot", "report"):
        assert_bad_input(gradlab(command, run), None,
                         f"its process (pid {gone.pid}) is gone; the run was cut off",
                         absent=("still running",))
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake_running(run, alive.pid, socket.gethostname())
        assert_bad_input(gradlab("compare", run), None, "is still running", f"pid {alive.pid}")
    finally:
        alive.kill()
        alive.wait()
    fake_running(run, gone.pid, "elsewhere.example")
    assert_bad_input(gradlab("compare", run), None, "still running on host elsewhere.example")


# ----------------------------------------------------------------------------- --json on failure

def failure_document(result, status: str, code: int) -> dict:
    assert result.exit_code == code, result.output
    doc = json.loads(result.stdout)  # one JSON document, nothing else
    assert doc["status"] == status
    assert doc["error"] and "\n" not in doc["error"]
    assert result.stderr.strip().startswith("error:")
    return doc


def test_json_reports_bad_input(tmp_path):
    doc = failure_document(gradlab("run", "toy", "--set", "lr=-1", "--json", "--out", tmp_path),
                           "bad-input", 2)
    assert doc["run_dir"] is None and "lr=-1.0" in doc["error"]


def test_json_reports_a_failed_run(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise FloatingPointError("overflow in step 3")

    monkeypatch.setattr(lab_trial, "run_trial", explode)
    doc = failure_document(gradlab("run", "toy", "--json", "--out", tmp_path), "failed", 1)
    assert "overflow in step 3" in doc["error"]
    assert json.loads((Path(doc["run_dir"]) / "run.json").read_text())["status"] == "failed"


def test_json_reports_an_interrupted_run(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lab_trial, "run_trial", interrupt)
    doc = failure_document(gradlab("run", "toy", "--json", "--out", tmp_path), "interrupted", 130)
    meta = json.loads((Path(doc["run_dir"]) / "run.json").read_text())
    assert meta["status"] == "interrupted" and meta["ended"]


def test_a_stop_during_a_write_waits_for_the_write_to_end(tmp_path, monkeypatch):
    run = store.RunDir(tmp_path, RunMeta("writes", "", [], "cpu"))
    real_to_csv = pd.DataFrame.to_csv

    def signal_arrives_mid_write(self, *args, **kwargs):
        store.raise_after_write(KeyboardInterrupt())  # what the SIGINT handler does
        return real_to_csv(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", signal_arrives_mid_write)
    with pytest.raises(KeyboardInterrupt):
        run.append("summary", [{"trial": 0, "arm": "a"}, {"trial": 0, "arm": "b"}])
    assert (run.path / "summary.csv").read_text() == "trial,arm\n0,a\n0,b\n"
    assert run.finished_trials == {0}
    run.finish("interrupted", "SIGINT")  # the next write is not cut short by the old stop
    assert json.loads((run.path / "run.json").read_text())["status"] == "interrupted"
