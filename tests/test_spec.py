"""Specs: precedence, sweeps from the command line, and promises made per sweep case."""

import dataclasses

import pytest

from gradlab.config import spec
from gradlab.config.settings import FACTORY_BLIND, PREFLIGHT_BLIND, Role, Settings
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
    assert first["big"].settings.steps == Settings().steps  # untouched: the default


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
        load("[arms.big]\nbaseline = true\n[arms.small]\naccum_steps = 2\n" + text)
    assert message in str(err.value)
    assert "[sweep]" in str(err.value)


def test_a_set_for_one_arm_beats_its_own_value_and_notes_say_what_was_kept():
    loaded = spec.apply_overrides(load(), ["small.lr=0.3", "lr=0.01"])
    trials = spec.expand(loaded)
    assert {arms_of(t)["small"].settings.lr for t in trials} == {0.3}
    assert {arms_of(t)["big"].settings.lr for t in trials} == {0.01}
    assert loaded.notes == ["note: --set lr=0.01 applies to arms big, promised; arm small keeps "
                            "its own lr = 0.3 (--set ARM.lr=VALUE sets it for one arm)"]


def test_a_set_that_no_arm_would_see_is_refused():
    text = TEXT.replace("[arms.small]\nlr = 0.2", "[arms.small]\nlr = 0.2\nseed = 1") \
        .replace("[arms.promised]", "[arms.promised]\nseed = 2").replace(
        "accum_steps = 1\n", "accum_steps = 1\nseed = 3\n", 1)
    with pytest.raises(GradlabError, match="every arm of spec sets seed itself") as err:
        spec.apply_overrides(load(text), ["seed=4"])
    assert "big: 3, small: 1, promised: 2" in str(err.value)
    assert "--set small.seed=4" in str(err.value)


def test_setting_a_key_of_a_zipped_axis_drops_the_axis_with_a_note():
    loaded = spec.apply_overrides(load(), ["norm=ln"])
    assert "case" not in loaded.sweep
    assert loaded.notes == ["note: --set norm replaces the sweep axis 'case', whose values also "
                            "set expect; those now come from [settings] or another --set"]
    trials = spec.expand(loaded)
    assert {a.expect for t in trials for a in t.arms} == {None, "equivalent"}  # promises gone


def test_values_out_of_range_name_their_place():
    def message(text: str, sets=()) -> str:
        with pytest.raises(GradlabError) as err:
            spec.expand(spec.apply_overrides(load(text), list(sets)))
        return str(err.value)

    assert message(TEXT, ["lr=-1"]).startswith("--set lr: lr=-1.0; the learning rate cannot")
    assert message(TEXT, ["small.momentum=nan"]).startswith(
        "--set small.momentum: momentum = nan is not a finite number")
    assert message(TEXT.replace("lr = 0.2", "lr = -0.2")).startswith(
        "test.toml [arms.small]: lr=-0.2;")
    assert message(TEXT.replace("[2, 4]", "[2, 64]")) == (
        "arm 'small': accum_steps=64 (test.toml [sweep] accum_steps) is larger than "
        "batch_size=32 (test.toml [settings]), so a micro-batch would be empty; use "
        "accum_steps <= batch_size")


def test_every_setting_has_one_role_and_the_lab_sets_come_from_the_roles():
    fields = dataclasses.fields(Settings)
    assert all(isinstance(f.metadata["role"], Role) for f in fields)
    # what a model factory may read: each arm differing in one of these gets its own probe model
    assert {f.name for f in fields} - FACTORY_BLIND == {
        "setup", "model", "dataset", "norm", "hidden", "depth", "channels", "groups",
        "min_len", "max_len", "temperature", "dropout", "seed", "dtype", "device", "world_size",
        # how the ranks hold the model: a data-parallel arm's own replica or shards
        "parallel", "find_unused_parameters", "static_graph"}
    # what preflight builds and times one window for, per distinct value
    assert {f.name for f in fields} - PREFLIGHT_BLIND == FACTORY_BLIND - PREFLIGHT_BLIND | {
        "setup", "model", "dataset", "norm", "hidden", "depth", "channels", "groups",
        "min_len", "max_len", "temperature", "dropout", "dtype", "device", "world_size",
        "parallel", "find_unused_parameters", "static_graph"}
    assert FACTORY_BLIND - PREFLIGHT_BLIND == {
        "batch_size", "accum_steps", "accumulation", "bn_mode", "dropout_mode",
        "dropout_masks", "autocast", "grad_accum_dtype", "grad_scaler", "threads", "backend",
        "window_order", "rank_split"}
    assert Settings.with_roles(Role.SEED) == {"seed"}
