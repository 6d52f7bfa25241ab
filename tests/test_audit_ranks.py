"""gradlab audit --nproc-per-node 2 on loops that torch's launcher runs on two ranks: the DDP
and FSDP2 examples (experiments/ddp_loop.py, fsdp2_loop.py), right and with their classic
mistakes, and the loops it must refuse. Each audit starts torchrun twice (the accumulated
run on 2 ranks, the big batch on 1): 12-15 s on two cores, hence slow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_audit import STEPS, cli_audit, table

REPO = Path(__file__).resolve().parents[1]
W, N, M = 2, 4, 8
# float64 loops: the verdict's tolerance, (N·W - 1)·u + 32·u_acc, with u = u_acc = 2^-53
TOLERANCE = (N * W - 1 + 32) * 2.0 ** -53

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def in_repo():
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        yield


def audit_on_ranks(tmp_path: Path, entrypoint: str, *args: str):
    """`gradlab audit ENTRYPOINT -n 4 --steps 4 --nproc-per-node 2`; result and audit.csv."""
    result, run_dir = cli_audit(tmp_path, entrypoint, "--nproc-per-node", str(W), *args)
    return result, table(run_dir, "audit") if run_dir else None


def rel_errs(steps) -> torch.Tensor:
    return torch.tensor(steps["rel_grad_err"].to_numpy())


@pytest.mark.parametrize("loop", ["ddp_loop", "fsdp2_loop"])
def test_data_parallel_accumulation_is_equivalent(tmp_path, loop):
    result, steps = audit_on_ranks(tmp_path, f"experiments.{loop}:train")
    assert result.exit_code == 0, result.stderr
    assert "train(8, 4, 4) on 2 ranks against train(64, 1, 4) on 1 rank" in result.stderr
    assert list(steps["step"]) == list(range(1, STEPS + 1))
    assert (steps["verdict"] == "equivalent").all()
    torch.testing.assert_close(rel_errs(steps), torch.zeros(STEPS, dtype=torch.float64),
                               rtol=0, atol=TOLERANCE)
    assert steps["tolerance"].iloc[0] == pytest.approx(TOLERANCE, rel=1e-12)
    # the ranks stepped on one gradient, reduced once a window (no_sync / gradient sync off)
    assert (steps["rank_grad_spread"] == 0).all()
    assert (steps["syncs_accumulated"] == 1).all() and (steps["syncs_big_batch"] == 1).all()
    assert "backward() calls that reduced gradients across the ranks, per step: 1 of 4" \
        in " ".join(result.stderr.split())


@pytest.mark.parametrize("loop", ["ddp_loop", "fsdp2_loop"])
def test_dividing_by_the_global_batch_is_one_over_w(tmp_path, loop):
    result, steps = audit_on_ranks(tmp_path, f"experiments.{loop}:train_dividing_by_global_batch")
    assert result.exit_code == 1, result.stderr
    # exactly 1/W of the big batch's gradient, in its direction: rel err 1 - 1/W
    torch.testing.assert_close(rel_errs(steps), torch.full((STEPS,), 1 - 1 / W,
                                                           dtype=torch.float64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(steps["cosine"].to_numpy()),
                               torch.ones(STEPS, dtype=torch.float64), rtol=0, atol=1e-12)
    said = " ".join(result.stderr.split())
    assert "1/W of it, W = 2 ranks" in said and "divided by the global batch (m·N·W = 64" in said
    assert "dividing by N twice" not in said  # N = 4 != W: no ambiguity to report


def test_no_sync_on_every_micro_batch_leaves_the_ranks_apart(tmp_path):
    result, steps = audit_on_ranks(tmp_path, "experiments.ddp_loop:train_never_syncing")
    assert result.exit_code == 1, result.stderr
    assert (steps["syncs_accumulated"] == 0).all()
    assert (steps["rank_grad_spread"] > 0.1).all()  # each rank's own shard's gradient
    said = " ".join(result.stderr.split())
    assert "the 2 ranks' optimizers received different gradients at step 1" in said
    assert "none of the 4 backward() calls of rank 0's window reduced gradients" in said


def test_reducing_every_micro_batch_is_equivalent_but_said(tmp_path):
    result, steps = audit_on_ranks(tmp_path,
                                   "experiments.ddp_loop:train_syncing_every_micro_batch")
    assert result.exit_code == 0, result.stderr
    assert (steps["syncs_accumulated"] == N).all()
    assert (steps["rank_grad_spread"] == 0).all()
    assert "every micro-batch reduced: the accumulation saves no communication" \
        in " ".join(result.stderr.split())


def test_testing_api_on_ranks():
    from gradlab.testing import assert_accumulation_equivalent

    assert_accumulation_equivalent("experiments.ddp_loop:train", accum_steps=N, steps=2,
                                   nproc_per_node=W)
    with pytest.raises(AssertionError, match=r"rel grad err 0\.5 .*\n.*1/W of it"):
        assert_accumulation_equivalent("experiments.fsdp2_loop:train_dividing_by_global_batch",
                                       accum_steps=N, steps=2, nproc_per_node=W)


@pytest.mark.parametrize(("loop", "said"), [
    ("alone", "train(8, 4, 4) ran on 2 ranks but never called "
              "torch.distributed.init_process_group()"),
    ("uneven_steps", "the ranks of train(8, 4, 4) on 2 ranks made different numbers of "
                     "optimizer steps (rank 0 made 4, rank 1 made 3)"),
    ("rank_one_raises", "rank 1: train(8, 4, 4) raised RuntimeError: rank one has no data "
                        "shard at rank_loops.py"),
    ("rank_one_dies", "rank 1 of train(8, 4, 4) on 2 ranks died without a result (exit code 3)"),
])
def test_refused_on_ranks(tmp_path, loop, said):
    result, steps = audit_on_ranks(tmp_path, f"rank_loops:{loop}")
    assert result.exit_code == 2, result.stderr
    assert said in " ".join(result.stderr.split())
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("audit-*"))  # nothing left looking complete


def test_nproc_per_node_zero_is_refused(tmp_path):
    result, _ = audit_on_ranks(tmp_path, "experiments.ddp_loop:train", "--nproc-per-node", "0")
    assert result.exit_code == 2
    assert "--nproc-per-node 0: give an integer >= 1" in result.stderr
