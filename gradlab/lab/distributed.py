"""Several processes: data-parallel arms with torch.distributed and DistributedDataParallel.

An arm with ``world_size = W > 1`` trains on W ranks at once: every rank draws the
same seeded window of B examples, keeps its own slice of B/W and splits that into N
micro-batches (engine.window_gradient), and DDP all-reduces the gradient as the
arm's ``sync`` policy says. The run's other arms (world_size = 1, the big-batch
baseline) run whole on every rank, identically, so each rank holds the baseline's
weights and window when the probe asks a data-parallel arm for its gradient there.
Every rank runs the same lockstep (trial.run_trial), so their collectives meet;
only rank 0 writes the run directory and prints.

Ranks come from torchrun (``torchrun --nproc-per-node W -m gradlab run ddp``) or
from ``launch`` below, which ``gradlab run`` calls when an arm has world_size > 1
and no torchrun started this process: it starts W ranks with torchrun's
environment, on the loopback address only, hosting the store they meet through.

A rank that raises records why in that store before it exits; rank 0, whose next
collective then fails (or whom the launcher or torchrun stops), marks the run
failed with that rank's error. Collectives time out after RANK_TIMEOUT, and the
launcher stops the other ranks as soon as one ends with an error, so no rank waits
forever for one that is gone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from gradlab import entrypoints
from gradlab.config.settings import Backend, Device, Settings
from gradlab.config.spec import Spec, Trial
from gradlab.errors import GradlabError
from gradlab.lab.parallel import usable_cores

LOOPBACK = "127.0.0.1"
# how long a collective (and joining the group) waits for the other ranks: they do the same
# work in lockstep, so a long wait means a rank is stuck, not slow
RANK_TIMEOUT = dt.timedelta(minutes=5)
# the launcher: after the first rank ends with an error, how long the others get to notice
# and end by themselves (rank 0 records the failure), then after SIGTERM, before SIGKILL
GRACE_SECONDS = 2.0
KILL_AFTER_SECONDS = 10.0
POLL_SECONDS = 0.05
# on CPU, ranks may share cores up to this many per core: the gradients are the same bytes
# (each rank computes alone, in one thread), only slower, so a 2-core laptop can still check
# W = 4; past it a run would spend its time switching between processes
RANKS_PER_CPU_CORE = 4


# ----------------------------------------------------------------------------- this rank

@dataclass(frozen=True)
class Rank:
    """This process's place among the ranks, from torchrun's environment variables."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    restart: int  # torchrun's restart count: each attempt keeps its own records

    @classmethod
    def from_env(cls) -> Rank | None:
        """None unless torchrun (or ``launch``) started this process as a rank."""
        env = os.environ
        if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            return None
        try:
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]),
                       int(env.get("LOCAL_RANK", env["RANK"])),
                       int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
                       env["MASTER_ADDR"], int(env["MASTER_PORT"]),
                       int(env.get("TORCHELASTIC_RESTART_COUNT", "0")))
        except ValueError:
            raise GradlabError("RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_PORT "
                               "must be whole numbers; start the ranks with torchrun, or let "
                               "'gradlab run --set world_size=W' start them") from None


def take_world_size(loaded: Spec, rank: Rank) -> None:
    """Under torchrun, its WORLD_SIZE is the world_size of every arm that does not set its own
    (the big-batch baseline sets 1); a --set applied after this still overrides it."""
    loaded.settings["world_size"] = rank.world_size
    loaded.origins["settings", "world_size"] = f"torchrun's WORLD_SIZE={rank.world_size}"


# ----------------------------------------------------------------------------- the run's ranks

@dataclass(frozen=True)
class Ranks:
    """What a data-parallel run needs: how many ranks, which backend, on which device type."""
    size: int
    backend: str
    device_type: str
    note: str | None = None  # for people: these ranks share the CPU cores


def device_type(s: Settings) -> str:
    cuda = s.device == Device.CUDA or (s.device == Device.AUTO and torch.cuda.is_available())
    return "cuda" if cuda else "cpu"


def backend_of(s: Settings) -> str:
    if s.backend == Backend.AUTO:
        return "nccl" if device_type(s) == "cuda" else "gloo"
    return s.backend.value


def ranks_needed(trials: list[Trial], rank: Rank | None) -> Ranks | None:
    """The ranks a run needs, checked against the machine (and torchrun's); None for one process.

    Arms with world_size = 1 run whole on every rank; the others share one process group,
    so they must agree on its size and backend.
    """
    parallel = [a for t in trials for a in t.arms if a.settings.world_size > 1]
    sizes = sorted({a.settings.world_size for a in parallel})
    if len(sizes) > 1:
        first = {a.settings.world_size: a.name for a in reversed(parallel)}
        named = ", ".join(f"{w} (arm '{first[w]}')" for w in sizes)
        raise GradlabError(f"arms ask for different numbers of ranks: world_size {named}; a "
                           f"run starts its ranks once, so give every data-parallel arm the "
                           f"same world_size (arms with world_size=1 run on every rank)")
    size = sizes[0] if sizes else 1
    if rank is not None and size != rank.world_size:
        if not parallel:
            raise GradlabError(f"torchrun started {rank.world_size} ranks but every arm sets "
                               f"world_size=1; run it without torchrun, or give an arm "
                               f"world_size={rank.world_size}")
        raise GradlabError(f"torchrun started {rank.world_size} ranks but arm "
                           f"'{parallel[0].name}' has world_size={size}; use --set "
                           f"world_size={rank.world_size}, or torchrun --nproc-per-node {size}")
    if not parallel:
        return None
    backends = {backend_of(a.settings) for a in parallel}
    devices = {device_type(a.settings) for a in parallel}
    if len(backends) > 1 or len(devices) > 1:
        raise GradlabError(f"the data-parallel arms use backends {', '.join(sorted(backends))} "
                           f"on {', '.join(sorted(devices))}; they share one process group, so "
                           f"give them the same backend and device")
    backend, device = backends.pop(), devices.pop()
    if device == "cuda" and not torch.cuda.is_available():
        raise GradlabError("device=cuda but this machine has no CUDA device (or this torch "
                           "build has no CUDA); use --set device=cpu or device=auto")
    if backend == "nccl" and not torch.cuda.is_available():
        raise GradlabError("backend=nccl needs CUDA GPUs, and this machine has none (or torch "
                           "was built without CUDA); use --set backend=gloo (or auto: gloo "
                           "on CPU)")
    local = rank.local_world_size if rank is not None else size
    cores = usable_cores()
    if device == "cuda":
        allowed, what = torch.cuda.device_count(), "CUDA devices (one per rank)"
    else:
        allowed, what = RANKS_PER_CPU_CORE * cores, \
            f"CPU cores ({cores}; ranks may share them, {RANKS_PER_CPU_CORE} to a core at most)"
    if local > allowed:
        more = " per machine; for more, start torchrun on several machines (--nnodes)"
        raise GradlabError(f"world_size={size} asks for {local} ranks on this machine but it "
                           f"has {what}; use --set world_size={max(allowed, 1)} or "
                           f"fewer{more}")
    note = None
    if device == "cpu" and local > cores:
        note = (f"{local} ranks share this machine's {cores} CPU cores: the gradients are the "
                f"same, the run about {local / cores:.3g}x slower and its step times not "
                f"those of one rank per core")
    return Ranks(size, backend, device, note)



# ----------------------------------------------------------------------------- the group

# the store key of the first failure a rank recorded (within the torchrun attempt's prefix)
FIRST_FAILURE = "first-failure"
# rank 0 has said how the run ended (its one line), and with which exit code
REPORTED = "reported"


class World:
    """The process group this rank belongs to, and the store where ranks record failures."""

    def __init__(self, rank: Rank, records: dist.Store):
        self.rank, self.size = rank.rank, rank.world_size
        self.records = records
        self.run_dir: Path | None = None  # rank 0's, once it made it: the same on every rank
        self.notes: list[str] = []  # for people, from rank 0 (ranks.note)

    def share(self, value: Any) -> Any:
        """Rank 0's value, on every rank (the run directory's path: ranks agree on it)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        every = [None] * self.size
        dist.all_gather_object(every, value)
        return every

    def record_failure(self, error: str, details: str, code: int) -> None:
        """Tell the other ranks (and the launcher) why this rank is about to end: ``error``
        in one line, ``details`` (a traceback), and its exit code."""
        with contextlib.suppress(Exception):  # the store may be gone: the failure comes first
            record_failure(self.records, self.rank, error, details, code)

    def record_reported(self, code: int) -> None:
        """Rank 0 has said how the run ended: the launcher need not, even if a stop then
        ends rank 0 before it exits."""
        with contextlib.suppress(Exception):
            self.records.set(REPORTED, str(code))

    def first_failure(self) -> dict | None:
        """The first failure any rank recorded, or None."""
        try:
            return first_failure(self.records)
        except Exception:  # the store is gone (its host ended)
            return None

    def leave(self) -> None:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def record_failure(records: dist.Store, rank: int, error: str, details: str,
                   code: int) -> None:
    """Keep the first failure only (one atomic compare-and-set): a rank's failure makes the
    others' collectives fail after it, and theirs are consequences."""
    records.compare_set(FIRST_FAILURE, "", json.dumps({"rank": rank, "error": error,
                                                       "details": details, "code": code}))


def first_failure(records: dist.Store) -> dict | None:
    if not records.check([FIRST_FAILURE]):
        return None
    return json.loads(records.get(FIRST_FAILURE))


def join(rank: Rank, ranks: Ranks) -> World:
    """Join the process group (torchrun's env:// contract) with a timeout on every collective."""
    if ranks.device_type == "cuda":
        torch.cuda.set_device(rank.local_rank)  # 'cuda' now means this rank's own GPU
    dist.init_process_group(ranks.backend, init_method="env://", timeout=RANK_TIMEOUT)
    # a second client of the store the ranks met through (torchrun's agent or the launcher
    # hosts it; without one, rank 0 does), for the failure records
    client = dist.TCPStore(rank.master_addr, rank.master_port, is_master=False,
                           timeout=RANK_TIMEOUT)
    world = World(rank, dist.PrefixStore(records_prefix(rank.restart), client))
    world.notes = [ranks.note] if ranks.note else []
    return world


def records_prefix(restart: int) -> str:
    return f"gradlab/{restart}"


# ----------------------------------------------------------------------------- the launcher

@dataclass(frozen=True)
class Ended:
    """How a launched run ended: the exit code, a line to print if rank 0 could not, and what
    rank 0 wrote on its standard output (the run directory, or --json's document)."""
    code: int
    message: str | None = None
    stdout: str = ""


def launch(size: int, args: list[str], stdout: IO[str] | None = None) -> Ended:
    """Start ``size`` ranks of ``python -m gradlab ARGS`` as torchrun would, on this machine
    and the loopback address only, and wait for them. ``stdout``: where rank 0's standard
    output goes (default: this process's; the others say nothing there).

    The launcher hosts the store the ranks meet through (the OS picks its port, and
    it stays bound: no other process can take it between choosing and using). When
    a rank ends with an error, the others get GRACE_SECONDS to end by themselves,
    then SIGTERM, then SIGKILL. A stop signal to the launcher goes to every rank.
    """
    server = dist.TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False,
                           timeout=RANK_TIMEOUT)
    records = dist.PrefixStore(records_prefix(0), server)
    env = rank_environment(size, server.port)
    processes: list[subprocess.Popen] = []
    try:
        for rank in range(size):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "gradlab", *args],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=stdout if rank == 0 else None,
                start_new_session=True))  # a terminal's Ctrl-C reaches them through us, once
        stopped_by = supervise(processes)
    finally:
        for process in processes:  # nothing outlives the launcher
            if process.poll() is None:
                process.kill()
                process.wait()
    if stopped_by is not None:
        return Ended(128 + stopped_by)  # rank 0 said so
    return outcome([p.returncode for p in processes], records)


def rank_environment(size: int, port: int) -> dict[str, str]:
    """torchrun's environment for the ranks of one machine, bound to the loopback address."""
    env = {**os.environ, "WORLD_SIZE": str(size), "LOCAL_WORLD_SIZE": str(size),
           # the ranks import the user's code and gradlab from where the launcher did
           "PYTHONPATH": entrypoints.subprocess_path(),
           "GROUP_RANK": "0", "ROLE_RANK": "0", "ROLE_WORLD_SIZE": str(size),
           "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port),
           # rank 0 joins the launcher's store rather than opening its own (as under torchrun)
           "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"}
    env.setdefault("OMP_NUM_THREADS", "1")  # W ranks on W cores: one thread each, as torchrun
    loopback = loopback_interface()
    if loopback:  # gloo and nccl would otherwise pick the interface of the host's name
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
        env.setdefault("NCCL_SOCKET_IFNAME", loopback)
    return env


def loopback_interface() -> str | None:
    with contextlib.suppress(OSError, AttributeError):
        for _, name in socket.if_nameindex():
            if name.startswith("lo"):
                return name
    return None


def supervise(processes: list[subprocess.Popen]) -> int | None:
    """Wait for every rank to end; returns the stop signal the launcher got, if any."""
    stopped_by: int | None = None
    failed_at = terminated_at = None
    while True:
        try:
            codes = [p.poll() for p in processes]
            if all(code is not None for code in codes):
                return stopped_by
            now = time.monotonic()
            if failed_at is None and any(code not in (None, 0) for code in codes):
                failed_at = now
            if terminated_at is None and failed_at is not None \
                    and now - failed_at > GRACE_SECONDS:
                send(processes, signal.SIGTERM)
                terminated_at = now
            if terminated_at is not None and now - terminated_at > KILL_AFTER_SECONDS:
                send(processes, signal.SIGKILL)
            time.sleep(POLL_SECONDS)
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM (cli.Interrupted): pass it on
            if stopped_by is None:
                stopped_by = getattr(stop, "signum", signal.SIGINT)
                send(processes, stopped_by)
                terminated_at = time.monotonic()


def send(processes: list[subprocess.Popen], signum: int) -> None:
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)


def outcome(codes: list[int], records: dist.Store) -> Ended:
    """The launcher's exit code; rank 0 reports its own end, the launcher only what it could not."""
    first = codes[0]
    if first > 0 or all(code == 0 for code in codes):
        return Ended(first)  # rank 0 ended by itself and said why (or all went well)
    if records.check([REPORTED]):  # it said why, then a stop ended it before it exited
        return Ended(int(records.get(REPORTED)))
    failure = first_failure(records)
    others = ", ".join(f"rank {r} {ended(code)}" for r, code in enumerate(codes) if r and code)
    if first == 0:
        cause = f"rank {failure['rank']} failed: {failure['error']}" if failure else others
        return Ended(1, f"the run completed, but {cause}")
    run_failed = f"run failed on rank {failure['rank']}: {failure['error']}" if failure \
        else f"run failed: {others or 'no rank said why'}"
    return Ended(1, f"{run_failed} (rank 0 {ended(first)} before it could write that into "
                    f"run.json)")


def ended(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
