"""gradlab compare: verdicts, expectations, seeds, formats, and refusing bad runs untouched."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import gradlab
from gradlab.config import spec
from gradlab.record import verdict
from minirun import MINI, run_dir


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    """A folder holding two small equivalence runs that differ only by seed (0 and 1)."""
    out = tmp_path_factory.mktemp("seeds")
    for seed in (0, 1):
        run_dir("equivalence", *MINI, "--set", f"seed={seed}", "--out", out)
    return out


@pytest.fixture(scope="module")
def mini(seeds) -> Path:
    return sorted(seeds.iterdir())[0]


@pytest.fixture(scope="module")
def broken_promise(tmp_path_factory) -> Path:
    """The equivalence spec with the no-loss-scaling arm wrongly promised to be equivalent."""
    folder = tmp_path_factory.mktemp("broken")
    text = spec.builtin_specs()["equivalence"].read_text()
    marked = text.replace('loss_scale = "none"\nexpect = "differs"',
                          'loss_scale = "none"\nexpect = "equivalent"')
    assert marked != text
    (folder / "promise.toml").write_text(marked)
    return run_dir(folder / "promise.toml", *MINI, "--out", folder, exit_code=1)


def as_json(*args) -> dict:
    result = gradlab("compare", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def row(doc: dict, arm: str, n: int) -> dict:
    [found] = [r for r in doc["rows"] if r["arm"] == arm and r["accum_steps"] == n]
    return found


# ----------------------------------------------------------------------------- verdicts

def test_the_full_table_goes_to_stdout_and_names_the_tolerance(mini):
    result = gradlab("compare", mini, "--table", "full")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # the table is the command's result
    floors = pd.read_csv(mini / "summary.csv").exact_floor.dropna()
    for text in ("no-loss-scaling", "equivalent", "differs",
                 "tolerance = floor + (N−1)·u + 32·u_acc",
                 f"float32 (u = 2^-24, floor {floors.min():.2g}"):
        assert text in result.stdout


def test_verdicts_and_errors_match_the_run(mini):
    doc = as_json(mini)
    summary = pd.read_csv(mini / "summary.csv")
    by_key = {(r["trial"], r["arm"]): r for r in doc["rows"]}
    assert len(by_key) == len(summary) == 9
    for _, expected in summary.iterrows():
        assert by_key[(expected["trial"], expected["arm"])]["verdict"] == expected["verdict"]
    # forgetting to divide by N gives exactly N - 1; accumulating correctly stays within the
    # tolerance measured by the run, which compare reproduces from the same numbers
    recorded = summary.set_index(["trial", "arm"])
    for n in (2, 4):
        assert row(doc, "no-loss-scaling", n)["max_rel_grad_err"] == pytest.approx(n - 1)
        assert row(doc, "no-loss-scaling", n)["verdict"] == "differs"
        good = row(doc, "accumulated", n)
        floor = recorded.loc[(good["trial"], "accumulated"), "exact_floor"]
        assert 1e-8 < floor < 1e-6  # float32 rounding, measured
        assert good["rel_tolerance"] == verdict.rel_tolerance("float32", n, floor)
        assert good["rel_tolerance"] == recorded.loc[(good["trial"], "accumulated"),
                                                     "rel_tolerance"]
        assert 0 < good["max_exact_err"] <= good["rel_tolerance"]


def test_differs_is_not_checked_at_n_1(mini):
    doc = as_json(mini)
    assert row(doc, "no-loss-scaling", 1)["verdict"] == "equivalent"
    assert row(doc, "no-loss-scaling", 1)["check"] == "n/a"
    assert row(doc, "no-loss-scaling", 2)["check"] == "ok"
    assert row(doc, "accumulated", 1)["check"] == "ok"


def test_check_exits_0_when_every_expectation_holds(mini):
    result = gradlab("compare", mini, "--check")
    assert result.exit_code == 0, result.stderr
    assert "expectation failed" not in result.stderr


def test_check_exits_1_when_an_arm_promised_equivalent_differs(broken_promise):
    result = gradlab("compare", broken_promise, "--check")
    assert result.exit_code == 1
    failed = [line for line in result.stderr.splitlines() if "expectation failed" in line]
    assert len(failed) == 2  # N = 2 and N = 4; at N = 1 it is equivalent
    assert all("'no-loss-scaling': expected equivalent, got differs" in f for f in failed)
    # without --check the failure is shown, and the exit code stays 0
    assert gradlab("compare", broken_promise).exit_code == 0


@pytest.mark.parametrize("passed", [True, False])
def test_check_covers_the_checks_the_run_recorded(mini, tmp_path, passed):
    run = tmp_path / mini.name
    shutil.copytree(mini, run)
    trial = row(as_json(mini), "no-loss-scaling", 1)["trial"]
    (run / "checks.csv").write_text("trial,arm,check,value,tolerance,passed\n"
                                    f"{trial},no-loss-scaling,held grad,0.5,1e-13,{passed}\n")
    result = gradlab("compare", run, "--check")
    assert result.exit_code == (0 if passed else 1), result.stderr
    if not passed:  # at N = 1 its expectation is n/a, so only the recorded check fails it
        assert "arm 'no-loss-scaling': the run's check failed: 'held grad' (0.5 > tolerance " \
               "1.00e-13)" in result.stderr
        assert row(as_json(run), "no-loss-scaling", 1)["check"] == "FAIL"


def test_rtol_replaces_and_atol_widens_the_tolerance(mini):
    loose = as_json(mini, "--rtol", "5")  # above N - 1 = 3: the forgotten scaling passes
    assert row(loose, "no-loss-scaling", 4)["rel_tolerance"] == 5
    assert row(loose, "no-loss-scaling", 4)["verdict"] == "equivalent"
    assert any("--rtol" in note for note in loose["notes"])
    strict = as_json(mini, "--rtol", "1e-12")
    assert row(strict, "accumulated", 2)["verdict"] == "differs"
    widened = as_json(mini, "--rtol", "1e-12", "--atol", "1e9")
    assert row(widened, "accumulated", 2)["verdict"] == "equivalent"
    assert any("--atol" in note for note in widened["notes"])


def test_at_step_reads_the_metrics_at_that_step(mini):
    doc = as_json(mini, "--at-step", "1")
    steps = pd.read_csv(mini / "steps.csv")
    probes = pd.read_csv(mini / "probe.csv")
    got = row(doc, "no-loss-scaling", 4)
    trial = got["trial"]
    at = steps[(steps["trial"] == trial) & (steps["arm"] == "no-loss-scaling")
               & (steps["step"] == 1)]
    assert got["final_loss"] == pytest.approx(at["loss"].item())
    first = probes[(probes["trial"] == trial) & (probes["arm"] == "no-loss-scaling")
                   & (probes["param"] == "*") & (probes["step"] == 1)]
    assert got["max_rel_grad_err"] == pytest.approx(first["rel_l2_err"].item())
    result = gradlab("compare", mini, "--at-step", "99")
    assert result.exit_code == 2
    assert "past the end" in result.stderr and "3 steps" in result.stderr


def test_baseline_option_moves_the_loss_reference(mini):
    doc = as_json(mini, "--baseline", "no-loss-scaling")
    assert row(doc, "no-loss-scaling", 4)["loss_diff"] == 0
    steps = pd.read_csv(mini / "steps.csv")
    trial = row(doc, "accumulated", 4)["trial"]
    last = steps[(steps["trial"] == trial) & (steps["step"] == 3)].set_index("arm")["loss"]
    expected = abs(last["accumulated"] - last["no-loss-scaling"]) / last["no-loss-scaling"]
    assert row(doc, "accumulated", 4)["loss_diff"] == pytest.approx(expected)
    assert any("--baseline no-loss-scaling changes only loss diff" in n for n in doc["notes"])
    result = gradlab("compare", mini, "--baseline", "nope")
    assert result.exit_code == 2 and "accumulated, big-batch, no-loss-scaling" in result.stderr


def test_sort_and_columns(mini):
    doc = as_json(mini, "--sort", "max_rel_grad_err", "--reverse")
    errors = [r["max_rel_grad_err"] for r in doc["rows"] if r["max_rel_grad_err"] is not None]
    assert errors == sorted(errors, reverse=True) and errors[0] == pytest.approx(3)
    # by default only the settings that tell rows apart; --all shows every one
    assert "lr" not in doc["columns"] and "loss_scale" not in doc["columns"]
    assert {"arm", "accum_steps", "verdict", "check"} <= set(doc["columns"])
    assert {"lr", "seed", "loss_scale", "expect"} <= set(as_json(mini, "--all")["columns"])
    result = gradlab("compare", mini, "--sort", "nope")
    assert result.exit_code == 2 and "--sort nope" in result.stderr


def test_csv_is_tidy(mini):
    result = gradlab("compare", mini, "--format", "csv")
    assert result.exit_code == 0, result.stderr
    table = pd.read_csv(io.StringIO(result.stdout))
    assert len(table) == 9
    assert set(table["verdict"]) == {"baseline", "equivalent", "differs"}


def markdown_table(text: str) -> list[list[str]]:
    """The first Markdown table in text, as rows of cells, checked for shape."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    block = text.split("\n\n")[0].splitlines()
    assert block == lines[:len(block)], "the table comes first, in one block"
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in block]
    header, separator, body = cells[0], cells[1], cells[2:]
    assert all(set(c) <= set("-:") and c.count("-") >= 3 for c in separator)
    assert body and all(len(r) == len(header) == len(separator) for r in body)
    return cells


def test_markdown_is_a_valid_table(mini):
    result = gradlab("compare", mini, "--format", "md", "--table", "full")
    assert result.exit_code == 0, result.stderr
    cells = markdown_table(result.stdout)
    assert cells[0][:2] == ["trial", "arm"] and "rel grad err" in cells[0]
    assert len(cells) == 2 + 9
    assert "floor + (N−1)·u" in result.stdout  # the tolerance note follows the table


# ----------------------------------------------------------------------------- seeds

def test_runs_that_differ_only_by_seed_show_mean_and_std(seeds):
    doc = as_json(seeds)
    assert doc["grouped_over_seeds"] is True
    assert len(doc["rows"]) == 9  # 3 trials x 3 arms, two seeds each
    assert {r["seeds"] for r in doc["rows"]} == {"0,1"} and {r["n"] for r in doc["rows"]} == {2}
    finals = pd.concat(pd.read_csv(d / "summary.csv") for d in sorted(seeds.iterdir()))
    losses = finals[(finals["arm"] == "no-loss-scaling") & (finals["accum_steps"] == 4)]
    got = row(doc, "no-loss-scaling", 4)
    assert got["final_loss_mean"] == pytest.approx(losses["final_loss"].mean())
    assert got["final_loss_std"] == pytest.approx(losses["final_loss"].std())
    assert got["final_loss_std"] > 0
    md = gradlab("compare", seeds, "--format", "md", "--table", "full").stdout
    cells = markdown_table(md)
    assert "seeds" in cells[0] and any("±" in c for c in cells[2])


# ----------------------------------------------------------------------------- bad input

def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def damage_csv_line(run: Path) -> str:
    text = (run / "steps.csv").read_text()
    (run / "steps.csv").write_text(text[:len(text) - 25])  # cut in the middle of a line
    return "truncated or corrupted"


def drop_last_row(run: Path) -> str:
    lines = (run / "summary.csv").read_text().splitlines(keepends=True)
    (run / "summary.csv").write_text("".join(lines[:-1]))
    return "no row for trial"


def text_in_numbers(run: Path) -> str:
    lines = (run / "probe.csv").read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace(",0.", ",zz", 1)
    (run / "probe.csv").write_text("".join(lines))
    return "holds text where numbers belong"


def garbage_csv(run: Path) -> str:
    (run / "eval.csv").write_bytes(b"trial,arm,step\n\xff\xfe\x00garbage\n")
    return "truncated or corrupted"


def cut_run_json(run: Path) -> str:
    text = (run / "run.json").read_text()
    (run / "run.json").write_text(text[:len(text) // 2])
    return "run.json' is corrupted or truncated"


def set_status(status: str):
    def damage(run: Path) -> str:
        meta = json.loads((run / "run.json").read_text())
        meta["status"] = status
        if status == "failed":
            meta["error"] = "Traceback...\nRuntimeError: out of memory"
        (run / "run.json").write_text(json.dumps(meta))
        return {"running": "is still running", "failed": "failed: RuntimeError: out of memory",
                "interrupted": "was interrupted"}[status]
    return damage


def not_a_run(run: Path) -> str:
    (run / "run.json").unlink()
    return "is not a run directory (no run.json"


def empty(run: Path) -> str:
    shutil.rmtree(run)
    run.mkdir()
    return "is an empty folder"


DAMAGE = {"truncated line": damage_csv_line, "missing last row": drop_last_row,
          "text in a number column": text_in_numbers, "binary garbage": garbage_csv,
          "truncated run.json": cut_run_json, "still running": set_status("running"),
          "failed": set_status("failed"), "interrupted": set_status("interrupted"),
          "not a run": not_a_run, "empty folder": empty}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_bad_runs_exit_2_with_one_line_and_stay_untouched(case, mini, tmp_path):
    run = tmp_path / mini.name
    shutil.copytree(mini, run)
    expected = DAMAGE[case](run)
    before = tree_hash(tmp_path)
    for command in (["compare"], ["compare", "--check"], ["plot"], ["report"]):
        result = gradlab(*command, run)
        assert result.exit_code == 2, (command, result.stdout, result.stderr)
        message = result.stderr.strip()
        assert "\n" not in message and message.startswith("error:"), message
        assert expected in message, message
        assert "Traceback" not in message
    assert tree_hash(tmp_path) == before
    assert not (run / "figures").exists()


def test_runs_of_different_experiments_are_not_mixed(mini, tmp_path):
    toy = run_dir("toy", "--out", tmp_path)
    before = {**tree_hash(toy), **tree_hash(mini)}
    for command in ("compare", "plot"):
        result = gradlab(command, mini, toy)
        assert result.exit_code == 2
        assert "different experiments" in result.stderr
        assert "(equivalence)" in result.stderr and "(toy)" in result.stderr
    assert {**tree_hash(toy), **tree_hash(mini)} == before


def test_a_path_that_does_not_exist(tmp_path):
    result = gradlab("compare", tmp_path / "nope")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_compare_agrees_with_the_runner_on_the_full_equivalence_run(equivalence_dir):
    doc = as_json(equivalence_dir)
    summary = pd.read_csv(equivalence_dir / "summary.csv")
    assert [r["verdict"] for r in doc["rows"]] == list(summary["verdict"])
    assert all(r["check"] in ("ok", "") for r in doc["rows"])
    assert {"model", "norm", "dtype", "accum_steps"} <= set(doc["columns"])
    assert "dataset" not in doc["columns"]  # the model already says which dataset


def test_a_seed_repeated_across_runs_is_counted_once(seeds, tmp_path):
    zero, one = sorted(seeds.iterdir())
    for folder, runs in (("repeats", [zero]), ("mixed", [zero, one])):
        for run in runs:
            shutil.copytree(run, tmp_path / folder / run.name)
        shutil.copytree(zero, tmp_path / folder / f"{zero.name}-again")
    repeats = as_json(tmp_path / "repeats")
    assert {(r["seeds"], r["n"]) for r in repeats["rows"]} == {("0", 1)}
    assert all(r["final_loss_std"] is None for r in repeats["rows"])
    [note] = [n for n in repeats["notes"] if "repeat" in n]
    assert "seed 0" in note and f"{zero.name}-again" in note and "counted once" in note

    mixed = as_json(tmp_path / "mixed")
    assert {(r["seeds"], r["n"]) for r in mixed["rows"]} == {("0,1", 2)}
    losses = pd.concat(pd.read_csv(d / "summary.csv") for d in (zero, one))
    losses = losses[(losses["arm"] == "no-loss-scaling") & (losses["accum_steps"] == 4)]
    got = row(mixed, "no-loss-scaling", 4)
    assert got["final_loss_mean"] == pytest.approx(losses["final_loss"].mean(), rel=1e-12)
    assert got["final_loss_std"] == pytest.approx(losses["final_loss"].std(), rel=1e-12)
    assert any("repeat" in n for n in mixed["notes"])
    assert not any("repeat" in n for n in as_json(seeds)["notes"])  # no repeats, no note


@pytest.mark.parametrize("case", ["missing", "corrupted", "running"])
@pytest.mark.parametrize("flag", [["--json"], ["--format", "json"]])
def test_compare_json_says_a_bad_input_in_a_json_document(tmp_path, case, flag):
    """As `run --json` does: one JSON document on stdout, the one line on stderr, exit 2."""
    run = tmp_path / "run"
    if case == "corrupted":
        run.mkdir()
        (run / "run.json").write_text("{half a run.json")
    if case == "running":  # a finished run's run.json marked running, by this live process
        run = run_dir("toy", "--set", "steps=2", "--out", tmp_path)
        meta = json.loads((run / "run.json").read_text())
        meta.update(status="running", pid=os.getpid())
        (run / "run.json").write_text(json.dumps(meta))
    result = gradlab("compare", run, *flag)
    assert result.exit_code == 2, result.output
    doc = json.loads(result.stdout)
    assert doc["status"] == "bad-input" and doc["run_dir"] is None
    assert doc["error"] in " ".join(result.stderr.split())
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    if case == "running":
        assert "is still running" in doc["error"]
