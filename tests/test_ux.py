"""What a user reads: the compact table at 80 and 120 columns, results on stdout, a fast
start, --version, show, init, specs found in ./experiments, progress off a terminal."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from conftest import gradlab
from gradlab import __version__, cli, zoo
from gradlab.cli import render, shared
from gradlab.config import catalog, spec
from gradlab.readers import compact, compare
from gradlab.record import store
from minirun import MINI, run_dir

GRADLAB = [sys.executable, "-m", "gradlab.cli"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """equivalence on the mlp, float32, N = 1, 2, 4, 3 steps."""
    return run_dir("equivalence", *MINI, "--out", tmp_path_factory.mktemp("mini"))


def judged(run: Path) -> compare.Comparison:
    return compare.compare(store.load_runs([run]))


# ----------------------------------------------------------------------------- the pivot

def test_the_pivot_has_one_row_per_arm_and_one_column_per_n(mini):
    pivot = compact.pivot(judged(mini))
    assert pivot.labels == ["arm"] and pivot.ns == [1, 2, 4]
    assert pivot.header() == ["arm", "N=1", "N=2", "N=4"]
    rows = {labels[0]: cells for labels, cells in pivot.rows}
    assert list(rows) == ["big-batch", "accumulated", "no-loss-scaling"]  # the spec's order
    summary = pd.read_csv(mini / "summary.csv")
    for arm in ("accumulated", "no-loss-scaling"):
        for n, cell in zip((1, 2, 4), rows[arm], strict=True):
            (row,) = summary[(summary.arm == arm) & (summary.accum_steps == n)].itertuples()
            assert cell.text.startswith(compact.short(row.max_exact_err))  # the judged number
    # forgetting to divide by N is N - 1 away, as expected (green), except at N = 1
    assert [c.text for c in rows["no-loss-scaling"][1:]] == ["1✓", "3✓"]
    assert [c.outcome for c in rows["no-loss-scaling"]] == ["n/a", "ok", "ok"]
    assert rows["no-loss-scaling"][0].text.endswith("·")
    assert {c.outcome for c in rows["accumulated"]} == {"ok"}
    # the baseline's row is its own distance from the exact gradient: the floor
    floors = summary.groupby("trial").exact_floor.max()
    assert [c.text for c in rows["big-batch"]] == [compact.short(f) for f in floors]
    assert {c.outcome for c in rows["big-batch"]} == {"baseline"}
    assert pivot.totals == "5 expectations hold, 1 n/a, 0 fail"


def test_a_run_made_before_the_exact_reference_pivots_its_rel_grad_err(mini, tmp_path):
    old = tmp_path / mini.name
    shutil.copytree(mini, old)
    summary = pd.read_csv(old / "summary.csv").drop(columns=["max_exact_err", "exact_floor"])
    summary.to_csv(old / "summary.csv", index=False)
    pivot = compact.pivot(judged(old))
    assert pivot.title == "equivalence: rel grad err by N"
    rows = {labels[0]: cells for labels, cells in pivot.rows}
    assert [c.text for c in rows["no-loss-scaling"]] == ["0·", "1✓", "3✓"]
    assert pivot.totals == "5 expectations hold, 1 n/a, 0 fail"


def test_short_numbers():
    assert [compact.short(v) for v in (0.0, 1.8e-7, 2.44e-16, 3.0, 15.0, 0.0123, 2.8e12,
                                       float("nan"))] == \
        ["0", "1.8e-7", "2.4e-16", "3", "15", "0.012", "2.8e12", "-"]


def wide_pivot() -> compact.Pivot:
    """The norm experiment's shape: three settings, the arm, six N columns, the widest
    numbers gradlab prints."""
    cell = compact.PivotCell
    rows = []
    for norm, mode in (("bn", "train"), ("bn", "frozen"), ("none", "train")):
        for dtype in ("float32", "float64"):
            rows.append(([norm, mode, dtype, "big-batch"],
                         [cell("2.7e-7", "baseline")] * 6))
            rows.append(([norm, mode, dtype, "accumulated"],
                         [cell("2.4e-16·", "n/a")] + [cell("2.4e-16✓", "ok")] * 4
                         + [cell("0.33✗", "FAIL")]))
    return compact.Pivot("norm: each arm's distance from the exact gradient (vs exact) by N",
                         ["norm", "bn_mode", "dtype", "arm"], [1, 2, 4, 8, 16, 32], rows,
                         "40 expectations hold, 6 n/a, 6 fail", ["vs exact: how to read it."])


def rendered(pivot: compact.Pivot, width: int, colour: bool = False) -> str:
    buffer = io.StringIO()
    out = Console(file=buffer, width=width, force_terminal=colour,
                  color_system="standard" if colour else None)
    render.render_pivot(pivot, out)
    return buffer.getvalue()


@pytest.mark.parametrize("width", [80, 120])
def test_the_pivot_fits_the_terminal_and_never_cuts_n_or_a_number(width):
    pivot = wide_pivot()
    text = rendered(pivot, width)
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    header = next(line for line in lines if "N=1" in line)
    assert re.search(r"N=1 +N=2 +N=4 +N=8 +N=16 +N=32$", header.rstrip())
    body = [line for line in lines if "big-batch" in line or "accumulated" in line]
    assert len(body) == len(pivot.rows)  # no arm name folded onto a second line
    for (labels, cells), line in zip(pivot.rows, body, strict=True):
        # every cell whole, in order, on the arm's own line
        assert re.search(r"\s+".join(re.escape(c.text) for c in cells) + "$", line.rstrip())
        assert labels[-1] in line
    if width == 120:  # room for everything: the settings are not folded either
        assert all(" ".join(labels[:3]) in re.sub(" +", " ", line)
                   for (labels, _), line in zip(pivot.rows, body, strict=True))
    assert "40 expectations hold, 6 n/a, 6 fail" in text


def test_colour_follows_the_expectation_not_the_verdict():
    text = rendered(wide_pivot(), 120, colour=True)
    green, red, dim = "\x1b[32m", "\x1b[1;31m", "\x1b[2m"
    def styled(style: str, cell: str) -> bool:  # a right-aligned cell: its padding styled too
        return re.search(re.escape(style) + " *" + re.escape(cell), text) is not None

    assert styled(green, "2.4e-16✓")  # met
    assert styled(red, "0.33✗")       # failed
    assert styled(dim, "2.4e-16·")    # not checked
    assert styled(dim, "2.7e-7") and not styled(green, "2.7e-7")  # the baseline: grey


def test_at_80_columns_the_cli_prints_the_pivot_whole(equivalence_dir):
    result = gradlab("compare", equivalence_dir, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    header = next(line for line in lines if line.startswith("model"))
    assert header.split() == ["model", "norm", "dtype", "arm", "N=2", "N=4"]
    # 2 tasks x ... : one row per (model, norm, dtype, arm), each on one line
    rows = [line for line in lines if line.split()[:1] in (["mlp"], ["cnn"])]
    assert len(rows) == 3 * 2 * 3
    assert all(line.rstrip().endswith(("✓", "✗", "·")) or "big-batch" in line
               for line in rows)
    assert "24 expectations hold, 0 n/a, 0 fail" in result.stdout


@pytest.mark.parametrize("width", ["80", "120"])
def test_the_full_table_never_cuts_a_number_n_verdict_or_check(equivalence_dir, width):
    result = gradlab("compare", equivalence_dir, "--table", "full", env={"COLUMNS": width})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= int(width)
    doc = json.loads(gradlab("compare", equivalence_dir, "--json").stdout)
    if width == "80":  # too narrow for every number whole: each row's cells a line each
        blocks = "\n".join(lines).split("\ntrial ")[1:]
        assert len(blocks) == len(doc["rows"])
        for block, row in zip(blocks, doc["rows"], strict=True):
            assert block.startswith(f"{row['trial']}, arm {row['arm']}\n")
            assert f"\n  N: {row['accum_steps']}\n" in block
            assert f"\n  verdict: {row['verdict']}" in block
        return
    arms = {row["arm"] for row in doc["rows"]}
    rows = [line for line in lines if arms & set(line.split())]
    assert len(rows) == len(doc["rows"])
    for line, row in zip(rows, doc["rows"], strict=True):
        # the arm, its N, its verdict and its check on the row's first line, whole
        words = line.split()
        assert row["arm"] in words and row["verdict"] in words
        assert str(row["accum_steps"]) in words
        assert not row["check"] or words[-1] == row["check"]
    if width == "120":  # at 120 every column fits whole: nothing folded
        table = lines[:next(i for i, line in enumerate(lines) if line.startswith("verdict:"))]
        assert len([line for line in table if line[:1].isdigit()]) == len(doc["rows"])


@pytest.mark.parametrize("table", ["compact", "full"])
def test_at_20_columns_every_number_is_a_line_of_its_own(equivalence_dir, table):
    result = gradlab("compare", equivalence_dir, "--table", table, env={"COLUMNS": "20"})
    assert result.exit_code == 0, result.stderr
    doc = json.loads(gradlab("compare", equivalence_dir, "--json").stdout)
    if table == "compact":  # every measured cell of the pivot, whole, with its mark
        cells = re.findall(r"^  N=(\d+): (\S+)$", result.stdout, re.M)
        assert len(cells) == len(doc["rows"])  # one per arm and N (the baseline's floor too)
        marked = [value for _, value in cells if value[-1] in "✓✗·"]
        assert len(marked) == sum(1 for row in doc["rows"] if row["verdict"] != "baseline")
    else:
        assert result.stdout.count("\n  verdict: ") == len(doc["rows"])
    assert "Traceback" not in result.stderr


def test_a_run_of_one_arm_gets_a_pivot_of_what_it_measured(tmp_path):
    text = """
name = "training-mini"
[settings]
model = "mlp"
dataset = "digits"
batch_size = 16
steps = 3
[arms.trained]
baseline = true
[sweep]
norm = ["none", "ln"]
accum_steps = [1, 2]
seed = [0, 1]
"""
    (tmp_path / "spec.toml").write_text(text)
    run = run_dir(tmp_path / "spec.toml", "--out", tmp_path)
    pivot = compact.pivot(judged(run))
    assert pivot.title == "training-mini: test acc by N (micro-batch B/N, B = 16), mean ± std " \
                          "over 2 seeds"
    assert pivot.labels == ["norm"] and pivot.ns == [1, 2]
    summary = pd.read_csv(run / "summary.csv")
    for (norm,), cells in pivot.rows:
        for n, cell in zip((1, 2), cells, strict=True):
            accuracy = summary[(summary.norm == norm) & (summary.accum_steps == n)] \
                .final_test_accuracy
            assert cell.text.startswith(compare.fmt(accuracy.mean()) + "±")
            assert cell.outcome == ""
    result = gradlab("compare", run)
    assert result.exit_code == 0 and "test acc by N" in result.stdout
    assert "verdict" not in result.stdout and "expectations hold" not in result.stdout


# ----------------------------------------------------------------------------- stdout, stderr

def test_results_go_to_stdout_and_messages_to_stderr(mini):
    compared = gradlab("compare", mini)
    assert compared.exit_code == 0 and compared.stderr == ""
    assert len(compared.stdout.splitlines()) >= 3 + 2  # title, header, rule, 3 rows, totals
    assert "5 expectations hold, 1 n/a, 0 fail" in compared.stdout
    listed = gradlab("list")
    assert listed.stderr == "" and any(" lr " in line for line in listed.stdout.splitlines())
    # a run: its result is the run directory, on stdout alone; the plan and table on stderr
    ran = gradlab("run", "toy", "--out", mini.parent / "toy")
    assert ran.exit_code == 0, ran.stderr
    assert ran.stdout.splitlines() == [ran.stdout.strip()]
    assert Path(ran.stdout.strip()).is_dir()
    assert "1 expectation holds, 0 n/a, 0 fail" in ran.stderr
    assert "toy: 1 trial x 2 arms" in ran.stderr


def test_a_pipe_reads_lines(mini):
    """`gradlab list | grep lr` and `gradlab compare RUN | wc -l` in real processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("COLUMNS", None)
    listed = subprocess.run([*GRADLAB, "list"], capture_output=True, text=True, env=env,
                            check=True)
    assert [line for line in listed.stdout.splitlines() if re.search(r"\blr\b", line)]
    assert listed.stderr == ""
    compared = subprocess.run([*GRADLAB, "compare", str(mini)], capture_output=True,
                              text=True, env=env, check=True)
    assert len(compared.stdout.splitlines()) >= 6 and compared.stderr == ""
    assert "\x1b[" not in compared.stdout  # no colour codes in a pipe


# ----------------------------------------------------------------------------- start-up

HEAVY = ("torch", "pandas", "matplotlib")
# runs the CLI as the `gradlab` script does, then names the heavy modules it imported
IMPORTED = """import sys
sys.argv = ["gradlab", *sys.argv[1:]]
from gradlab import cli
try:
    cli.main()
except SystemExit:
    pass
print("IMPORTED", sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"], ["--version"], ["list"],
                                  ["list", "--json"], ["run", "--help"], ["compare", "-h"],
                                  ["show", "toy", "--no-estimate"]])
def test_fast_commands_import_no_torch_pandas_or_matplotlib(args, tmp_path):
    done = subprocess.run([sys.executable, "-c", IMPORTED.format(heavy=HEAVY), *args],
                          capture_output=True, text=True, cwd=tmp_path, check=True)
    assert done.stdout.splitlines()[-1] == "IMPORTED []", done.stdout + done.stderr


def test_importing_the_cli_imports_nothing_heavy():
    done = subprocess.run([sys.executable, "-c", "import sys, gradlab.cli; print(sorted(m for m "
                                                 f"in {HEAVY!r} if m in sys.modules))"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_catalog_names_every_model_and_dataset():
    assert list(catalog.MODELS) == list(zoo.MODELS)
    assert list(catalog.DATASETS) == list(zoo.DATASETS)
    assert zoo.MODELS["mlp"][1] == catalog.MODELS["mlp"]


# ----------------------------------------------------------------------------- version, help

@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag):
    result = gradlab(flag)
    assert result.exit_code == 0 and result.stdout == f"gradlab {__version__}\n"


def test_short_help_and_completion():
    short, long = gradlab("-h"), gradlab("--help")
    assert short.exit_code == 0 and short.stdout == long.stdout
    assert "--install-completion" in long.stdout and "show" in long.stdout
    assert gradlab("run", "-h").stdout == gradlab("run", "--help").stdout
    assert shared.complete_spec_names("zero") == ["zero-grad-toy", "zero-grad"]
    # the shell named, not detected: detection reads the parent processes, which vary (a
    # job started in the background has none that shellingham knows); typer reads this
    # variable when it builds the options, so in a process of its own
    command = str(Path(sys.executable).with_name("gradlab"))  # the installed script's name
    script = subprocess.run([command, "--show-completion", "bash"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert script.returncode == 0 and "_GRADLAB_COMPLETE" in script.stdout, script.stderr


# ----------------------------------------------------------------------------- show, init, list

def test_show_prints_the_resolved_spec_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = gradlab("show", "norm", "--no-estimate")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "spec: " in out and "norm.toml (built-in)" in out
    assert "settings of every arm: model=cnn dataset=digits batch_size=64 steps=50" in out
    big = next(line for line in out.splitlines() if "big-batch" in line)
    assert "baseline" in big and "accum_steps=1" in big and "all B examples in one" in big
    # the sweep sets what this arm expects: differs for BatchNorm, equivalent elsewhere
    assert "differs or equivalent" in out
    assert re.search(r"accum_steps +1 \| 2 \| 4 \| 8 \| 16 \| 32", out)
    assert "72 trials x 2 arms = 144 trainings, 7200 optimizer steps in all" in out
    assert "not estimated (--no-estimate)" in out
    assert not (tmp_path / "results").exists()  # nothing was run


def test_show_estimates_the_time_and_follows_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = gradlab("show", "toy", "--set", "seed=0,1,2")
    assert result.exit_code == 0, result.stderr
    assert "3 trials x 2 arms = 6 trainings, 6 optimizer steps in all" in result.stdout
    assert re.search(r"cost: about \d+ s and .*MiB", result.stdout)
    assert "run it: gradlab run toy --set seed=0,1,2" in result.stdout
    assert not (tmp_path / "results").exists()


def test_show_refuses_bad_input_in_one_line():
    result = gradlab("show", "nope")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "no built-in experiment 'nope'" in result.stderr


def test_init_copies_a_builtin_spec_that_run_then_finds_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = gradlab("init", "toy")
    assert result.exit_code == 0, result.stderr
    copy = Path("experiments/toy.toml")
    assert result.stdout == f"{copy}\n"
    assert copy.read_text() == spec.builtin_specs()["toy"].read_text()
    assert spec.find_spec("toy") == copy
    listed = next(line for line in gradlab("list").stdout.splitlines() if "│ toy " in line)
    assert "experiments/toy.toml (replaces the built-in)" in listed
    # edited, it is the one that runs: a learning rate of 0.02 moves w twice as far
    copy.write_text(copy.read_text().replace("lr = 0.01", "lr = 0.02"))
    shown = gradlab("show", "toy", "--no-estimate").stdout
    assert "experiments/toy.toml (your own)" in shown and "lr=0.02" in shown
    ran = gradlab("run", "toy", "--json", "--out", "results")
    doc = json.loads(ran.stdout)
    assert json.loads((Path(doc["run_dir"]) / "run.json").read_text())["spec_source"] \
        == "experiments/toy.toml"
    weights = pd.read_csv(Path(doc["run_dir"]) / "weights.csv")
    assert weights[weights.step == 1].value.tolist() == pytest.approx([1.4, 1.4])


def test_init_under_another_name_and_its_refusals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = gradlab("init", "equivalence", "--as", "my-equivalence")
    assert result.exit_code == 0, result.stderr
    text = Path("experiments/my-equivalence.toml").read_text()
    assert text.startswith("# gradlab run my-equivalence\n") and 'name = "my-equivalence"' in text
    assert spec.load_spec("my-equivalence").name == "my-equivalence"
    listed = gradlab("list").stdout
    assert re.search(r"│ my-equivalence +│.*│ experiments/my-equivalence.toml +│", listed)
    for args, message in (
            (["equivalence", "--as", "my-equivalence"], "already exists; edit it, remove it"),
            (["nope"], "no built-in experiment 'nope'; choose one of"),
            (["toy", "--as", "../escape"], "--as ../escape: a spec name is letters")):
        refused = gradlab("init", *args)
        assert refused.exit_code == 2, refused.stdout
        assert refused.stderr.count("\n") == 1 and message in refused.stderr
    assert sorted(p.name for p in Path("experiments").iterdir()) == ["my-equivalence.toml"]


# ----------------------------------------------------------------------------- progress

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_progress_is_a_line_every_10_s_with_the_time_left(capsys):
    clock = Clock()
    with render.RunProgress("equivalence", 30, 100, estimate=50.0, clock=clock) as progress:
        assert progress.left() == "about 50 s left"  # before any step: preflight's estimate
        clock.now = 5.0  # building the first models: no step yet
        assert progress.left() == "about 50 s left"
        for second in range(6, 46):  # 2 steps a second, then 1 from t = 16
            clock.now = float(second)
            progress.advance(2 if second <= 15 else 1)
        clock.now = 80.0
        progress.advance(100 - progress.done)
    lines = capsys.readouterr().err.splitlines()
    # the pace counts from the first step (t = 6, 2 steps done): at t = 10, 8 more in 4 s,
    # so the 90 left take 45 s (from the start, 10 steps in 10 s, it would say 90 s)
    assert lines == [
        "equivalence: 10 of 100 steps (10%), 10 s so far, about 45 s left",   # 4 * 90 / 8
        "equivalence: 25 of 100 steps (25%), 20 s so far, about 46 s left",   # 14 * 75 / 23
        "equivalence: 35 of 100 steps (35%), 30 s so far, about 47 s left",   # 24 * 65 / 33
        "equivalence: 45 of 100 steps (45%), 40 s so far, about 43 s left",   # 34 * 55 / 43
        "equivalence: 100 of 100 steps done in 80 s"]


def test_progress_is_silent_with_json(capsys):
    clock = Clock()
    with render.RunProgress("toy", 1, 4, estimate=1.0, shown=False, clock=clock) as progress:
        clock.now = 30.0
        progress.advance(2)
    assert capsys.readouterr().err == ""


def test_the_version_is_the_package_version():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == __version__
    assert pyproject["project"]["license"] == "MIT"
    assert (Path(__file__).parents[1] / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.parametrize("ending, status, said", [(None, 0, ""), (0, 0, ""), (2, 2, ""),
                                                  ("error: no such run", 1,
                                                   "error: no such run\n")])
def test_the_script_exits_with_mains_status_without_the_interpreters_teardown(
        monkeypatch, capsys, ending, status, said):
    def main():
        print("printed")
        raise SystemExit(ending)

    class Exited(Exception):
        pass

    def quick_exit(code):
        raise Exited(code)

    monkeypatch.setattr(cli, "main", main)
    monkeypatch.setattr(cli.os, "_exit", quick_exit)
    with pytest.raises(Exited) as exited:
        cli.script()
    assert exited.value.args == (status,)
    assert capsys.readouterr() == ("printed\n", said)


def test_the_script_leaves_the_exit_to_python_while_a_thread_runs(monkeypatch):
    import threading

    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    monkeypatch.setattr(cli, "main", lambda: None)
    monkeypatch.setattr(cli.os, "_exit", lambda code: pytest.fail("os._exit with a thread"))
    try:
        with pytest.raises(SystemExit) as exited:
            cli.script()
    finally:
        release.set()
        thread.join()
    assert exited.value.code == 0


@pytest.mark.parametrize("command", [["list"], ["show", "equivalence"]])
def test_a_reader_that_stops_early_ends_gradlab_quietly_with_exit_0(command):
    """`gradlab list | head -1` under `set -o pipefail`: the reader had enough, as with any
    Unix filter; no message, exit 0 (click and rich each exit 1 on a broken pipe)."""
    process = subprocess.Popen([*GRADLAB, *command], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout.read(1)
    process.stdout.close()  # what head does after its first line
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 0, stderr
    assert stderr == b""


def test_a_failure_with_stdout_on_dev_null_keeps_its_exit_code(tmp_path):
    done = subprocess.run([*GRADLAB, "compare", str(tmp_path / "missing")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 2 and b"error:" in done.stderr
