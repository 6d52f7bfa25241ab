"""The library API: gradlab.run() and gradlab.load_run(), as a user calls them from Python."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

import gradlab
from gradlab.errors import GradlabError
from gradlab.lab.experiment import RunEnded
from gradlab.record.meta import Status
from gradlab.record.verdict import Verdict


def test_run_returns_the_run_directory_its_rows_and_their_verdicts(tmp_path):
    result = gradlab.run("toy", out=tmp_path)
    assert result.status == Status.COMPLETE and result.held and result.failures == []
    assert result.run_dir.parent == tmp_path and (result.run_dir / "summary.csv").is_file()
    assert result.experiment == "toy" and len(result.trials) == 1
    verdicts = {row["arm"]: row["verdict"] for row in result.summary}
    assert verdicts == {"big-batch": Verdict.BASELINE, "accumulated": Verdict.EQUIVALENT}
    # the rows it returns are the rows it wrote
    written = pd.read_csv(result.run_dir / "summary.csv")
    assert list(written["verdict"]) == [verdicts[a] for a in written["arm"]]
    # the classic toy: .grad holds -16 after the first micro-batch, -20 after the second
    trace = [r["grad"] for r in result.results[0]["trace"] if r["arm"] == "accumulated"]
    assert trace == [-16.0, -20.0]
    weights = [r["value"] for r in result.results[0]["weights"] if r["step"] == 1]
    assert weights == pytest.approx([1.2, 1.2], abs=1e-6)


def test_overrides_as_a_mapping_sweep_like_set(tmp_path):
    result = gradlab.run("equivalence", {"accum_steps": [2, 4], "steps": 2, "model": "mlp",
                                         "dataset": "regression", "norm": "none"},
                         out=tmp_path)
    # equivalence sweeps its models too: each model at N = 2 and at N = 4
    swept = [t.swept["accum_steps"] for t in result.trials]
    assert sorted(swept) == [2, 2, 4, 4]
    accumulated = [row for row in result.summary if row["arm"] == "accumulated"]
    assert [row["accum_steps"] for row in accumulated] == swept
    assert gradlab.api.assignments({"accum_steps": [2, 4], "lr": 0.1}) == \
        ["accum_steps=2,4", "lr=0.1"]


def test_a_broken_promise_is_in_failures_and_not_held(tmp_path):
    spec = tmp_path / "promise.toml"
    spec.write_text('name = "promise"\ndescription = "an arm that promises too much"\n'
                    '[settings]\nmodel = "mlp"\ndataset = "regression"\nsteps = 2\n'
                    '[arms.big-batch]\nbaseline = true\n'
                    '[arms.unscaled]\naccum_steps = 4\nloss_scale = "none"\n'
                    'expect = "equivalent"\n', encoding="utf-8")
    result = gradlab.run(str(spec), out=tmp_path)
    assert result.status == Status.COMPLETE and not result.held
    assert len(result.failures) == 1 and "unscaled" in result.failures[0]
    (row,) = [r for r in result.summary if r["arm"] == "unscaled"]
    assert row["verdict"] == Verdict.DIFFERS


def test_bad_input_raises_before_anything_is_written(tmp_path):
    with pytest.raises(GradlabError, match="accum_steps"):
        gradlab.run("toy", ["accum_steps=0"], out=tmp_path / "results")
    assert not (tmp_path / "results").exists()
    with pytest.raises(GradlabError, match="no built-in experiment|no experiment"):
        gradlab.run("no-such-experiment", out=tmp_path)


def test_a_failed_run_raises_run_ended_with_its_directory_marked(tmp_path, monkeypatch):
    from gradlab.lab import trial

    def explode(*args, **kwargs):
        raise FloatingPointError("overflow in step 3")

    monkeypatch.setattr(trial, "run_trial", explode)
    with pytest.raises(RunEnded) as ended:
        gradlab.run("toy", out=tmp_path)
    assert ended.value.code == 1 and ended.value.status == Status.FAILED
    assert "overflow in step 3" in ended.value.message
    assert gradlab.load_run.__module__ == "gradlab.api"
    with pytest.raises(GradlabError, match="failed"):
        gradlab.load_run(ended.value.run_dir.path)


def test_load_run_reads_what_run_wrote(tmp_path):
    result = gradlab.run("toy", out=tmp_path)
    run = gradlab.load_run(result.run_dir)
    assert run.meta["status"] == "complete" and run.experiment == "toy"
    assert list(run.table("summary")["arm"]) == [row["arm"] for row in result.summary]


def test_importing_gradlab_imports_neither_torch_nor_pandas():
    probe = "import sys, gradlab; print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_progress_is_called_with_the_steps_done_and_their_total(tmp_path):
    seen: list[tuple[int, int]] = []
    result = gradlab.run("toy", {"seed": [0, 1]}, out=tmp_path, jobs=1,
                         progress=lambda done, total: seen.append((done, total)))
    total = sum(a.settings.steps for t in result.trials for a in t.arms)
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
