"""Data-parallel arms (world_size > 1): W ranks of DistributedDataParallel, gloo on loopback.

Four runs start real processes: `gradlab run ddp --set world_size=2` (gradlab's own
launcher) three times (a good run, a rank that raises, a run to stop with SIGTERM) and
`torchrun --nproc-per-node 2 -m gradlab run ddp`, each rank with one thread. They are
small (an mlp, 2 steps), so most of their time is Pythons importing torch: all four
start together with the module, and each test waits for its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from conftest import gradlab
from gradlab.config import spec
from gradlab.config.settings import Settings, Sync
from gradlab.errors import GradlabError
from gradlab.lab import distributed, parallel
from gradlab.setup import Setup, mse_loss
from gradlab.train import engine, replica
from test_cli import assert_clean_failure

# every run here starts torchrun ranks (about 30 s of the module's start on two cores): the slow
# run, which CI makes too, keeps the default run under five minutes
pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
# far more than any of these runs takes: reached only if a rank hangs
HANG = 240


def rank_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # loopback only, under torchrun too (gradlab's launcher binds it itself)
    loopback = {"GLOO_SOCKET_IFNAME": distributed.loopback_interface() or "lo"}
    return {**env, **loopback, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}


def start(*args: str, launcher: tuple[str, ...] = (sys.executable, "-m", "gradlab"),
          cwd: Path | None = None) -> subprocess.Popen:
    # a session of its own: stop() can end the launcher and every rank it started at once
    return subprocess.Popen([*launcher, "run", *args], env=rank_env(), text=True, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """End a launcher that is still running, and its ranks, which hold its pipes open: a
    SIGTERM, which both launchers pass to their ranks, then SIGKILL to the whole process
    group (ranks included, should the launcher be gone); never wait forever."""
    if process.poll() is None:
        process.terminate()
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # its group's id is its pid (a new session)
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=HANG)
    return process.returncode, stdout, stderr


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def the_run(out: Path) -> Path:
    (run,) = out.iterdir()
    return run


def assert_one_error(stderr: str, start: str) -> None:
    """The run's end in one line, said once (by rank 0), after its notes and plan."""
    lines = stderr.splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], stderr
    assert lines[-1].startswith(start), stderr
    assert "Traceback" not in stderr


def assert_ranks_gone(meta: dict, size: int = 2) -> None:
    ranks = meta["ranks"]
    assert [r["rank"] for r in ranks] == list(range(size))
    assert len({r["pid"] for r in ranks}) == size
    assert not any(alive(r["pid"]) for r in ranks)


# ----------------------------------------------------------------------------- in-process

@pytest.mark.parametrize(("size", "n"), [(1, 4), (2, 4), (3, 2), (4, 1)])
@pytest.mark.parametrize("batch", [12, 13])
def test_the_ranks_together_see_every_example_of_the_window_once(size, n, batch):
    window = (torch.arange(batch), torch.arange(batch) * 10)
    every_rank = engine.rank_micro_batches(window, n, size)
    assert len(every_rank) == size and all(len(part) == n for part in every_rank)
    seen = torch.cat([mb[0] for part in every_rank for mb in part])
    torch.testing.assert_close(seen, window[0], rtol=0, atol=0)  # in order, each once
    sizes = [len(mb[0]) for part in every_rank for mb in part]
    assert max(sizes) - min(sizes) <= 1
    if batch % (size * n) == 0:
        assert set(sizes) == {batch // (size * n)}
    # one rank: exactly the single-process micro-batches
    assert [len(mb[0]) for mb in engine.rank_micro_batches(window, n, 1)[0]] == \
        [len(x) for x in torch.tensor_split(window[0], n)]


@pytest.fixture
def one_rank():
    """A process group of this process alone: DDP all-reduces over one rank."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("sync", "allreduces"), [(Sync.NO_SYNC, 1),
                                                  (Sync.EVERY_MICRO_BATCH, 4), (Sync.NEVER, 0)])
def test_the_hook_counts_the_all_reduces_each_sync_policy_makes(one_rank, sync, allreduces):
    """With one rank every policy computes the big batch's gradient; what differs is how
    often DDP all-reduces, as its communication hook counts (one bucket: a small model)."""
    s = Settings(batch_size=16, accum_steps=4, world_size=1, sync=sync, dtype="float64")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    window = (x, x.sum(1, keepdim=True))
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    reference = torch.nn.Linear(3, 1).double()
    reference.load_state_dict(model.state_dict())
    ddp = replica.Replica(model)
    setup = Setup(model, window, mse_loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    stats = engine.train_step(ddp, optimizer, window, s, setup)
    engine.window_gradient(reference, window, Settings(batch_size=16, dtype="float64"),
                           Setup(reference, window, mse_loss))

    assert stats.allreduces == allreduces
    assert ddp.allreduces.calls == allreduces
    expected = reference.weight.detach() - 0.1 * reference.weight.grad
    torch.testing.assert_close(model.weight.detach(), expected, rtol=1e-12, atol=0)


def test_a_model_of_one_process_is_never_synced_nor_counted():
    model = torch.nn.Linear(3, 1)
    assert replica.data_parallel_rank(model) == (0, 1)
    assert replica.reduction_counts(model) == (0, 0, 0, 0)  # no calls, no bytes
    assert replica.module_of(model) is model


def mse_window(examples: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(examples, 3, generator=g, dtype=torch.float64)
    return x, x.sin().sum(1, keepdim=True)


@pytest.mark.parametrize("sync", [Sync.NO_SYNC, Sync.EVERY_MICRO_BATCH, Sync.OVERWRITING])
def test_fsdp_steps_on_the_big_batch_gradient_and_overwriting_keeps_the_last(one_rank, sync):
    """FSDP2 on one rank: no-sync and every-micro-batch step on the big batch's gradient (the
    weights after one SGD step, to 1e-12); overwriting leaves the last micro-batch's share of
    it. (One rank has nothing to reduce: FSDP2 calls no reduce-scatter, and none is counted;
    the two-rank run below counts them.)"""
    s = Settings(batch_size=16, accum_steps=4, sync=sync, parallel="fsdp", dtype="float64")
    window = mse_window()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 1)).double()
    reference = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                    torch.nn.Linear(4, 1)).double()
    reference.load_state_dict(model.state_dict())
    sharded = replica.replicate(model, s)
    assert replica.is_sharded(sharded) and replica.data_parallel_rank(sharded) == (0, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    stats = engine.train_step(sharded, optimizer, window, s, Setup(sharded, window, mse_loss))
    last = window if sync != Sync.OVERWRITING else tuple(t[12:] for t in window)
    loss, _ = mse_loss(reference, last)
    (loss / 16).backward()  # the big batch's normalisation: the last quarter's share of it

    assert stats.reduce_scatters == sharded.reduce_scatters.calls == 0
    assert stats.allreduces == 0
    weights = replica.full_state_dict(sharded)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(weights[name], p.detach() - 0.1 * p.grad, rtol=1e-12,
                                   atol=1e-15)


def test_fsdp_shards_load_and_give_back_whole_tensors(one_rank):
    torch.manual_seed(0)
    source = torch.nn.Linear(3, 2).double()
    model = replica.replicate(torch.nn.Linear(3, 2).double(),
                              Settings(parallel="fsdp", world_size=2))
    replica.load_full_state_dict(model, source.state_dict())
    for name, value in replica.full_state_dict(model).items():
        assert type(value) is torch.Tensor  # whole, not a DTensor
        torch.testing.assert_close(value, source.state_dict()[name], rtol=0, atol=0)
    assert type(model.weight).__name__ == "DTensor"


def test_fsdp_that_torch_lacks_or_cannot_apply_is_one_line(monkeypatch):
    monkeypatch.setattr(replica, "fully_shard", None)
    with pytest.raises(GradlabError, match=r"parallel=fsdp needs FSDP2 .* use parallel=ddp"):
        replica.shard(torch.nn.Linear(3, 1))

    def refuses(model, mesh):
        raise ValueError("cannot shard this")
    monkeypatch.setattr(replica, "fully_shard", refuses)
    monkeypatch.setattr(replica.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr("torch.distributed.device_mesh.init_device_mesh",
                        lambda device, shape: None)
    with pytest.raises(GradlabError, match=r"FSDP2 could not shard this model "
                                           r"\(ValueError: cannot shard this\); use parallel=ddp"):
        replica.shard(torch.nn.Linear(3, 1))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "world_size=0"], "world_size=0; use 1 (one process) or more ranks"),
    (["--set", "backend=nccl", "--set", "device=auto"], "backend=nccl needs CUDA GPUs"),
    (["--set", "device=cuda"], "device=cuda but this machine has no CUDA device"),
    (["--set", "backend=nccl"], "all-reduces CUDA tensors only, and device=cpu"),
    (["--set", "accum_steps=32", "--set", "world_size=4"], "rank's micro-batch would be empty"),
    (["--set", "no-sync.world_size=3"], "different numbers of ranks"),
    (["--set", "sync=never", "--set", "parallel=fsdp"],
     "FSDP's optimizer steps on the gradient shards a reduce-scatter makes"),
    (["--set", "parallel=fsdp", "--set", "zero_grad=every-step"],
     "inside a window FSDP holds the gradient in its unsharded parameters"),
    (["--set", "no-sync.sync=every-micro-batch-overwriting"], "keeps no shards; use parallel=fsdp"),
], ids=["zero", "nccl-no-cuda", "cuda-no-cuda", "nccl-on-cpu", "empty-micro-batch",
        "two-sizes", "fsdp-never", "fsdp-zero-grad", "overwrite-ddp"])
def test_bad_data_parallel_input_is_one_line_and_exit_2(tmp_path, args, expected):
    if ("needs CUDA" in expected or "no CUDA" in expected) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "results"
    assert_clean_failure(gradlab("run", "ddp", *args, "--out", out), expected, out)


def test_what_only_the_ranks_can_check_is_one_line_and_exit_2_from_them(tmp_path):
    """Checked once a rank has built the setup (preflight runs there): context shards of a
    setup without token labels, and DDP that would wait for a head left out."""
    cases = [(["ddp", "--set", "rank_split=tokens", "--set", "steps=1"],
              "rank_split=tokens shards the positions of token sequences"),
             (["sit-out", "--set", "find_unused_parameters=false"],
              "gets no gradient from rank 0's micro-batch 4 of 4 of the first window")]
    for args, expected in cases:
        out = tmp_path / "results"
        code, stdout, stderr = finish(start(*args, "--out", str(out)))
        assert code == 2, stderr
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], stderr
        assert "Traceback" not in stderr
        assert not out.exists() or not any(out.iterdir())  # no run directory left


def test_more_ranks_than_the_cores_can_share_names_the_limit(tmp_path):
    cores = parallel.usable_cores()
    most = distributed.RANKS_PER_CPU_CORE * cores
    out = tmp_path / "results"
    result = gradlab("run", "ddp", "--set", f"world_size={most + 1}", "--set", "accum_steps=1",
                     "--set", f"batch_size={max(64, most + 1)}", "--out", out)
    assert_clean_failure(result, f"CPU cores ({cores}; ranks may share them, "
                                 f"{distributed.RANKS_PER_CPU_CORE} to a core at most)", out)
    assert f"world_size={most + 1} asks for {most + 1} ranks on this machine but it has " \
           in result.stderr
    assert f"use --set world_size={most} or fewer" in result.stderr
    assert "--nnodes" in result.stderr


def test_under_torchrun_its_world_size_is_the_arms_and_a_different_one_is_refused():
    rank = distributed.Rank(rank=0, world_size=4, local_rank=0, local_world_size=1,
                            master_addr=distributed.LOOPBACK, master_port=1, restart=0)
    loaded = spec.load_spec("ddp")
    distributed.take_world_size(loaded, rank)
    trials = spec.expand(loaded)
    sizes = {a.name: a.settings.world_size for a in trials[0].arms}
    assert sizes == {"big-batch": 1, "no-sync": 4, "sync-every-micro-batch": 4,
                     "never-synced": 4}
    assert distributed.ranks_needed(trials, rank) == distributed.Ranks(4, "gloo", "cpu")
    overridden = spec.expand(spec.apply_overrides(loaded, ["world_size=2"]))
    with pytest.raises(GradlabError, match="torchrun started 4 ranks but arm 'no-sync' has "
                                           "world_size=2; use --set world_size=4"):
        distributed.ranks_needed(overridden, rank)
    single = spec.expand(spec.apply_overrides(spec.load_spec("toy"), []))
    assert distributed.ranks_needed(single, None) is None  # one process: nothing to start
    with pytest.raises(GradlabError, match="every arm sets world_size=1"):
        distributed.ranks_needed(single, rank)


def test_the_launcher_speaks_only_when_rank_0_could_not():
    records = dist.HashStore()
    assert distributed.outcome([0, 0], records) == distributed.Ended(0)
    assert distributed.outcome([1, 1], records) == distributed.Ended(1)  # rank 0 said why
    assert distributed.outcome([2, -15], records) == distributed.Ended(2)
    no_record = distributed.outcome([-9, 3], records)
    assert no_record.code == 1
    assert no_record.message == "run failed: rank 1 exited with code 3 (rank 0 was killed by " \
                                "SIGKILL before it could write that into run.json)"
    distributed.record_failure(records, 1, "RuntimeError: boom", "Traceback ...", 1)
    distributed.record_failure(records, 0, "DistBackendError: peer gone", "...", 1)
    killed = distributed.outcome([-9, 1], records)
    assert killed == distributed.Ended(1, "run failed on rank 1: RuntimeError: boom (rank 0 "
                                          "was killed by SIGKILL before it could write that "
                                          "into run.json)")
    assert distributed.outcome([0, 1], records).message == \
        "the run completed, but rank 1 failed: RuntimeError: boom"
    records.set(distributed.REPORTED, "1")  # rank 0 printed its line, then a stop ended it
    assert distributed.outcome([-15, 1], records) == distributed.Ended(1)


# ----------------------------------------------------------------------------- two ranks

# the ddp experiment, 2 steps: every arm's gradient probed before each step
SHORT = ["ddp", "--set", "steps=2"]
LAUNCHED = [*SHORT, "--set", "world_size=2"]
TORCHRUN = (str(Path(sys.executable).with_name("torchrun")), "--nnodes", "1",
            "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{distributed.LOOPBACK}:0", "--local-addr", distributed.LOOPBACK,
            "-m", "gradlab")
RUNS = {
    "good": (LAUNCHED, ["--json"]),
    # rank 1 raises in its first data-parallel step; rank 0 sleeps meanwhile
    "raises": (LAUNCHED, ["--set", "setup=user_setups:fails_on_rank_1", "--set",
                          "dtype=float64"]),
    # every rank sleeps in its first data-parallel step, until the launcher gets SIGTERM
    "stopped": (LAUNCHED, ["--set", "setup=user_setups:sleeps_once_parallel", "--set",
                           "dtype=float64"]),
    "torchrun": (SHORT, ["--set", "dtype=float64", "--json"]),
    # the token normalisers on two ranks (its defaults: W = 2, N = 2 and 4, three spreads)
    "ddp-tokens": (["ddp-tokens"], []),
    # FSDP2 on two ranks (its defaults: mlp and transformer-lm, N = 2 and 4)
    "fsdp": (["fsdp"], []),
    # sequences split across two ranks (its defaults: lengths 8..64 and 64)
    "context-parallel": (["context-parallel"], []),
    # a head that sits out micro-batches, DDP with find_unused_parameters (its defaults)
    "sit-out": (["sit-out"], []),
    # four ranks on this machine's cores (two in CI: they share them), two steps each
    "ddp-tokens-4": (["ddp-tokens"], ["--set", "world_size=4", "--set", "accum_steps=2",
                                      "--set", "steps=2"]),
    "context-parallel-4": (["context-parallel"], ["--set", "world_size=4", "--set", "steps=2"]),
    "fsdp-4": (["fsdp"], ["--set", "world_size=4", "--set", "steps=2"]),
    # from a folder that holds a folder named gradlab (a clone's root, seen from its parent)
    "clone-folder": (LAUNCHED, ["--set", "dtype=float64"]),
}


@pytest.fixture(scope="module", autouse=True)  # from the module's start: the others overlap
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.Popen, Path]]:
    """Every run of this module, started at once; name -> (process, its --out folder)."""
    started = {}
    try:
        for name, (args, extra) in RUNS.items():
            home = tmp_path_factory.mktemp(name)
            out = home / "results"
            launcher = TORCHRUN if name == "torchrun" else (sys.executable, "-m", "gradlab")
            if name == "clone-folder":  # the installed command (python -m would take the folder)
                (home / "gradlab").mkdir()
                launcher = (str(Path(sys.executable).with_name("gradlab")),)
            started[name] = (start(*args, *extra, "--out", str(out), launcher=launcher,
                                   cwd=home), out)
        yield started
    finally:
        for process, _ in started.values():
            stop(process)


@pytest.fixture(scope="module")
def two_ranks(runs) -> tuple[Path, dict, str]:
    code, stdout, stderr = finish(runs["good"][0])
    assert code == 0, stderr
    doc = json.loads(stdout)
    return Path(doc["run_dir"]), doc, stderr


def test_two_ranks_compute_the_single_process_big_batch_gradient(two_ranks):
    run, _, _ = two_ranks
    summary = pd.read_csv(run / "summary.csv").set_index(["dtype", "arm"])
    assert set(summary.index) == {(d, a) for d in ("float32", "float64") for a in
                                  ("big-batch", "no-sync", "sync-every-micro-batch",
                                   "never-synced")}
    for dtype, bound in (("float64", 1e-12), ("float32", 1e-5)):
        for arm in ("no-sync", "sync-every-micro-batch"):
            row = summary.loc[(dtype, arm)]
            assert row["max_rel_grad_err"] <= bound, (dtype, arm)
            assert row["max_exact_err"] <= bound, (dtype, arm)
            assert row["min_grad_cosine"] > 1 - bound
            assert row["verdict"] == "equivalent"
        never = summary.loc[(dtype, "never-synced")]
        assert never["max_rel_grad_err"] > 0.1  # rank 0 stepped on half the window
        assert never["verdict"] == "differs"
    # B = W·m·N: 64 = 2 ranks x 8 examples x 4 micro-batches
    arms = summary.loc["float64"]
    assert arms.loc["no-sync", ["world_size", "accum_steps", "micro_batch", "batch_size"]
                    ].tolist() == [2, 4, 8, 64]
    assert arms.loc["big-batch", ["world_size", "accum_steps", "micro_batch"]].tolist() == \
        [1, 1, 64]


def test_no_sync_all_reduces_once_a_window_and_every_micro_batch_n_times(two_ranks):
    run, _, _ = two_ranks
    summary = pd.read_csv(run / "summary.csv")
    # the bytes they reduced: the whole gradient once a window, N times, or never
    sent = summary.set_index(["dtype", "arm"])["allreduce_bytes_per_step"]
    assert sent[("float64", "sync-every-micro-batch")] == 4 * sent[("float64", "no-sync")]
    assert sent[("float64", "no-sync")] == 2 * sent[("float32", "no-sync")] > 0  # 8 vs 4 bytes
    assert sent[("float32", "never-synced")] == sent[("float32", "big-batch")] == 0
    per_step = summary.groupby("arm")["allreduces_per_step"].agg(["min", "max"])
    assert per_step.loc["no-sync"].tolist() == [1, 1]
    assert per_step.loc["sync-every-micro-batch"].tolist() == [4, 4]  # N = 4
    assert per_step.loc["never-synced"].tolist() == [0, 0]
    assert per_step.loc["big-batch"].tolist() == [0, 0]
    steps = pd.read_csv(run / "steps.csv")
    counted = steps.groupby("arm")["allreduces"].unique()
    assert counted["no-sync"].tolist() == [1]
    assert counted["sync-every-micro-batch"].tolist() == [4]
    assert (steps["step_seconds"] > 0).all()  # time_steps = true in ddp.toml


def test_only_rank_0_writes_and_speaks(two_ranks):
    run, doc, stderr = two_ranks
    steps = pd.read_csv(run / "steps.csv")
    assert not steps.duplicated(["trial", "arm", "step"]).any()
    assert len(steps) == 2 * 4 * 2  # trials x arms x steps, once
    probe = pd.read_csv(run / "probe.csv")
    assert not probe.duplicated(["trial", "arm", "step", "param"]).any()
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "complete"
    assert meta["pid"] == meta["ranks"][0]["pid"]  # rank 0 wrote run.json
    assert_ranks_gone(meta)
    assert doc["status"] == "complete"
    # --json: the document on stdout; on stderr, what --set left alone, said once (rank 0)
    assert stderr.splitlines() == [
        "note: --set world_size=2 applies to arms no-sync, sync-every-micro-batch, "
        "never-synced; arm big-batch keeps its own world_size = 1 (--set ARM.world_size=VALUE "
        "sets it for one arm)"]
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # ranks agree on one name


def test_a_rank_that_raises_fails_the_run_and_the_launcher_stops_the_others(runs):
    """Rank 1 raises in its first data-parallel step while rank 0 computes (sleeps) outside
    any collective: the launcher stops rank 0, which marks the run failed with rank 1's
    error."""
    process, out = runs["raises"]
    code, stdout, stderr = finish(process)
    assert code == 1, stderr
    assert stdout == ""
    assert_one_error(stderr, "error: run failed on rank 1: RuntimeError: boom on rank 1 "
                             "(details in ")
    meta = json.loads((the_run(out) / "run.json").read_text())
    assert meta["status"] == "failed"
    assert meta["failed_rank"] == 1
    assert meta["error"].startswith("rank 1: Traceback")
    assert "RuntimeError: boom on rank 1" in meta["error"]
    assert not (the_run(out) / "summary.csv").exists()
    assert_ranks_gone(meta)


def test_sigterm_to_the_launcher_stops_every_rank(runs):
    launcher, out = runs["stopped"]
    deadline = time.monotonic() + HANG
    while not (out.is_dir() and any(out.glob("*/run.json"))):  # the ranks have joined
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1)  # both ranks are asleep in their first data-parallel step by now, or soon
    launcher.send_signal(signal.SIGTERM)
    code, stdout, stderr = finish(launcher)
    assert code == 128 + signal.SIGTERM, stderr
    assert_one_error(stderr, "error: stopped by SIGTERM; 0 of 1 trials finished")
    meta = json.loads((the_run(out) / "run.json").read_text())
    assert meta["status"] == "interrupted"
    assert "failed_rank" not in meta
    assert_ranks_gone(meta)


def test_ranks_import_gradlab_itself_from_a_folder_that_holds_one_named_so(runs):
    # an empty folder named gradlab, no __init__.py: a namespace package unless the ranks
    # are told where the gradlab the launcher imported lives
    process, out = runs["clone-folder"]
    code, _, stderr = finish(process)
    assert code == 0, stderr
    assert "Traceback" not in stderr and "ImportError" not in stderr
    summary = pd.read_csv(the_run(out) / "summary.csv").set_index("arm")
    assert summary.loc["no-sync", "max_rel_grad_err"] <= 1e-12


def test_only_every_ranks_token_count_is_the_big_batch_on_two_ranks(runs):
    process, out = runs["ddp-tokens"]
    code, _, stderr = finish(process)
    assert code == 0, stderr
    summary = pd.read_csv(the_run(out) / "summary.csv")
    summary = summary[~summary.baseline].set_index(["min_len", "arm", "accum_steps"])
    for low in (8, 32, 64):
        for n in (2, 4):
            assert summary.loc[(low, "global-tokens", n), "max_exact_err"] <= 1e-12
            assert summary.loc[(low, "global-tokens-by-length", n), "max_exact_err"] <= 1e-12
    # each rank's own count: wrong as soon as lengths vary, more the more they vary, and the
    # same at every N (it is the ranks' shares that differ, not the micro-batches')
    rank = summary.xs("rank-tokens", level="arm")["max_exact_err"]
    assert rank.loc[(8, 2)] > rank.loc[(32, 2)] > 1e-3 > 1e-12 >= rank.loc[(64, 2)]
    torch.testing.assert_close(rank.loc[(8, 4)], rank.loc[(8, 2)], rtol=1e-6, atol=0)
    # sorted by length, the ranks' token counts are skewed, and the per-rank count errs more
    grouped = summary.xs("rank-tokens-by-length", level="arm")["max_exact_err"]
    for low in (8, 32):
        assert grouped.loc[(low, 2)] > 2 * rank.loc[(low, 2)]
    assert (summary.xs(64, level="min_len")["verdict"] == "equivalent").all()
    assert (summary.xs(8, level="min_len").drop(["global-tokens", "global-tokens-by-length"],
                                                level="arm")["verdict"] == "differs").all()


def test_fsdp_on_two_ranks_sync_last_is_the_big_batch_and_the_global_batch_is_half(runs):
    process, out = runs["fsdp"]
    code, _, stderr = finish(process)
    assert code == 0, stderr
    assert "returned a view" not in stderr
    run = the_run(out)
    summary = pd.read_csv(run / "summary.csv")
    summary = summary[~summary.baseline].set_index(["model", "arm", "accum_steps"])
    probe = pd.read_csv(run / "probe.csv").query("param == '*'")
    alpha = alphas(probe)
    for model in ("mlp", "transformer-lm"):
        for n in (2, 4):
            rows = summary.xs((model, n), level=("model", "accum_steps"))
            for arm in ("sync-last", "sync-every-micro-batch", "ddp-no-sync"):
                assert rows.loc[arm, "max_exact_err"] <= 1e-12, (model, n, arm)
                assert rows.loc[arm, "verdict"] == "equivalent"
            assert rows.loc["sync-last", "reduce_scatters_per_step"] == 1
            assert rows.loc["sync-every-micro-batch", "reduce_scatters_per_step"] == n
            assert rows.loc["ddp-no-sync", "allreduces_per_step"] == 1
            assert rows.loc["keep-last-micro-batch", "verdict"] == "differs"
            assert rows.loc["keep-last-micro-batch", "max_exact_err"] > 0.1
            # each rank holds half of every parameter, gradient and optimizer state
            ratio = rows.loc["sync-last", "rank_state_bytes"] / \
                rows.loc["ddp-no-sync", "rank_state_bytes"]
            assert 0.5 <= ratio <= 0.52, (model, n, ratio)
    halved = alpha[torch.tensor((probe.arm == "divided-by-global-batch").to_numpy())]
    assert len(halved) == 4 * 4  # 4 trials x 4 probes
    torch.testing.assert_close(halved, torch.full((16,), 0.5, dtype=torch.float64), rtol=1e-12,
                               atol=0)


def alphas(probe: pd.DataFrame) -> torch.Tensor:
    """α = <g, g_ref> / |g_ref|^2 of each probe row: the gradient as a multiple of the
    reference's."""
    return torch.tensor((probe.cosine * probe.arm_norm / probe.ref_norm).to_numpy())


def test_context_shards_need_every_ranks_count_on_two_ranks(runs):
    process, out = runs["context-parallel"]
    code, _, stderr = finish(process)
    assert code == 0, stderr
    run = the_run(out)
    summary = pd.read_csv(run / "summary.csv")
    summary = summary[~summary.baseline].set_index(["min_len", "arm"])
    probe = pd.read_csv(run / "probe.csv").query("param == '*' and arm == 'global-tokens-no-w'")
    for low in (8, 64):
        assert summary.loc[(low, "global-tokens"), "max_exact_err"] <= 1e-12
        assert summary.loc[(low, "shard-tokens"), "verdict"] == "differs"
    assert summary.loc[(8, "shard-tokens"), "max_exact_err"] > 0.05
    alpha = alphas(probe)
    torch.testing.assert_close(alpha, torch.full((len(alpha),), 0.5, dtype=torch.float64),
                               rtol=1e-12, atol=0)


def test_on_four_ranks_only_the_global_count_and_the_synced_shards_are_the_big_batch(runs):
    """W = 4, the ranks sharing the cores where there are fewer: every fix stays exact, and
    what was 1/2 at W = 2 is 1/4 (the loss divided by W twice, the shard count without x W)."""
    summaries, alpha = {}, {}
    for name in ("ddp-tokens-4", "context-parallel-4", "fsdp-4"):
        process, out = runs[name]
        code, _, stderr = finish(process)
        assert code == 0, stderr
        if parallel.usable_cores() < 4:
            assert f"4 ranks share this machine's {parallel.usable_cores()} CPU cores" in stderr
        run = the_run(out)
        summary = pd.read_csv(run / "summary.csv")
        assert (summary[~summary.baseline].world_size == 4).all()
        summaries[name] = summary[~summary.baseline]
        probe = pd.read_csv(run / "probe.csv").query("param == '*'")
        alpha[name] = {arm: alphas(rows) for arm, rows in probe.groupby("arm")}
    tokens = summaries["ddp-tokens-4"].set_index(["min_len", "arm"])
    for low in (8, 32, 64):
        assert tokens.loc[(low, "global-tokens"), "max_exact_err"] <= 1e-12
        assert tokens.loc[(low, "global-tokens-by-length"), "max_exact_err"] <= 1e-12
    rank = tokens.xs("rank-tokens", level="arm")["max_exact_err"]
    assert rank.loc[8] > rank.loc[32] > 1e-3 > 1e-12 >= rank.loc[64]
    shards = summaries["context-parallel-4"].set_index(["min_len", "arm"])
    for low in (8, 64):
        assert shards.loc[(low, "global-tokens"), "max_exact_err"] <= 1e-12
        assert shards.loc[(low, "shard-tokens"), "verdict"] == "differs"
    fsdp = summaries["fsdp-4"].set_index(["model", "arm", "accum_steps"])
    for arm in ("sync-last", "sync-every-micro-batch", "ddp-no-sync"):
        assert (fsdp.xs(arm, level="arm")["max_exact_err"] <= 1e-12).all(), arm
    assert (fsdp.xs("sync-every-micro-batch", level="arm").reset_index()
            .eval("reduce_scatters_per_step == accum_steps")).all()
    # a quarter of every parameter, gradient and optimizer state on each rank
    ratio = fsdp.xs("sync-last", level="arm")["rank_state_bytes"] / \
        fsdp.xs("ddp-no-sync", level="arm")["rank_state_bytes"]
    assert ((0.25 <= ratio) & (ratio <= 0.27)).all(), ratio
    for name, arm in (("context-parallel-4", "global-tokens-no-w"),
                      ("fsdp-4", "divided-by-global-batch")):
        quartered = alpha[name][arm]
        assert len(quartered) >= 2 * 2  # two trials or more, two probes each
        torch.testing.assert_close(quartered, torch.full_like(quartered, 0.25), rtol=1e-12,
                                   atol=0)


def test_a_head_that_sits_out_is_synced_and_the_ranks_stay_identical(runs):
    process, out = runs["sit-out"]
    code, _, stderr = finish(process)
    assert code == 0, stderr
    run = the_run(out)
    summary = pd.read_csv(run / "summary.csv").set_index("arm")
    probe = pd.read_csv(run / "probe.csv")
    for arm in ("find-unused", "find-unused-every-micro-batch"):
        assert summary.loc[arm, "max_exact_err"] <= 1e-12
        assert summary.loc[arm, "rank_drift"] == 0  # the replicas are the same bytes
        head = probe[(probe.arm == arm) & probe.param.str.startswith("heads.1.")]
        assert len(head) == 2 * 10 and (head.exact_err <= 1e-12).all()  # 2 tensors, 10 probes
    assert summary.loc["never-synced", "rank_drift"] > 0.01
    assert summary.loc["never-synced", "verdict"] == "differs"
    assert pd.isna(summary.loc["big-batch", "rank_drift"])  # one process: nothing to drift


def test_torchrun_starts_the_ranks_itself(runs):
    """The same experiment under torchrun: its WORLD_SIZE is the arms' world_size."""
    code, stdout, stderr = finish(runs["torchrun"][0])
    assert code == 0, stderr
    run = Path(json.loads(stdout)["run_dir"])
    summary = pd.read_csv(run / "summary.csv").set_index("arm")
    assert summary.loc["no-sync", "world_size"] == 2
    assert summary.loc["no-sync", "max_rel_grad_err"] <= 1e-12
    assert summary.loc["never-synced", "verdict"] == "differs"
    assert summary.loc["no-sync", "allreduces_per_step"] == 1
    assert summary.loc["sync-every-micro-batch", "allreduces_per_step"] == 4
    meta = json.loads((run / "run.json").read_text())
    assert_ranks_gone(meta)
    assert "note:" not in stderr  # torchrun's WORLD_SIZE is no --set
