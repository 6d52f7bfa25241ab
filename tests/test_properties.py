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
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import gradlab
from gradlab import store

KEYS = ["model", "dataset", "norm", "batch_size", "accum_steps", "loss_scale", "zero_grad",
        "optimizer", "lr", "momentum", "steps", "seed", "dtype", "device", "probe_every",
        "trace", "hidden", "groups", "colour"]
GOOD = {"model": ["mlp", "toy-linear", "nope", "a:b", ":b", "user_factories:tiny_net"],
        "dataset": ["regression", "toy-pairs", "x:"],
        "norm": ["none", "ln", "gn", "bn", "batch"],
        "loss_scale": ["by-size", "by-count", "none"],
        "zero_grad": ["every-n", "never", "after-backward"],
        "optimizer": ["sgd", "adam", "rmsprop"],
        "dtype": ["float32", "float64", "float8"], "device": ["cpu", "auto", "tpu"]}
NUMBERS = st.one_of(st.integers(-2, 9), st.sampled_from([0.0, 0.01, -1.0, 1e3, math.nan,
                                                         math.inf, -math.inf]))
ANY_VALUE = st.one_of(NUMBERS, st.booleans(), st.text(max_size=6))


def value_for(key: str):
    if key in GOOD:
        return st.one_of(st.sampled_from(GOOD[key]), ANY_VALUE)
    if key == "steps":  # keep runs short: a long one proves nothing more
        return st.one_of(st.sampled_from([0, 1, 2, -1]), st.text(max_size=3))
    if key == "batch_size":
        return st.one_of(st.sampled_from([0, 1, 2, 4, 5, 8, 10_000]), ANY_VALUE)
    return ANY_VALUE


def table(min_size: int, max_size: int):
    entry = st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), value_for(k)))
    return st.lists(entry, min_size=min_size, max_size=max_size).map(dict)


ARM = st.fixed_dictionaries({}, optional={
    "baseline": st.one_of(st.booleans(), st.just("yes")),
    "expect": st.sampled_from(["equivalent", "differs", "same"]),
    "accum_steps": st.sampled_from([1, 2, 3, 0]),
    "loss_scale": st.sampled_from(["none", "by-count"]),
    "lr": NUMBERS})
SWEEP = st.dictionaries(st.sampled_from(["accum_steps", "lr", "seed", "norm", "case"]),
                        st.one_of(st.lists(NUMBERS, max_size=3),
                                  st.lists(table(1, 2), min_size=1, max_size=2)),
                        max_size=2)
SPEC = st.fixed_dictionaries(
    {"settings": table(0, 4).map(lambda t: {"steps": 1, "batch_size": 4, **t})},
    optional={"arms": st.dictionaries(st.sampled_from(["base", "acc", "odd name"]), ARM,
                                      max_size=3),
              "sweep": SWEEP, "name": st.text(max_size=5)})
SETS = st.lists(st.one_of(
    st.sampled_from(KEYS).flatmap(lambda k: value_for(k).map(lambda v: f"{k}={toml(v)}")),
    st.sampled_from(["acc.accum_steps=2", "base.lr=nan", "nobody.lr=1", "steps", "=3",
                     "accum_steps=1,2", "seed=0,1", "lr=0.1,x", "model=:make"])),
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
    if result.exit_code != 0:
        assert result.stderr.strip().splitlines()[-1].startswith("error:"), result.stderr
    runs = list(out.glob("*/run.json")) if out.exists() else []
    for meta_path in runs:
        status = json.loads(meta_path.read_text())["status"]
        assert status in ("complete", "failed"), status
        if status == "complete":
            assert result.exit_code == 0, result.stderr
            store.load_run(meta_path.parent)  # complete means complete: every row is there
    if result.exit_code == 2:
        assert not runs, "bad input must not leave a run directory"
    if result.exit_code == 0:
        assert len(runs) == 1


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=st.one_of(SPEC.map(spec_text), st.text(max_size=40)), sets=SETS)
def test_any_spec_and_sets_end_in_0_1_or_2_without_a_traceback(spec, sets):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "generated.toml"
        path.write_text(spec, encoding="utf-8")
        out = Path(folder) / "results"
        args = [x for s in sets for x in ("--set", s)]
        check_outcome(gradlab("run", path, *args, "--out", out, "--yes"), out)


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
