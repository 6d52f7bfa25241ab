"""Trials in worker processes: each trial runs whole in one worker, K workers at a time.

The parent hands out trials one at a time and gets back, per worker: progress (steps
taken), a finished trial's rows, or the error that ended it. The parent alone writes
the run directory (trial.run_trials does, in trial order), so the CSVs are the same
bytes whatever the number of workers.

Workers never outlive the parent. A stop signal (SIGINT, SIGTERM) is the parent's to
handle: workers ignore Ctrl-C, which a terminal sends to the whole process group, and
the parent terminates them when it stops, fails or finishes. Should the parent die
without a word (SIGKILL, a crash), each worker sees the pipe only the parent writes
to close, and exits at once.

Workers are started by a fork server (spawn where there is none: Windows), never by
forking the parent: a fork would copy the parent's threads' locks and OpenMP's pool
mid-flight, and CUDA cannot be forked at all. The fork server imports torch and
gradlab once; each worker is then forked from it in milliseconds.

On CUDA, worker i computes on GPU i mod the number of GPUs visible: one GPU each
when there are enough, sharing them (each worker with its own CUDA context, a few
hundred MB) when there are more workers than GPUs.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import connection

from gradlab.config.spec import Trial

# what a worker runs for each trial: lab.trial.run_trial(trial, cache, advance) -> its rows
RunTrial = Callable[[Trial, dict, Callable[[int], None]], dict[str, list[dict]]]

# seconds a terminated worker gets to exit before it is killed
GRACE_SECONDS = 5
# set in the fork server's environment as it starts: gradlab's import there ignores Ctrl-C
FORK_SERVER = "GRADLAB_FORK_SERVER"


def context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # imported once in the server, not once per worker: gradlab.lab.trial (torch, pandas)
        # and torch._dynamo, which torch.optim imports on the first optimizer it builds
        # (gradlab.cli itself imports neither: its help must start fast; figures in
        # benchmarks/RESULTS.md, "Start-up costs")
        ctx.set_forkserver_preload(["__main__", "gradlab.lab.trial", "torch._dynamo"])
        return ctx
    return multiprocessing.get_context("spawn")


def warm_up() -> None:
    """Start the fork server now, so that its imports (torch: seconds) overlap with other work.

    Its stdout (and so its workers') is gradlab's stderr: the server outlives gradlab by
    its own exit (a second: Python tearing torch down), and a pipe reading gradlab's
    stdout (`gradlab run | xargs gradlab report`) would wait for that too."""
    ctx = context()
    if ctx.get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    sys.stdout.flush()
    own_stdout = os.dup(1)
    os.dup2(2, 1)  # what the server inherits
    # The server imports torch for seconds before it ignores Ctrl-C (multiprocessing's
    # forkserver.main does, after its imports), and a terminal sends Ctrl-C to the whole
    # process group: it would die with a KeyboardInterrupt traceback beside gradlab's one
    # line. So gradlab, the first thing the server imports (its __main__ is gradlab's), makes
    # it ignore Ctrl-C from the start (gradlab/__init__.py reads FORK_SERVER); Ctrl-C is this
    # process's to handle. (A blocked signal mask would not do: the server is started with
    # fork and exec, which resets the mask.)
    os.environ[FORK_SERVER] = "1"
    try:
        forkserver.ensure_running()
    finally:
        del os.environ[FORK_SERVER]
        os.dup2(own_stdout, 1)
        os.close(own_stdout)


# ----------------------------------------------------------------------------- the cores

def usable_cores() -> int:
    """The CPU cores this process may run on (a container or taskset may allow fewer)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def idle_cores() -> int:
    """Usable cores minus the processes running now besides this one."""
    return max(1, usable_cores() - busy_elsewhere())


def busy_elsewhere(samples: int = 3, apart: float = 0.02) -> int:
    """Other processes running (Linux: state R in /proc/PID/stat), the most seen in a few
    readings 20 ms apart. A reading of this moment: a load average would still count a run
    that ended a minute ago, and /proc/loadavg's runnable count counts this process's own
    intra-op threads, which spin a while after each parallel region. Elsewhere: the
    1-minute load average."""
    if not os.path.isdir("/proc"):
        try:
            return round(os.getloadavg()[0])
        except OSError:  # not known here: assume the cores are ours
            return 0
    most = 0
    for reading in range(samples):
        if reading:
            time.sleep(apart)
        most = max(most, running_processes(exclude=os.getpid()))
    return most


def running_processes(exclude: int) -> int:
    running = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                running += stat.read().rsplit(b")", 1)[1].split()[0] == b"R"
        except (OSError, IndexError):  # gone meanwhile
            continue
    return running


# ----------------------------------------------------------------------------- the workers

class RemoteTraceback(Exception):
    """A worker's traceback, as the cause of the error it raised (as concurrent.futures does)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class WorkerDied(RuntimeError):
    """A worker process ended without saying why (killed, out of memory, a crash in C)."""


def run(trials: list[Trial], run_trial: RunTrial, processes: int,
        threads_of: Callable[[Trial], int], finished: Callable[[int, dict], None],
        advance: Callable[[int], None], order: list[int] | None = None) -> None:
    """Run every trial as ``run_trial(trial, cache, advance)`` in ``processes`` workers,
    handed out in ``order`` (positions in ``trials``; None: as listed); ``finished(position,
    rows)`` as each ends (in any order), ``advance(n)`` as the workers take steps. An error
    in a worker stops every worker and is raised here, with the worker's traceback as its
    cause. ``run_trial`` must be a module-level function: it reaches the workers pickled,
    by name."""
    ctx = context()
    warm_up()  # (started already, unless a caller did not foresee workers)
    parent_alive, alive_writer = ctx.Pipe(duplex=False)  # only the parent writes: EOF = gone
    workers: list[multiprocessing.process.BaseProcess] = []
    links: dict[connection.Connection, int] = {}  # the parent's end -> worker index
    try:
        for index in range(processes):
            link, child_end = ctx.Pipe()
            worker = ctx.Process(target=serve, args=(child_end, parent_alive, index, run_trial),
                                 name=f"gradlab-worker-{index}", daemon=True)
            worker.start()
            child_end.close()
            workers.append(worker)
            links[link] = index
        parent_alive.close()
        # popped from the end: the first in ``order`` first
        queue = [(i, trials[i]) for i in order or range(len(trials))][::-1]
        running: dict[connection.Connection, int] = {}  # link -> position of its trial
        for link in links:
            hand_out(link, queue, running, threads_of)
        while running:
            sentinels = {workers[links[link]].sentinel: link for link in running}
            for ready in connection.wait([*running, *sentinels]):
                link = sentinels.get(ready, ready)
                if link not in running:
                    continue  # handled already in this round
                worker = workers[links[link]]
                if not link.poll():  # a sentinel, and nothing left to read: it died
                    raise died(worker, running[link])
                while link in running and link.poll():
                    try:
                        message = link.recv()
                    except EOFError:  # it died after its last message
                        raise died(worker, running[link]) from None
                    receive(message, link, running, queue, threads_of, finished, advance)
    finally:
        alive_writer.close()
        stop(workers)


def hand_out(link: connection.Connection, queue: list, running: dict,
             threads_of: Callable[[Trial], int]) -> None:
    """The next trial to an idle worker, or None: no more work, exit."""
    if queue:
        position, trial = queue.pop()
        running[link] = position
        link.send((position, trial, threads_of(trial)))
    else:
        running.pop(link, None)
        link.send(None)


def receive(message: tuple, link: connection.Connection, running: dict, queue: list,
            threads_of: Callable[[Trial], int], finished: Callable[[int, dict], None],
            advance: Callable[[int], None]) -> None:
    match message:
        case ("advance", steps):
            advance(steps)
        case ("done", position, rows):
            finished(position, rows)
            hand_out(link, queue, running, threads_of)
        case ("failed", position, error, remote):
            raise rebuilt(error, remote) from RemoteTraceback(remote)
        case _:
            raise RuntimeError(f"a worker sent an unknown message: {message!r:.200}")


def rebuilt(error: bytes | None, remote: str) -> BaseException:
    """The worker's exception, as the parent can raise it."""
    try:
        exc = pickle.loads(error) if error else None
    except Exception:  # an exception class that cannot be rebuilt from its arguments
        exc = None
    if isinstance(exc, Exception):  # GradlabError too: bad input found mid-run stays that
        return exc
    last = remote.strip().splitlines()[-1] if remote.strip() else "unknown error"
    return RuntimeError(f"a worker failed: {last}")


def died(worker: multiprocessing.process.BaseProcess, position: int) -> WorkerDied:
    worker.join(GRACE_SECONDS)
    return WorkerDied(f"worker process {worker.pid} running trial {position} ended with "
                      f"{exit_reason(worker)}")


def exit_reason(worker: multiprocessing.process.BaseProcess) -> str:
    code = worker.exitcode
    if code is None:
        return "no exit status"
    if code < 0:
        name = signal.Signals(-code).name
        killed = " (killed: out of memory?)" if -code == signal.SIGKILL else ""
        return f"signal {name}{killed}"
    return f"exit status {code}"


def stop(workers: list) -> None:
    """Every worker gone: asked first (SIGTERM), then killed."""
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(GRACE_SECONDS)
        if worker.is_alive():
            worker.kill()
            worker.join()


# ----------------------------------------------------------------------------- the worker

def serve(link: connection.Connection, parent_alive: connection.Connection, index: int,
          run_trial: RunTrial) -> None:
    """A worker: run the trials the parent sends until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's terminate() ends us at once
    threading.Thread(target=exit_with_parent, args=(parent_alive,), daemon=True).start()

    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(index % torch.cuda.device_count())
    cache: dict = {}
    while (task := link.recv()) is not None:
        position, trial, threads = task
        torch.set_num_threads(threads)
        try:
            rows = run_trial(trial, cache, lambda n: link.send(("advance", n)))
        except BaseException as err:  # noqa: BLE001 (every error goes to the parent)
            link.send(("failed", position, pickled(err), traceback.format_exc()))
            return
        link.send(("done", position, rows))


def exit_with_parent(parent_alive: connection.Connection) -> None:
    """Block until the parent is gone (its end of the pipe closes), then exit at once."""
    try:
        parent_alive.recv()
    except (EOFError, OSError):
        pass
    os._exit(1)


def pickled(err: BaseException) -> bytes | None:
    try:
        return pickle.dumps(err)
    except Exception:  # an exception holding something unpicklable
        return None
