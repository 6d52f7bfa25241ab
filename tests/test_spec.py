"""Specs: precedence, sweeps from the command line, and promises made per sweep case."""

import pytest

from gradlab import spec
from gradlab.errors import GradlabError

TEXT = """
[settings]
lr = 0.1
batch_size = 32

[arms.big]
baseline = true
accum_steps = 1

[arms.small]
lr = 0.2

[arms.promised]
expect = "equivalent"

[sweep]
accum_steps = [2, 4]
case = [{norm = "bn", expect = "differs"}, {norm = "gn"}]
"""


def load(text: str = TEXT) -> spec.Spec:
    import tomllib
    return spec.parse_spec(tomllib.loads(text), source="test.toml")


def arms_of(trial: spec.Trial) -> dict[str, spec.Arm]:
    return {a.name: a for a in trial.arms}


def test_precedence_defaults_settings_sweep_arm():
    trials = spec.expand(load())
    assert [(t.swept["accum_steps"], t.swept["norm"]) for t in trials] == [
        (2, "bn"), (2, "gn"), (4, "bn"), (4, "gn")]
    first = arms_of(trials[0])
    assert first["big"].settings.accum_steps == 1  # the arm beats the sweep
    assert first["small"].settings.accum_steps == 2  # the sweep beats [settings]
    assert first["small"].settings.lr == 0.2 and first["big"].settings.lr == 0.1
    assert first["big"].settings.steps == spec.Settings().steps  # untouched: the default


def test_a_sweep_case_promises_for_arms_without_a_promise_of_their_own():
    trials = spec.expand(load())
    bn, gn = arms_of(trials[0]), arms_of(trials[1])
    assert (bn["small"].expect, gn["small"].expect) == ("differs", None)
    assert bn["promised"].expect == gn["promised"].expect == "equivalent"
    assert bn["big"].expect is None  # the baseline promises nothing
    assert "expect" not in trials[0].swept


def test_set_one_value_replaces_a_sweep_and_a_list_makes_one():
    trials = spec.expand(spec.apply_overrides(load(), ["accum_steps=8", "lr=0.01,0.02"]))
    assert "accum_steps" not in trials[0].swept
    small = [arms_of(t)["small"].settings for t in trials]
    assert {(s.accum_steps, s.lr, s.norm) for s in small} == {
        (8, 0.2, "bn"), (8, 0.2, "gn")}  # the arm's own lr still wins
    assert {t.swept["lr"] for t in trials} == {0.01, 0.02}
    assert len(trials) == 4  # 2 lr x 2 norm cases


def test_set_beats_a_key_of_a_zipped_axis_and_duplicates_collapse():
    trials = spec.expand(spec.apply_overrides(load(), ["norm=ln"]))
    assert {a.settings.norm for t in trials for a in t.arms} == {"ln"}
    assert len(trials) == 2  # 2 values of N; the two norm cases became one


@pytest.mark.parametrize(("text", "message"), [
    ("[sweep]\ncase = [{norm = 'bn', expect = 'same'}]", "expect = 'same'"),
    ("[sweep]\ncase = [{norms = 'bn'}]", "unknown setting 'norms'"),
    ("[sweep]\nlr = []", "non-empty list"),
    ("[sweep]\nnorm = ['bn', 'batch']", "choose one of: none, bn, gn, ln, in"),
])
def test_bad_sweeps_name_the_file_and_the_fix(text, message):
    with pytest.raises(GradlabError, match="test.toml") as err:
        load(text)
    assert message in str(err.value)
