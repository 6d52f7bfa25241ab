"""The command line as a user meets it: bad input, --json, list, user models, Ctrl-C."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import gradlab, run_json
from gradlab.lab import trial as lab_trial

BAD_SETS = [
    (["--set", "accum_steps=0"], "accum_steps=0"),
    (["--set", "accum_steps=-2"], "accum_steps=-2"),
    (["--set", "accum_steps=128"], "larger than batch_size=64"),
    (["--set", "batch_size=0"], "batch_size=0"),
    (["--set", "model=resnet"], "unknown model 'resnet'"),
    (["--set", "dataset=imagenet"], "unknown dataset 'imagenet'"),
    (["--set", "device=cuda"], "no CUDA device"),
    (["--set", "colour=red"], "unknown setting 'colour'"),
    (["--set", "lr=fast"], "lr = 'fast' is not a valid float"),
    (["--set", "dtype=float8"], "choose one of: float32, float64, bfloat16, float16"),
    (["--set", "model=no_such_module:net"], "cannot import module 'no_such_module'"),
    (["--set", "model=user_factories:missing"], "has no callable 'missing'"),
    (["--set", "model=user_factories:NOT_CALLABLE"], "has no callable 'NOT_CALLABLE'"),
    (["--set", "model=user_factories:broken_net"], "factory(settings, data)"),
    (["--set", "model=user_factories:exits"], "model 'user_factories:exits' called sys.exit(3)"),
    (["--set", "dataset=user_factories:line_with_a_nan", "--set", "model=user_factories:tiny_net"],
     "training examples[0] holds NaN or inf in 1 example(s) (the first: row 17)"),
    (["--set", "model=user_factories:nan_net", "--set", "dataset=user_factories:noisy_line"],
     "arm 'big-batch', the baseline: its loss is nan at the initial weights (micro-batch 1 of "
     "the first window, before any step)"),
    (["--set", "model=user_factories:frozen_net", "--set", "dataset=user_factories:noisy_line"],
     "the model has nothing to train: all 4 of its parameters are frozen"),
    (["--set", "setup=user_setups:exits_in_loss"], "your code called sys.exit(4)"),
    (["--set", "steps"], "write --set key=value"),
]


def assert_clean_failure(result, expected: str, out: Path) -> None:
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error:"), message
    assert len(message.splitlines()) == 1, message  # one line, no traceback
    assert expected in message
    assert result.stdout == ""
    assert not out.exists() or not any(out.iterdir())  # no run directory was created


@pytest.mark.parametrize(("args", "expected"), BAD_SETS, ids=[a[1] for a, _ in BAD_SETS])
def test_bad_setting_is_one_line_and_exit_2(tmp_path, args, expected):
    out = tmp_path / "results"
    if "cuda" in expected:
        pytest.importorskip("torch")
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    assert_clean_failure(gradlab("run", "equivalence", *args, "--out", out), expected, out)


def test_user_code_that_exits_while_training_is_bad_input_and_the_run_is_failed(tmp_path):
    # the loss exits at its 61st call: after gradlab's checks before the run (which call it
    # fewer times), inside a trial
    out = tmp_path / "results"
    result = gradlab("run", "equivalence", "--set", "setup=user_setups:exits_while_training",
                     "--set", "steps=3", "--out", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1:] == [
        f"error: your code called sys.exit(4) in {Path(__file__).parent / 'user_setups.py'}, "
        f"line {exit_line()} during the run; gradlab runs it in its own process: raise an "
        f"exception instead"]
    assert "Traceback" not in result.stderr
    (run_dir,) = out.iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


def test_running_out_of_memory_is_said_with_what_to_lower(tmp_path):
    out = tmp_path / "results"
    result = gradlab("run", "equivalence", "--set", "setup=user_setups:runs_out_of_memory_"
                     "while_training", "--set", "steps=3", "--jobs", "1", "--out", out)
    assert result.exit_code == 1, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the run stopped: out of memory (an allocation of 256 MiB "
                           "failed); preflight estimated "), line
    assert "Lower batch_size" in line and "grad_dtype" not in line
    (run_dir,) = out.iterdir()
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "failed" and meta["error"].startswith(line.removeprefix("error: "))


def test_out_of_memory_is_found_behind_the_error_it_caused():
    from gradlab.errors import out_of_memory

    try:
        try:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 1073741824 bytes")
        except RuntimeError:
            raise TypeError("grad_dtype 'Double'") from None
    except TypeError as later:
        assert out_of_memory(later) == "out of memory (an allocation of 1024 MiB failed)"
    assert out_of_memory(MemoryError()) == "out of memory"
    assert out_of_memory(ValueError("shapes do not match")) is None


def exit_line() -> int:
    import user_setups

    source = Path(user_setups.__file__).read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if "raise SystemExit(4)" in line)


SPECS = {
    "malformed.toml": ("[settings\nlr = 1", "not valid TOML"),
    "unknown-key.toml": ("[settings]\nlearning_rate = 0.1\n[arms.a]\nbaseline = true",
                         "unknown setting 'learning_rate'"),
    "no-baseline.toml": ("[arms.a]\naccum_steps = 2\n", "exactly one arm needs 'baseline = true'"),
    "bad-type.toml": ("[settings]\nsteps = 'many'\n", "steps = 'many' is not a valid int"),
    "bad-expect.toml": ("[arms.a]\nbaseline = true\nexpect = 'same'\n", "expect = 'same'"),
    "top-level.toml": ("[setting]\nlr = 1\n", "unknown key 'setting'"),
}


def test_a_spec_saved_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.toml"  # as some Windows editors save UTF-8
    path.write_bytes(b"\xef\xbb\xbf[settings]\nsteps = 3\n[arms.a]\nbaseline = true\n"
                     b"[arms.b]\naccum_steps = 2\n")
    result = gradlab("show", path)
    assert result.exit_code == 0, result.output
    assert "not valid TOML" not in result.output


@pytest.mark.parametrize("name", SPECS)
def test_bad_spec_file_is_one_line_and_exit_2(tmp_path, name):
    text, expected = SPECS[name]
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "results"
    result = gradlab("run", path, "--out", out)
    assert_clean_failure(result, expected, out)
    assert name in result.stderr  # names the file


def test_missing_spec_file_and_unknown_name(tmp_path):
    out = tmp_path / "results"
    assert_clean_failure(gradlab("run", tmp_path / "nope.toml", "--out", out),
                         "does not exist", out)
    assert_clean_failure(gradlab("run", "equivalance", "--out", out),
                         "no built-in experiment 'equivalance'", out)


def test_user_model_and_dataset_by_import_path(tmp_path):
    doc = run_json("equivalence", "--set", "model=user_factories:tiny_net",
                   "--set", "dataset=user_factories:noisy_line", "--set", "accum_steps=4",
                   "--set", "dtype=float64", "--set", "steps=3", "--out", tmp_path)
    assert doc["trials"]  # the user's model has no norm layer, so the norm axis changes nothing
    for trial in doc["trials"]:
        arms = {a["arm"]: a for a in trial["arms"]}
        assert arms["accumulated"]["max_rel_grad_err"] <= 1e-12
        assert arms["no-loss-scaling"]["max_rel_grad_err"] == pytest.approx(3.0, rel=1e-9)


def test_json_is_the_only_thing_on_stdout(tmp_path):
    result = gradlab("run", "toy", "--json", "--out", tmp_path)
    assert result.exit_code == 0
    doc = json.loads(result.stdout)  # raises if anything else is there
    assert set(doc) >= {"run_dir", "status", "trials"}
    assert doc["status"] == "complete"
    arm = doc["trials"][0]["arms"][0]
    for key in ("arm", "baseline", "max_rel_grad_err", "max_abs_grad_err", "min_grad_cosine",
                "final_loss"):
        assert key in arm


def test_run_json_records_the_run(tmp_path):
    doc = run_json("toy", "--out", tmp_path)
    meta = json.loads((Path(doc["run_dir"]) / "run.json").read_text())
    assert meta["status"] == "complete"
    assert meta["experiment"] == "toy"
    assert set(meta["versions"]) >= {"python", "torch", "gradlab"}
    assert meta["device"] == "cpu"
    assert meta["started"] <= meta["ended"]
    arms = meta["trials"][0]["arms"]
    assert arms["accumulated"]["settings"]["accum_steps"] == 2


def test_same_spec_and_seed_give_identical_csvs(tmp_path):
    args = ("equivalence", "--set", "accum_steps=4", "--set", "steps=4")
    first = Path(run_json(*args, "--out", tmp_path / "a")["run_dir"])
    second = Path(run_json(*args, "--out", tmp_path / "b")["run_dir"])
    csvs = sorted(p.name for p in first.glob("*.csv"))
    assert csvs == sorted(p.name for p in second.glob("*.csv"))
    assert "summary.csv" in csvs
    for name in csvs:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_a_different_seed_gives_different_numbers(tmp_path):
    args = ("equivalence", "--set", "accum_steps=4", "--set", "steps=2")
    a = run_json(*args, "--set", "seed=0", "--out", tmp_path)
    b = run_json(*args, "--set", "seed=1", "--out", tmp_path)
    assert a["trials"][0]["arms"][0]["final_loss"] != b["trials"][0]["arms"][0]["final_loss"]


def test_sweep_from_the_command_line(tmp_path):
    doc = run_json("toy", "--set", "lr=0.01,0.02", "--out", tmp_path)
    assert [t["settings"] for t in doc["trials"]] == [{"lr": 0.01}, {"lr": 0.02}]


def test_ctrl_c_leaves_a_readable_run_marked_interrupted(tmp_path, monkeypatch):
    real = lab_trial.run_trial
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lab_trial, "run_trial", interrupt_second)
    # in this process (--jobs 1): the patched run_trial is not in a worker's
    result = gradlab("run", "toy", "--set", "lr=0.01,0.02,0.03", "--jobs", "1", "--out",
                     tmp_path)
    assert result.exit_code == 130
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    import pandas as pd
    assert set(pd.read_csv(run_dir / "summary.csv").trial) == {0}  # the finished trial is kept


def test_a_crash_mid_run_is_marked_failed(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise FloatingPointError("overflow in step 3")

    monkeypatch.setattr(lab_trial, "run_trial", explode)
    result = gradlab("run", "toy", "--out", tmp_path)
    assert result.exit_code == 1
    assert "overflow in step 3" in result.stderr
    (run_dir,) = tmp_path.iterdir()
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "failed"
    assert "FloatingPointError" in meta["error"]


def test_list_shows_experiments_models_datasets_settings():
    result = gradlab("list", "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert {"toy", "equivalence"} <= set(doc["experiments"])
    assert set(doc["models"]) == {"toy-linear", "mlp", "cnn", "gru-lm", "transformer-lm",
                                  "two-heads"}
    assert set(doc["datasets"]) == {"toy-pairs", "regression", "digits", "docstrings",
                                    "two-tasks"}
    names = {s["name"] for s in doc["settings"]}
    assert {"batch_size", "accum_steps", "model", "dataset", "norm", "optimizer", "lr", "steps",
            "seed", "dtype", "device"} <= names
    human = gradlab("list")
    assert "accum_steps" in human.stdout and "equivalence" in human.stdout
    assert human.stderr == ""  # the tables are the command's result
    assert "Linear-[norm]-ReLU" in human.stdout  # text, not rich markup that eats [norm]


@pytest.mark.parametrize("command", [[], ["run"], ["list"]])
def test_help_teaches_by_example(command):
    result = gradlab(*command, "--help")
    assert result.exit_code == 0
    assert "gradlab" in result.stdout
    if command == ["run"]:
        assert "gradlab run toy" in result.stdout and "--set" in result.stdout


def test_every_builtin_spec_names_its_command():
    from gradlab.config.spec import builtin_specs
    for name, path in builtin_specs().items():
        assert path.read_text().splitlines()[0] == f"# gradlab run {name}"


@pytest.mark.parametrize("jobs", ["1", pytest.param("2", marks=pytest.mark.slow)])
def test_run_json_keeps_what_user_code_prints_off_stdout(tmp_path, jobs):
    """stdout is the one JSON document; the factory's print goes to stderr, from this
    process (--jobs 1) and from the worker processes alike (--jobs 2)."""
    command = [str(Path(sys.executable).with_name("gradlab")), "run", "equivalence",
               "--set", "model=user_factories:printing_net",
               "--set", "dataset=user_factories:noisy_line", "--set", "accum_steps=1,2",
               "--set", "steps=2", "--set", "norm=none", "--set", "seed=0,1",
               "--jobs", jobs, "--out", str(tmp_path), "--json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "complete"
    assert "building my model" in done.stderr
