"""Property: whatever spec file and --set values a user gives, gradlab exits 0, 1 or 2, never
shows a traceback, and never leaves a run directory marked complete that is not.

The specs are generated from the parts a real one has ([settings], [arms.NAME], [sweep],
zipped axes), with values that are right, of the wrong type, out of range or not finite,
plus some text that is not TOML at all. Runs are kept tiny (the mlp and the toy, a few steps)
and the examples few, so the test takes seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import gradlab
from gradlab.record import store

# values that make a quick, valid run (the mlp on regression, a few examples, a step or two)
GOOD = {"norm": ["none", "ln", "gn", "bn"], "batch_size": [4, 6, 8],
        "accum_steps": [1, 2, 3], "loss_scale": ["by-size", "by-count", "none"],
        "zero_grad": ["every-n", "every-step", "never", "after-backward"],
        "optimizer": ["sgd", "adam", "adamw"], "lr": [0.0, 0.01, 0.5], "momentum": [0.0, 0.9],
        "steps": [1, 2], "seed": [0, 1], "dtype": ["float32", "float64", "bfloat16"],
        "probe_every": [0, 1], "trace": [True, False], "hidden": [1, 3], "groups": [1],
        "model": ["mlp"], "dataset": ["regression"], "device": ["cpu"]}
# and values that must be refused, or that make a run fail on purpose
BAD = st.one_of(
    st.sampled_from([0, -1, 2**64, 0.5, math.nan, math.inf, -math.inf, True, "", "x", ":b",
                     "a:b", "toy-linear", "float8", "cuda", [], [1]]),
    st.text(max_size=6))


def mostly(good, bad, one_in: int = 25):
    """Mostly the good strategy, now and then the bad one: many specs get as far as a run."""
    return st.integers(1, one_in).flatmap(lambda i: bad if i == 1 else good)


def value_for(key: str):
    return mostly(st.sampled_from(GOOD[key]), BAD) if key in GOOD else BAD


def table(min_size: int, max_size: int):
    key = mostly(st.sampled_from(sorted(GOOD)), st.sampled_from(["colour", "expect", "trial"]))
    entry = key.flatmap(lambda k: st.tuples(st.just(k), value_for(k)))
    return st.lists(entry, min_size=min_size, max_size=max_size).map(dict)


def arm(baseline: bool):
    meta = st.fixed_dictionaries({}, optional={
        "expect": mostly(st.sampled_from(["equivalent", "differs"]), st.just("same"))})
    flag = {"baseline": mostly(st.just(baseline), st.sampled_from([not baseline, "yes"]))}
    return st.tuples(st.fixed_dictionaries(flag), meta, table(0, 2)).map(
        lambda parts: {**parts[0], **parts[1], **parts[2]})


ARMS = mostly(st.tuples(arm(True), arm(False), st.lists(arm(False), max_size=1)).map(
    lambda a: {"base": a[0], "acc": a[1], **{f"odd name {i}": x for i, x in enumerate(a[2])}}),
    st.dictionaries(st.sampled_from(["base", "acc"]), arm(False), max_size=2), one_in=8)
AXIS = st.sampled_from(sorted(GOOD)).flatmap(
    lambda k: st.tuples(st.just(k), st.lists(value_for(k), min_size=1, max_size=3)))
ZIPPED = st.tuples(st.just("case"), st.lists(table(1, 2), min_size=1, max_size=2))
SWEEP = st.lists(st.one_of(AXIS, ZIPPED), max_size=2).map(dict)
SPEC = st.fixed_dictionaries(
    {"settings": table(0, 3).map(lambda t: {"steps": 1, "batch_size": 4, **t}), "arms": ARMS},
    optional={"sweep": SWEEP, "name": mostly(st.just("generated"), st.text(max_size=5))})
SETS = st.lists(mostly(
    st.sampled_from(sorted(GOOD)).flatmap(lambda k: value_for(k).map(lambda v: f"{k}={v}")),
    st.sampled_from(["acc.accum_steps=2", "base.lr=nan", "nobody.lr=1", "steps", "=3",
                     "accum_steps=1,2", "seed=0,1", "lr=0.1,x", "model=:make", "acc.lr=1,2"])),
    max_size=3)


def toml(value) -> str:
    """A value as TOML (enough of it for the generated specs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") \
            if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{key(k)} = {toml(v)}" for k, v in value.items()) + "}"


def key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def spec_text(spec: dict) -> str:
    lines = [f"name = {toml(spec['name'])}"] if "name" in spec else []
    for section in ("settings", "sweep"):
        if section in spec:
            lines += [f"[{section}]", *(f"{key(k)} = {toml(v)}" for k, v in spec[section].items())]
    for arm, body in spec.get("arms", {}).items():
        lines += [f"[arms.{key(arm)}]", *(f"{key(k)} = {toml(v)}" for k, v in body.items())]
    return "\n".join(lines) + "\n"


def check_outcome(result, out: Path) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output
    # exit 1 is a failed run, or a complete run whose arms broke what the spec promised
    broken_promise = result.exit_code == 1 and "expectation failed:" in result.stderr
    if result.exit_code != 0 and not broken_promise:
        assert result.stderr.strip().splitlines()[-1].startswith("error:"), result.stderr
    runs = list(out.glob("*/run.json")) if out.exists() else []
    for meta_path in runs:
        status = json.loads(meta_path.read_text())["status"]
        assert status in ("complete", "failed"), status
        if status == "complete":
            assert result.exit_code == 0 or broken_promise, result.stderr
            store.load_run(meta_path.parent)  # complete means complete: every row is there
    if result.exit_code == 2:
        assert not runs, "bad input must not leave a run directory"
    if result.exit_code == 0 or broken_promise:
        assert len(runs) == 1


# GRADLAB_PROPERTY_EXAMPLES=1000 searches harder (minutes); the default keeps the suite quick
@settings(max_examples=int(os.environ.get("GRADLAB_PROPERTY_EXAMPLES", 40)), deadline=None,
          derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=mostly(SPEC.map(spec_text), st.text(max_size=40), one_in=8), sets=SETS)
def test_any_spec_and_sets_end_in_0_1_or_2_without_a_traceback(spec, sets):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "generated.toml"
        path.write_text(spec, encoding="utf-8")
        out = Path(folder) / "results"
        args = [x for s in sets for x in ("--set", s)]
        result = gradlab("run", path, *args, "--out", out, "--yes")
        check_outcome(result, out)
        event(f"exit {result.exit_code}")  # --hypothesis-show-statistics: how far inputs get


def test_the_generator_makes_specs_that_run():
    """The property is only worth something if some generated specs get as far as a run."""
    text = spec_text({"settings": {"steps": 1, "batch_size": 4},
                      "arms": {"base": {"baseline": True}, "acc": {"accum_steps": 2}},
                      "sweep": {"lr": [0.01, math.inf]}})
    assert "[arms.base]" in text and "lr = [0.01, inf]" in text
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "generated.toml"
        path.write_text(text)
        result = gradlab("run", path, "--out", Path(folder) / "results")
        assert result.exit_code == 2 and "[sweep] lr" in result.stderr  # inf is refused
        path.write_text(text.replace("inf", "0.02"))
        result = gradlab("run", path, "--out", Path(folder) / "results")
        assert result.exit_code == 0, result.stderr
