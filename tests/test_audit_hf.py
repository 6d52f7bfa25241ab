"""gradlab audit on the Hugging Face Trainer (experiments/hf_trainer_loop.py): a tiny GPT-2
in float64, accumulated by Trainer's gradient_accumulation_steps. Each audit starts two
processes importing transformers (10-15 s an audit on two cores), hence slow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_audit import STEPS, cli_audit, table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def in_repo():
    """`experiments.*` is found from the project folder, as a user runs it. (transformers is
    looked for here, not at import: importing it costs seconds of every default run.)"""
    pytest.importorskip("transformers", reason='the Hugging Face example needs transformers '
                                               '(pip install -e ".[hf]")')
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        yield


def audit(tmp_path: Path, entrypoint: str):
    """`gradlab audit ENTRYPOINT -n 4 --steps 4`; the result and its audit.csv."""
    result, run_dir = cli_audit(tmp_path, entrypoint)
    return result, table(run_dir, "audit") if run_dir else None


@pytest.mark.slow
def test_hf_trainer_accumulation_is_equivalent(tmp_path):
    result, steps = audit(tmp_path, "experiments.hf_trainer_loop:train")
    assert result.exit_code == 0, result.stderr
    assert list(steps["step"]) == list(range(1, STEPS + 1))
    assert (steps["verdict"] == "equivalent").all()
    assert (steps["rel_grad_err"] <= 1e-12).all() and (steps["rel_lr_diff"] == 0).all()
    assert (steps["rel_grad_err"] > 0).any()  # two real runs, not one compared to itself
    # the linear schedule decays, and both runs saw it
    assert steps["lr_big_batch"].is_monotonic_decreasing and steps["lr_big_batch"].nunique() > 1
    assert f"equivalent at every one of the {STEPS} steps" in result.stderr


@pytest.mark.slow
def test_hf_trainer_dividing_the_loss_again_is_named(tmp_path):
    result, steps = audit(tmp_path, "experiments.hf_trainer_loop:train_dividing_twice")
    assert result.exit_code == 1, result.stderr
    first = steps.iloc[0]
    assert first["verdict"] == "differs"
    torch.testing.assert_close(float(first["cosine"]), 1.0, rtol=0, atol=1e-12)
    # Trainer clips the big batch's gradient (|g| ~ 1.7 to 1) and not the smaller one: the
    # norms' ratio is the clipping's, the losses' ratio is exactly 1/N
    torch.testing.assert_close(float(first["loss_accumulated"] / first["loss_big_batch"]), 0.25,
                               rtol=1e-6, atol=0)  # audit.csv keeps 8 digits
    assert "differs from step 1" in result.stderr
    said = " ".join(result.stderr.split())
    assert "so that ratio is the clipping's" in said
    assert "sum to 0.25x the big batch's: the loss is divided by N = 4 twice" in said
