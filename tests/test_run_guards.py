"""What `gradlab run` checks before it starts and how it ends: model outputs against the
targets, the cost estimate, the bounded trace, refusing what would not fit in memory, and
exit 1 when an arm breaks the spec's promise."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from conftest import gradlab, run_json
from gradlab.config import spec
from gradlab.lab import preflight, setups
from test_cli import assert_clean_failure


def test_an_output_shaped_unlike_the_targets_is_one_line_naming_both(tmp_path):
    out = tmp_path / "results"
    result = gradlab("run", "equivalence", "--set", "model=user_factories:flat_net",
                     "--set", "dataset=regression", "--out", out)
    assert_clean_failure(result, "the model's output has shape (64,) but the targets have "
                                 "shape (64, 1)", out)


def test_too_few_classes_is_one_line_naming_both(tmp_path):
    out = tmp_path / "results"
    result = gradlab("run", "equivalence", "--set", "model=user_factories:three_classes",
                     "--set", "dataset=digits", "--out", out)
    assert_clean_failure(result, "the model's output has shape (64, 3) but the targets are "
                                 "64 class ids up to 9", out)


def test_the_plan_line_estimates_time_and_memory(tmp_path):
    result = gradlab("run", "toy", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    plan = next(line for line in result.stderr.splitlines() if line.startswith("toy: 1 trial"))
    assert "about 1 s and under 1 MiB" in plan


def test_a_trace_records_the_first_elements_of_each_parameter(tmp_path):
    doc = run_json("toy", "--set", "model=user_factories:wide_net", "--set", "dataset=toy-pairs",
                   "--set", "trace_elements=3", "--out", tmp_path)
    trace = pd.read_csv(Path(doc["run_dir"]) / "trace.csv")
    per_param = trace.groupby(["arm", "step", "micro_batch", "param"]).element
    assert (per_param.min() == 0).all()
    counts = per_param.size().groupby("param").max().to_dict()
    # the first 3 of each parameter; the last bias has only 1
    assert counts == {"0.weight": 3, "0.bias": 3, "1.weight": 3, "1.bias": 3, "2.weight": 3,
                      "2.bias": 1}
    weights = pd.read_csv(Path(doc["run_dir"]) / "weights.csv")
    assert weights.groupby(["arm", "step", "param"]).size().max() == 3


def test_a_run_that_would_not_fit_in_memory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda: 2**20)  # a 1 MiB machine
    out = tmp_path / "results"
    result = gradlab("run", "toy", "--set", "model=user_factories:wide_net",
                     "--set", "trace_elements=1000000", "--out", out)
    assert_clean_failure(result, "GiB available; use a smaller model, fewer arms, or "
                                 "trace=false (or fewer trace_elements)", out)


def test_preflight_builds_each_distinct_setup_once(monkeypatch):
    built = []
    original = setups.build_setup
    monkeypatch.setattr(setups, "build_setup",
                        lambda s, *a: built.append(s.seed) or original(s, *a))
    loaded = spec.apply_overrides(spec.load_spec("toy"), ["seed=0,1,2,3,4,5,6,7"])
    plan = preflight.preflight(spec.expand(loaded))
    assert plan.trials == 8 and plan.arms == 16
    assert len(built) == 2  # big-batch and accumulated differ in N; seeds change nothing


def test_a_broken_promise_fails_the_run_with_exit_1(tmp_path):
    text = spec.builtin_specs()["toy"].read_text().replace('expect = "equivalent"',
                                                           'expect = "differs"')
    (tmp_path / "promise.toml").write_text(text)
    result = gradlab("run", tmp_path / "promise.toml", "--out", tmp_path / "out")
    assert result.exit_code == 1, result.stderr
    assert "expectation failed:" in result.stderr
    assert "expected differs, got equivalent" in result.stderr
    row = next(line for line in result.stderr.splitlines() if line.startswith("accumulated"))
    assert row.endswith("✗")  # the run's table marks the broken promise
    assert "0 expectations hold, 0 n/a, 1 fail" in result.stderr
    assert (tmp_path / "out").exists() and result.stdout.strip()  # the run dir is still printed
