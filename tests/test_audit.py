"""gradlab audit: a user's own loop against its big-batch twin, through the hooks alone.

The examples in experiments/ run through the CLI (two worker processes each, shared by
module-scoped fixtures); the other patterns run the worker in this process, which
installs the same hooks, to keep the suite fast.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import audit_loops
from conftest import gradlab
from gradlab import auditing
from gradlab.auditing import parent as audit
from gradlab.auditing.diagnosis import diagnose
from gradlab.auditing.result import (
    COPY_LIMIT,
    AuditResult,
    beat_of,
    rank_record,
    records_of,
    twins,
)
from gradlab.auditing.rundir import write_run
from gradlab.auditing.worker import resolve_entrypoint, worker
from gradlab.errors import GradlabError
from gradlab.record.verdict import Verdict, rel_tolerance
from gradlab.train import metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def in_repo():
    """`experiments.*` is found from the project folder, as a user runs it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        yield


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audits")


def cli_audit(out: Path, entrypoint: str, *args: str):
    """`gradlab audit ENTRYPOINT -n 4 --steps STEPS`; the result and its run directory."""
    result = gradlab("audit", entrypoint, "--accum-steps", "4", "--steps", str(STEPS),
                     "--out", out, *args)
    run_dir = Path(result.stdout.strip()) if result.exit_code in (0, 1) else None
    return result, run_dir


def table(run_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(run_dir / f"{name}.csv")


@pytest.fixture(scope="module")
def tutorial(out):
    return cli_audit(out, "experiments.tutorial_loop:train")


@pytest.fixture(scope="module")
def broken(out):
    """The three broken copies of the tutorial loop, audited once each."""
    return {name: cli_audit(out, f"experiments.{name}:train")
            for name in ("loop_no_division", "loop_zero_every_micro_batch",
                         "loop_scheduler_per_micro_batch")}


# ----------------------------------------------------------------------------- the examples

def test_tutorial_loop_is_equivalent_in_float64_at_every_step(tutorial):
    result, run_dir = tutorial
    assert result.exit_code == 0, result.stderr
    steps = table(run_dir, "audit")
    assert list(steps["step"]) == list(range(1, STEPS + 1))
    assert (steps["rel_grad_err"] <= 1e-12).all()
    assert (steps["rel_grad_err"] > 0).any()  # measured, not a copy of one run compared to itself
    assert (steps["verdict"] == "equivalent").all()
    assert (steps["rel_lr_diff"] == 0).all()
    # the schedule decays, and the audit saw it in both runs
    assert steps["lr_big_batch"].is_monotonic_decreasing and steps["lr_big_batch"].nunique() > 1
    assert "equivalent at every one of the 4 steps" in result.stderr
    assert "diagnosis" not in result.stderr
    assert result.stdout.strip() == str(run_dir)  # stdout: the run directory, nothing else


@pytest.mark.slow  # two more audit processes; the float64 loop stays in the default run
def test_tutorial_loop_in_float32_is_within_the_float32_floor(out):
    result, run_dir = cli_audit(out, "experiments.tutorial_loop:train_float32")
    assert result.exit_code == 0, result.stderr
    steps = table(run_dir, "audit")
    tolerance = rel_tolerance("float32", 4, 0.0)
    torch.testing.assert_close(torch.tensor(steps["tolerance"].to_numpy()),
                               torch.full((STEPS,), tolerance, dtype=torch.float64),
                               rtol=0, atol=0)
    assert (steps["rel_grad_err"] <= tolerance).all()
    assert (steps["rel_grad_err"] > 1e-9).all()  # float32 rounding shows: this is float32
    assert json.loads((run_dir / "run.json").read_text())["trials"][0]["arms"]["accumulated"][
        "settings"]["dtype"] == "float32"


def test_no_division_differs_by_n_minus_1_at_step_1(broken):
    result, run_dir = broken["loop_no_division"]
    assert result.exit_code == 1, result.stderr
    first = table(run_dir, "audit").iloc[0]
    torch.testing.assert_close(first["rel_grad_err"], 3.0, rtol=1e-12, atol=0)
    torch.testing.assert_close(first["grad_norm_accumulated"] / first["grad_norm_big_batch"],
                               4.0, rtol=1e-12, atol=0)
    torch.testing.assert_close(first["cosine"], 1.0, rtol=0, atol=1e-12)
    assert "differs from step 1" in result.stderr
    assert "the loss is not divided by N = 4" in result.stderr
    # an exact multiple is no accident of an unseeded loop: no rerun needed to say so
    assert not json.loads((run_dir / "run.json").read_text())["audit"]["determinism_rechecked"]
    assert "zero_grad" not in result.stderr and "scheduler" not in result.stderr


def test_zero_grad_every_micro_batch_is_named(broken):
    result, run_dir = broken["loop_zero_every_micro_batch"]
    assert result.exit_code == 1, result.stderr
    assert "zero_grad() cleared .grad between the micro-batches" in result.stderr
    assert "discarded 3 of the 4 backward() results" in result.stderr
    assert "not divided" not in result.stderr
    first = table(run_dir, "audit").iloc[0]
    assert first["verdict"] == "differs" and first["cosine"] < 0.99


def test_scheduler_per_micro_batch_is_named(broken):
    result, run_dir = broken["loop_scheduler_per_micro_batch"]
    assert result.exit_code == 1, result.stderr
    steps = table(run_dir, "audit")
    # the gradient at step 1 is right (same weights); the learning rate is not
    assert steps["rel_grad_err"].iloc[0] <= rel_tolerance("float64", 4, 0.0)
    assert steps["lr_accumulated"].iloc[0] < steps["lr_big_batch"].iloc[0]
    assert "differs from step 1" in result.stderr
    assert "it is stepped once per micro-batch" in result.stderr
    assert "4x too fast" in result.stderr
    checks = table(run_dir, "checks")
    assert not checks["passed"].iloc[0] and checks["value"].iloc[0] > 0.5


@pytest.mark.slow  # a framework's loop, like Lightning's and the HF Trainer's
def test_accelerate_accumulate_is_equivalent(out):
    pytest.importorskip("accelerate")
    result, run_dir = cli_audit(out, "experiments.accelerate_loop:train")
    assert result.exit_code == 0, result.stderr
    steps = table(run_dir, "audit")
    assert (steps["rel_grad_err"] <= 1e-12).all() and (steps["rel_lr_diff"] == 0).all()



# Lightning's automatic optimization as its docs write it: the window's last micro-batch runs
# inside optimizer.step(closure). Each audit starts two processes importing Lightning.
@pytest.mark.slow
@pytest.mark.parametrize("entrypoint", ["train", "train_with_validation"])
def test_lightning_accumulate_grad_batches_is_equivalent(out, entrypoint):
    pytest.importorskip("pytorch_lightning")
    result, run_dir = cli_audit(out, f"experiments.lightning_loop:{entrypoint}")
    assert result.exit_code == 0, result.stderr
    steps = table(run_dir, "audit")
    assert len(steps) == STEPS
    assert (steps["rel_grad_err"] <= 1e-12).all() and (steps["rel_lr_diff"] == 0).all()


@pytest.mark.slow
def test_lightning_dividing_the_loss_again_is_named(out):
    pytest.importorskip("pytorch_lightning")
    result, run_dir = cli_audit(out, "experiments.lightning_loop:train_dividing_twice")
    assert result.exit_code == 1
    first = table(run_dir, "audit").iloc[0]
    torch.testing.assert_close(float(first["rel_grad_err"]), 0.75, rtol=1e-9, atol=0)
    assert "1/N of it, N = 4, so the loss is divided by N twice" in result.stdout + result.stderr



def test_audit_json_is_one_document_on_stdout(out):
    result = gradlab("audit", "experiments.loop_no_division:train", "-n", "4", "--steps", "2",
                     "--out", out, "--json")
    assert result.exit_code == 1, result.stderr
    document = json.loads(result.stdout)  # nothing else on stdout
    assert document["verdict"] == "differs" and document["status"] == "complete"
    assert document["calls"] == {"big-batch": "train(32, 1, 2)", "accumulated": "train(8, 4, 2)"}
    assert [row["step"] for row in document["steps"]] == [1, 2]
    torch.testing.assert_close(document["first_difference"]["rel_grad_err"], 3.0, rtol=1e-12,
                               atol=0)
    assert "not divided by N = 4" in document["diagnosis"]
    assert Path(document["run_dir"], "audit.csv").exists()
    refused = gradlab("audit", "nope:train", "-n", "4", "--json")
    assert refused.exit_code == 2 and json.loads(refused.stdout)["status"] == "bad-input"


# ----------------------------------------------------------------------------- the run directory

def test_run_directory_reads_like_a_run(tutorial, broken):
    _, good = tutorial
    _, bad = broken["loop_no_division"]
    for run_dir in (good, bad):
        summary = table(run_dir, "summary").set_index("arm")
        assert summary.loc["big-batch", "verdict"] == "baseline"
        assert summary.loc["accumulated", ["batch_size", "accum_steps", "micro_batch"]].tolist() \
            == [32, 4, 8]
        assert summary.loc["big-batch", ["batch_size", "accum_steps", "micro_batch"]].tolist() \
            == [32, 1, 32]
        steps = table(run_dir, "steps")
        assert len(steps) == 2 * STEPS and steps["loss"].notna().all()
        probe_rows = table(run_dir, "probe")
        assert set(probe_rows["param"]) == {"0.weight", "0.bias", "2.weight", "2.bias", "*"}
    assert table(good, "summary").set_index("arm").loc["accumulated", "verdict"] == "equivalent"
    assert table(bad, "summary").set_index("arm").loc["accumulated", "verdict"] == "differs"
    # the loss each step's gradient belongs to: N times the big batch's without the division
    losses = table(bad, "steps").pivot(index="step", columns="arm", values="loss")
    torch.testing.assert_close(losses["accumulated"].iloc[0] / losses["big-batch"].iloc[0], 4.0,
                               rtol=1e-12, atol=0)


def test_compare_reads_audit_runs_and_checks_them(tutorial, broken):
    _, good = tutorial
    _, bad = broken["loop_no_division"]
    result = gradlab("compare", good, "--json", "--check")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    rows = {r["arm"]: r for r in doc["rows"]}
    assert rows["accumulated"]["verdict"] == "equivalent" and rows["accumulated"]["check"] == "ok"
    assert rows["big-batch"]["verdict"] == "baseline"
    assert any("both at the big batch's weights: after each optimizer step the accumulated run "
               "takes the big batch's weights" in note for note in doc["notes"])

    result = gradlab("compare", bad, "--check")
    assert result.exit_code == 1
    assert "expected equivalent, got differs" in result.stderr


def test_plot_and_report_read_an_audit_run(broken, tmp_path):
    _, run_dir = broken["loop_scheduler_per_micro_batch"]
    result = gradlab("plot", run_dir, "-y", "lr,rel_l2_err", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert sorted(Path(p).name for p in result.stdout.split()) == [
        "audit-lr-vs-step.png", "audit-rel_l2_err-vs-step.png"]


# ----------------------------------------------------------------------------- bad input

def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("entrypoint, args, fragments", [
    ("audit_loops", (), ("give it as pkg.module:function",)),
    ("no_such_module:train", (), ("no module named 'no_such_module'",)),
    ("audit_loops:right", ("--accum-steps", "1"), ("--accum-steps 1", ">= 2")),
    ("audit_loops:right", ("--accum-steps", "2", "--steps", "0"), ("--steps 0",)),
])
def test_bad_arguments_fail_before_any_process_starts(entrypoint, args, fragments, tmp_path):
    args = args or ("--accum-steps", "2")
    one_line_error(gradlab("audit", entrypoint, *args, "--out", tmp_path), *fragments)
    assert not any(tmp_path.iterdir())  # no run directory for a run that never was


@pytest.mark.slow  # each runs the user's loop in several processes
@pytest.mark.parametrize("entrypoint, fragments", [
    ("audit_loops:wrong_signature", ("is wrong_signature(batch_size, steps)",
                                     "train(micro_batch_size: int, accum_steps: int")),
    ("audit_loops:unseeded_shuffle", ("not deterministic", "train(4, 1, 4) run twice")),
])
def test_loops_that_cannot_be_audited_say_why(entrypoint, fragments, tmp_path):
    """Through the worker processes: the worker's own check, and the rerun of a loop that
    does not repeat itself (Python's random is seeded anew in every process)."""
    result = gradlab("audit", entrypoint, "--accum-steps", "2", "--micro-batch-size", "2",
                     "--steps", "4", "--out", tmp_path)
    one_line_error(result, *fragments)
    assert not any(tmp_path.iterdir())


def test_entrypoint_contract(monkeypatch):
    monkeypatch.chdir(REPO)
    assert resolve_entrypoint("audit_loops:right").__name__ == "right"
    with pytest.raises(GradlabError, match="audit_loops.nothing does not exist; functions in "
                                           "audit_loops: .*never_steps"):
        resolve_entrypoint("audit_loops:nothing")
    with pytest.raises(GradlabError, match="_sequences.* must accept train"):
        resolve_entrypoint("audit_loops:_sequences")
    with pytest.raises(GradlabError, match="random is not a function"):
        resolve_entrypoint("audit_loops:random")



@pytest.mark.parametrize("entrypoint", ["audit_loops:positional", "audit_loops:reordered"])
def test_an_entrypoint_is_called_by_name_or_else_by_position(entrypoint, tmp_path):
    # train(m, n, k) gets the three numbers in the contract's order; train(max_steps,
    # accum_steps, micro_batch_size) gets each by its name, not swapped
    result = examined(entrypoint, tmp_path)
    assert result.verdict == "equivalent"
    assert [s["backwards"] for s in result.captures["accumulated"]["steps"]] == [4, 4, 4]


# ----------------------------------------------------------------------------- the library

def test_the_library_audits_a_loop_given_as_the_function(tmp_path, monkeypatch):
    # given by name: tests/test_testing.py, through gradlab.testing
    monkeypatch.syspath_prepend(str(REPO))
    from experiments.tutorial_loop import train

    result = auditing.audit(train, accum_steps=4, steps=2, out=tmp_path)
    assert isinstance(result, auditing.AuditResult)
    assert result.entrypoint == "experiments.tutorial_loop:train"
    assert result.verdict == Verdict.EQUIVALENT and not result.failed
    assert result.run_dir.is_dir() and result.run_dir.parent == tmp_path
    assert (result.run_dir / "audit.csv").is_file()


def test_the_library_refuses_a_function_no_process_can_import(tmp_path):
    def nested(micro_batch_size, accum_steps, max_steps):
        pass

    for fn in (nested, lambda micro_batch_size, accum_steps, max_steps: None):
        with pytest.raises(GradlabError, match="cannot be imported by its name; pass a "
                                               "module-level function"):
            auditing.audit(fn, accum_steps=2, out=tmp_path)
    assert not any(tmp_path.iterdir())


def test_run_json_of_an_audit_has_the_keys_it_always_had(tutorial):
    _, run_dir = tutorial
    meta = json.loads((run_dir / "run.json").read_text())
    assert set(meta) == {"experiment", "status", "started", "ended", "description",
                         "entrypoint", "gradients_at", "device", "trials", "audit",
                         "versions", "git_commit", "command", "pid", "host"}
    assert meta["experiment"] == "audit" and meta["status"] == "complete"
    assert meta["audit"]["verdict"] == "equivalent"


# ----------------------------------------------------------------------------- in one process

def examined(entrypoint: str, tmp: Path, m: int = 4, n: int = 4, k: int = 3,
             copy_limit: int = COPY_LIMIT) -> AuditResult:
    """The worker's hooks in this process, then the parent's comparison and diagnosis."""
    base, arm = twins(m, n)
    shared = tmp / "weights"
    shared.mkdir(exist_ok=True)
    (shared / "done").unlink(missing_ok=True)
    captured = {}
    for a, role in ((base, "lead"), (arm, "follow")):
        path = tmp / f"{a.name}.pt"
        worker(entrypoint, a.micro_batch_size, a.accum_steps, k, copy_limit, path,
                     **{role: shared})
        (shared / "done").touch()  # the leader has finished: the follower waits for no more
        captured[a.name] = audit.load_record(path)
        assert captured[a.name]["error"] is None, captured[a.name]["error"]
    result = audit.examine(entrypoint, base, arm, k, captured)
    if result.failed:
        result.diagnosis = diagnose(result).text
    return result


def test_hooks_are_removed_after_a_run(tmp_path):
    before = (torch.Tensor.backward, torch.optim.Optimizer.zero_grad, torch.nn.Module.zero_grad)
    examined("audit_loops:right", tmp_path)
    after = (torch.Tensor.backward, torch.optim.Optimizer.zero_grad, torch.nn.Module.zero_grad)
    assert before == after
    from torch.optim.optimizer import _global_optimizer_pre_hooks
    assert not _global_optimizer_pre_hooks


def test_record_of_a_right_loop(tmp_path):
    result = examined("audit_loops:right", tmp_path)
    assert result.verdict == "equivalent" and result.diagnosis is None
    assert result.same_weights and result.captures["accumulated"]["forced"] == 3
    assert result.captures["big-batch"]["forced"] == 0  # the leader follows no one
    own = result.captures["accumulated"]["steps"]
    assert [s["backwards"] for s in own] == [4, 4, 4]
    assert [s["zero_grads"] for s in own] == [0, 1, 1]  # after steps 1 and 2: in the next window
    assert [s["discarded"] for s in own] == [0, 0, 0]
    assert own[0]["names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(s["rel_grad_err"] <= 1e-12 for s in result.steps)
    # what the big batch's first step received: the gradient of the mean loss over its batch
    x, y = audit_loops._regression()
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 1)).double()
    torch.nn.functional.mse_loss(model(x[:16]), y[:16]).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    captured = torch.from_numpy(result.captures["big-batch"]["steps"][0]["grad"])
    torch.testing.assert_close(captured, expected, rtol=0, atol=0)
    assert result.captures["big-batch"]["steps"][0]["loss"] == pytest.approx(
        torch.nn.functional.mse_loss(model(x[:16]), y[:16]).item(), rel=1e-15)


def test_not_divided_in_process_matches_the_example(tmp_path):
    result = examined("audit_loops:not_divided", tmp_path)
    assert result.first_difference["step"] == 1
    torch.testing.assert_close(result.first_difference["rel_grad_err"], 3.0, rtol=1e-12, atol=0)
    assert "not divided by N = 4" in result.diagnosis



@pytest.mark.parametrize("entrypoint", ["audit_loops:closure_step", "audit_loops:lbfgs"])
def test_a_step_given_a_closure_is_judged_on_what_the_closure_computed(entrypoint, tmp_path):
    # optimizer.step(closure): the gradient exists only once the closure has run (before it,
    # .grad is the last step's, or None at step 1)
    result = examined(entrypoint, tmp_path)
    assert result.verdict == "equivalent", result.diagnosis
    assert len(result.steps) == 3 and all(s["rel_grad_err"] <= 1e-12 for s in result.steps)
    own = result.captures["accumulated"]["steps"]
    assert [s["backwards"] for s in own] == [4, 4, 4]  # counted up to the closure's first call
    assert own[0]["names"] == ["weight", "bias"]  # named by the forward inside the closure


def scales(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([r["scale"] for r in rows], dtype=torch.float64)


def test_grad_scaler_updates_are_counted_and_its_scale_does_not_reach_the_gradient(tmp_path):
    result = examined("audit_loops:grad_scaler", tmp_path)
    assert result.verdict == "equivalent", result.diagnosis
    # the scale doubles at every update (16, 32, 64): unscaled, the gradients agree all the same
    torch.testing.assert_close(scales(result.steps),
                               torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    # counted since the previous step: update() runs after step(), so none before step 1
    assert [s["scaler_updates_accumulated"] for s in result.steps] == [0, 1, 1]
    assert [s["scaler_updates_big_batch"] for s in result.steps] == [0, 1, 1]


def test_the_scale_alpha_is_measured_overall_and_per_parameter(tmp_path):
    result = examined("audit_loops:not_divided", tmp_path)
    # not divided by N: alpha = <g, g_big> / |g_big|^2 = N, for every parameter alike
    torch.testing.assert_close(scales(result.steps),
                               torch.full((3,), 4.0, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(scales(result.params),
                               torch.full((len(result.params),), 4.0, dtype=torch.float64),
                               rtol=1e-12, atol=0)


def test_a_wrong_closure_differs_by_what_it_computed(tmp_path):
    result = examined("audit_loops:closure_step_without_division", tmp_path)
    assert result.verdict == "differs" and result.first_difference["step"] == 1
    torch.testing.assert_close(result.first_difference["rel_grad_err"], 3.0, rtol=1e-12, atol=0)


DIAGNOSES = {
    "audit_loops:batchnorm": "BatchNorm in training mode (1)",
    "audit_loops:dropout": "dropout in training mode (2, 4)",
    "audit_loops:separate_accumulation_branch":
        "equal at step 1, different from step 2: no zero_grad() ran",
    "audit_loops:tokens_mean_per_micro_batch": "tokens in sequences of unequal length",
    "audit_loops:clip_per_micro_batch":
        "clip_grad_norm_() ran 4 times before step 1 in the accumulated run and 1 in the big",
    "audit_loops:cleared_before_the_step": "the accumulated run's optimizer received no "
                                           "gradient at step 1 (|g| = 0",
    "audit_loops:divided_twice_and_clipped": "in both runs, so that ratio is the clipping's. "
                                             "The losses backward() ran on before it sum to "
                                             "0.25x the big batch's: the loss is divided by "
                                             "N = 4 twice",
}
# read off what the loop did (counts, an exact multiple); the others name a likeness
CERTAIN = {"audit_loops:separate_accumulation_branch", "audit_loops:clip_per_micro_batch",
           "audit_loops:cleared_before_the_step", "audit_loops:divided_twice_and_clipped"}


@pytest.mark.parametrize("entrypoint", DIAGNOSES)
def test_diagnoses(entrypoint, tmp_path):
    result = examined(entrypoint, tmp_path)
    assert result.verdict == "differs"
    assert DIAGNOSES[entrypoint] in result.diagnosis
    for other in set(DIAGNOSES.values()) - {DIAGNOSES[entrypoint]}:
        assert other not in result.diagnosis
    # counted facts are certain; likenesses are given only after the loop has been rerun and
    # shown to be deterministic
    assert diagnose(result).certain == (entrypoint in CERTAIN)



def test_a_short_last_window_is_described_by_what_was_measured(tmp_path):
    # the second window holds 2 of the 4 micro-batches and is divided by 4: half the big
    # batch's gradient, same direction; a gradient held over would make it larger
    result = examined("audit_loops:short_last_window", tmp_path)
    first = result.first_difference
    assert first["step"] == 2
    torch.testing.assert_close(first["grad_norm_accumulated"] / first["grad_norm_big_batch"],
                               0.5, rtol=1e-9, atol=0)
    assert "2 of N = 4 micro-batches' worth, in the same direction" in result.diagnosis
    assert "held over" in result.diagnosis and not diagnose(result).certain



@pytest.mark.parametrize("width", [80, 120])
def test_the_audit_table_fits_the_terminal_with_every_cell_whole(width, tmp_path):
    import io

    from rich.console import Console

    from gradlab.cli.audit_table import render
    shown = io.StringIO()
    render(examined("audit_loops:not_divided", tmp_path), Console(file=shown, width=width))
    table = [line for line in shown.getvalue().splitlines() if line[:1] in "┏┃┡│└"]
    assert table and all(len(line) <= width for line in table)
    assert "…" not in "".join(table) and "differs" in "".join(table)


def test_determinism_check(tmp_path):
    first = examined("audit_loops:right", tmp_path)
    again = examined("audit_loops:right", tmp_path)
    base = first.base
    audit.check_deterministic(base, 3, first.captures["big-batch"], again.captures["big-batch"],
                              "float64")  # passes: the same call, the same record
    one = examined("audit_loops:unseeded_shuffle", tmp_path, n=2, m=2)
    two = examined("audit_loops:unseeded_shuffle", tmp_path, n=2, m=2)
    with pytest.raises(GradlabError, match=r"not deterministic: train\(4, 1, 3\) run twice "
                                           r"hands the optimizer different gradients at step 1"):
        audit.check_deterministic(one.base, 3, one.captures["big-batch"],
                                  two.captures["big-batch"], "float64")


def test_token_count_error_vanishes_with_equal_lengths(tmp_path):
    assert examined("audit_loops:tokens_equal_lengths", tmp_path).verdict == "equivalent"


@pytest.mark.parametrize("entrypoint, message", [
    ("audit_loops:never_steps", r"^train\(16, 1, 8\) never called optimizer.step\(\)"),
    ("audit_loops:counts_micro_batches", r"different numbers of optimizer steps \(train\(16, 1, "
                                         r"8\) made 8, train\(4, 4, 8\) made 2\)"),
    ("audit_loops:no_backward", r"^neither train\(16, 1, 8\) nor train\(4, 4, 8\) handed the "
                                r"optimizer a gradient at any of the 8 steps"),
    ("audit_loops:two_optimizers_one_per_micro_batch",
     r"^train\(\) steps several optimizers, at rates that depend on N: optimizer 1 \(over "
     r"Linear.1.weight, Linear.1.bias\) stepped 8 times in train\(16, 1, 8\) and 32 times in "
     r"train\(4, 4, 8\); optimizer 2 \(over Linear.0.weight, Linear.0.bias\) stepped 8 times "
     r"in train\(16, 1, 8\) and 8 times in train\(4, 4, 8\); each optimizer must step once"),
])
def test_loops_that_do_not_step_as_asked_are_refused(entrypoint, message, tmp_path):
    with pytest.raises(GradlabError, match=message):
        examined(entrypoint, tmp_path, k=8)


def test_a_loss_that_is_nan_in_both_runs_is_refused_before_any_determinism_check(tmp_path):
    with pytest.raises(GradlabError, match=r"train\(16, 1, 3\) hands the optimizer a "
                                           r"non-finite gradient from step 1 \(\|g\| = nan"):
        examined("audit_loops:nan_loss", tmp_path)


def test_a_nan_only_a_micro_batch_meets_differs_and_is_named(tmp_path):
    result = examined("audit_loops:nan_in_one_micro_batch", tmp_path)
    assert result.verdict == "differs" and result.first_difference["step"] == 1
    assert math.isnan(result.first_difference["grad_norm_accumulated"])
    assert "the accumulated run's gradient is not finite at step 1" in result.diagnosis
    assert "deterministic" not in result.diagnosis


@pytest.mark.slow  # a whole audit through the command line (two processes)
def test_a_loop_that_calls_sys_exit_is_refused_with_where(tmp_path):
    result, _ = cli_audit(tmp_path, "audit_loops:exits")
    assert result.exit_code == 2, result.output
    line = next(i for i, text in enumerate(Path(audit_loops.__file__).read_text().splitlines(), 1)
                if "raise SystemExit(5)" in text)
    assert result.stderr.strip() == (
        f"error: train(32, 1, {STEPS}) called sys.exit(5) in {audit_loops.__file__}, line "
        f"{line}; the audit calls train() and needs it to return: return instead of exiting")


def test_a_loop_that_raises_is_reported_where_it_raised(tmp_path):
    worker("audit_loops:raises", 4, 4, 3, COPY_LIMIT, tmp_path / "out.pt")
    error = audit.load_record(tmp_path / "out.pt")["error"]
    line = next(i for i, text in enumerate(Path(audit_loops.__file__).read_text().splitlines(),
                                           start=1) if "a shape mistake" in text)
    assert error.startswith("train(4, 4, 3) raised RuntimeError: mat1 and mat2 shapes")
    assert f"at audit_loops.py:{line};" in error


def test_batched_metrics_are_probes_metrics():
    """All steps at once give what metrics.compare_tensors gives step by step, edge cases too."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (4,), (2,)]
    ref = torch.randn(3, 12, generator=g, dtype=torch.float64)
    arm = ref + 1e-3 * torch.randn(3, 12, generator=g, dtype=torch.float64)
    ref[0, 6:10] = 0.0  # a parameter whose reference gradient is zero ...
    arm[1, 10:] = 0.0   # ... or whose arm gradient is
    ref[2, 10:], arm[2, 10:] = 0.0, 0.0  # or both: equal
    rows = audit.batched_rows(ref.numpy(), arm.numpy(), ["w", "b", "c"], shapes)
    def named(flat):
        parts = [p.view(s) for p, s in zip(flat.split([6, 4, 2]), shapes, strict=True)]
        return dict(zip("wbc", parts, strict=True))

    for step in range(3):
        a, r = named(arm[step]), named(ref[step])
        expected = metrics.compare_tensors((n, a[n], r[n]) for n in r)
        assert [r["param"] for r in rows[step]] == [r["param"] for r in expected]
        for got, want in zip(rows[step], expected, strict=True):
            for key in ("max_abs_err", "rel_l2_err", "cosine", "ref_norm", "arm_norm"):
                torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=0,
                                           equal_nan=True)
    assert rows[0][1]["rel_l2_err"] == math.inf and math.isnan(rows[0][1]["cosine"])
    assert rows[2][2]["rel_l2_err"] == 0.0 and rows[2][2]["cosine"] == 1.0


def test_parameters_of_different_shapes_are_refused(tmp_path):
    with pytest.raises(GradlabError, match=r"parameter '0.weight' has shape \[4, 3\] in "
                                           r"train\(4, 4, 3\) but \[16, 3\] in train\(16, 1, 3\)"):
        examined("audit_loops:width_from_batch", tmp_path)


def test_a_long_float32_run_stays_within_the_floor_at_the_big_batchs_weights(tmp_path):
    """Two runs left to train on their own drift apart by rounding, step after step, until
    their gradients differ by more than rounding; at the same weights they never do."""
    result = examined("experiments.tutorial_loop:train_float32", tmp_path, m=8, n=4, k=150)
    assert result.same_weights and result.captures["accumulated"]["forced"] == 150
    assert result.verdict == "equivalent"
    tolerance = rel_tolerance("float32", 4, 0.0)
    assert all(s["rel_grad_err"] <= tolerance / 10 for s in result.steps)


def test_optimizer_settings_that_depend_on_n_are_caught(tmp_path):
    """At the big batch's weights the update itself is not compared: its settings are."""
    result = examined("audit_loops:weight_decay_times_n", tmp_path)
    assert result.verdict == "differs" and result.first_difference["step"] == 1
    assert result.first_difference["rel_grad_err"] <= 1e-12  # the gradient is right
    assert "weight_decay 0.004 (big batch: 0.001)" in result.diagnosis
    # compare's verdict reads the gradient alone; the run's own check carries the rest
    result.seconds = {}
    run_dir = write_run(result, tmp_path / "out")
    checks = table(run_dir, "checks").set_index("check")
    assert not checks.loc["steps whose optimizer settings differ", "passed"]
    assert checks.loc["steps whose optimizer settings differ", "value"] == 3
    assert checks.loc["learning rate = big batch's", "passed"]
    assert gradlab("compare", run_dir, "--check").exit_code == 1


def test_large_models_are_estimated_from_projections(tmp_path):
    right = examined("audit_loops:right", tmp_path, copy_limit=0)
    assert right.estimate and right.verdict == "equivalent"
    assert not right.same_weights  # the weights are too large to pass along as well
    assert "projections" in right.captures["big-batch"]["steps"][0]
    assert "grad" not in right.captures["big-batch"]["steps"][0]
    exact = examined("audit_loops:right", tmp_path)
    # norms are exact; only the distance is estimated
    for est, ex in zip(right.steps, exact.steps, strict=True):
        torch.testing.assert_close(est["grad_norm_big_batch"], ex["grad_norm_big_batch"],
                                   rtol=1e-12, atol=0)
        assert math.isnan(est["max_abs_grad_err"])
    wrong = examined("audit_loops:not_divided", tmp_path, copy_limit=0)
    # E[(r.d)^2] = |d|^2: the estimate of N - 1 = 3 from 4 projections of 4 parameters
    assert 1.5 < wrong.first_difference["rel_grad_err"] < 4.5
    # the norms are exact and the projections of 4g are 4 times those of g: cosine 1
    torch.testing.assert_close(wrong.first_difference["cosine"], 1.0, rtol=0, atol=1e-12)
    assert "not divided by N = 4" in wrong.diagnosis


@pytest.mark.slow  # whole audits: two processes each
def test_a_loop_that_hangs_is_stopped_after_the_timeout_with_both_processes(tmp_path):
    started = time.monotonic()
    with pytest.raises(GradlabError) as caught:
        auditing.audit("audit_loops:hangs_after_two_steps", 4, steps=5, out=tmp_path,
                       timeout=3)
    took = time.monotonic() - started
    message = str(caught.value)
    assert re.match(r"stopped the audit: no optimizer step for [34] s \(--timeout 3\); "
                    r"train\(32, 1, 5\) is still running after 2 of 5 steps; "
                    r"train\(8, 4, 5\) is still running after 2 of 5 steps\.", message), message
    assert "give --timeout SECONDS (0: no limit)" in message
    assert took < 60, took  # imports, two steps, 3 s, the grace: not for ever
    assert not any(tmp_path.iterdir())  # no run directory


@pytest.mark.slow
def test_a_thread_left_running_after_train_returns_does_not_keep_the_audit_waiting(tmp_path):
    started = time.monotonic()
    result = auditing.audit("audit_loops:leaves_a_thread_running", 4, steps=3, out=tmp_path)
    assert result.verdict == "equivalent"
    assert time.monotonic() - started < 60  # the thread sleeps an hour


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_timeout_that_is_not_seconds_is_refused(value, tmp_path):
    result = gradlab("audit", "audit_loops:right", "-n", "4", "--timeout", value,
                     "--out", tmp_path)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: --timeout {float(value)}: give the seconds a loop "
                                     f"may go without an optimizer step (> 0), or 0 for no limit")


def test_the_watch_reads_every_ranks_beat(tmp_path):
    """A loop on W ranks steps when any of its ranks does: the watch reads the beat files
    beside each rank's record, where the workers write them."""
    class Running:
        def poll(self):
            return None

    _, arm = twins(8, 4, ranks=2)
    out = tmp_path / "accumulated.pkl"
    watch = audit.Watch(timeout=0, max_steps=5)
    watch.add(arm.call(5), Running(), [beat_of(r) for r in records_of(arm, out)])
    beat_of(rank_record(out, 1)).write_text("3")  # as worker.Recorder.record writes it
    watch.check()
    assert watch.loops[0]["steps"] == 3
