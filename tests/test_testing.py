"""gradlab.testing.assert_accumulation_equivalent: the audit as one assertion in a test."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from gradlab.testing import assert_accumulation_equivalent

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def from_the_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # where experiments/ can be imported, as the README runs it


def test_a_right_loop_passes_and_leaves_no_run_directory(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp's folder, to look in
    assert_accumulation_equivalent("experiments.tutorial_loop:train", accum_steps=4, steps=2)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # the right loop above keeps the assertion in the default run
def test_a_loop_that_differs_fails_with_its_measured_diagnosis(tmp_path):
    with pytest.raises(AssertionError) as caught:
        assert_accumulation_equivalent("experiments.loop_no_division:train", accum_steps=4,
                                       steps=2, out=tmp_path)
    first, diagnosis, kept = str(caught.value).splitlines()
    assert first.startswith("train(8, 4, 2) differs from train(32, 1, 2) from step 1: "
                            "rel grad err 3 (tolerance 3.89e-15), cosine 1")
    assert diagnosis.startswith("diagnosis: the accumulated gradient is 4x the big batch's")
    assert "not divided by N = 4" in diagnosis
    run_dir = Path(kept.removeprefix("run directory: "))
    assert run_dir.parent == tmp_path and (run_dir / "audit.csv").is_file()


@pytest.mark.slow  # two Lightning audits: four processes importing pytorch_lightning
def test_the_assertion_holds_on_lightnings_own_loop(tmp_path):
    pytest.importorskip("pytorch_lightning", reason='pip install -e ".[lightning]"')
    assert_accumulation_equivalent("experiments.lightning_loop:train", accum_steps=4, steps=3)
    with pytest.raises(AssertionError, match=r"rel grad err 0\.75 \(tolerance 3\.89e-15\), "
                                             r"cosine 1\ndiagnosis: .*divided by N twice"):
        assert_accumulation_equivalent("experiments.lightning_loop:train_dividing_twice",
                                       accum_steps=4, steps=3, out=tmp_path)
