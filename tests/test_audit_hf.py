"""gradlab audit on the Hugging Face Trainer (experiments/hf_trainer_loop.py): a tiny GPT-2
in float64, accumulated by Trainer's gradient_accumulation_steps. Each audit starts two
processes importing transformers (about half a minute on two cores), hence slow."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face example needs transformers "
                                           '(pip install -e ".[hf]")')

from test_audit import STEPS, cli_audit, in_repo, out, table  # noqa: E402, F401 (fixtures)


@pytest.mark.slow
def test_hf_trainer_accumulation_is_equivalent(out):
    result, run_dir = cli_audit(out, "experiments.hf_trainer_loop:train")
    assert result.exit_code == 0, result.stderr
    steps = table(run_dir, "audit")
    assert len(steps) == STEPS
    assert (steps["verdict"] == "equivalent").all()
    assert (steps["rel_grad_err"] <= 1e-12).all() and (steps["rel_lr_diff"] == 0).all()
    assert steps["lr_big_batch"].is_monotonic_decreasing  # the linear schedule, seen by both
    assert f"equivalent at every one of the {STEPS} steps" in result.stderr


@pytest.mark.slow
def test_hf_trainer_dividing_the_loss_again_is_named(out):
    result, run_dir = cli_audit(out, "experiments.hf_trainer_loop:train_dividing_twice")
    assert result.exit_code == 1, result.stderr
    first = table(run_dir, "audit").iloc[0]
    assert first["verdict"] == "differs"
    torch.testing.assert_close(float(first["rel_grad_err"]), 0.75, rtol=1e-9, atol=0)
    assert "1/N of it, N = 4, so the loss is divided by N twice" in result.stdout + result.stderr
