"""Stop signals: SIGINT (Ctrl-C) and SIGTERM (kill, timeout, a batch scheduler) stop gradlab at
any moment with one line and exit code 130 or 143; a run directory that exists by then is
marked interrupted, with the trials finished so far kept.

This module imports nothing slow: gradlab.cli routes the signals here before it imports
typer, rich, torch or pandas, so a stop while they load gets the one line too.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING

# loaded already (gradlab/__init__.py imports it): nothing is imported here during a stop
from gradlab.record.meta import STOPPED, Status

if TYPE_CHECKING:
    from gradlab.lab.distributed import World


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: stop, say so in one line, exit 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def catch_stop_signals(handler) -> dict:
    """Route SIGINT and SIGTERM to ``handler``; returns the handlers they had.

    A signal the parent ignores (nohup, a background job) stays ignored, and outside
    the main thread, where Python allows no handlers, nothing changes.
    """
    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            try:
                previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread
                break
    return previous


class Early:
    """A stop signal that arrived while gradlab.cli imports its commands (typer, rich)."""
    signum: int | None = None


def _note_early_stop(signum, frame):
    # noted, not raised: raised inside those imports, a library's guarded import could catch
    # it and go on half-loaded; gradlab.cli acts on it as soon as they are done (under a second)
    if Early.signum is None:
        Early.signum = signum


def restore_signal_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def early_stop(signum: int, what: str = "") -> SystemExit:
    """A stop that no command reported: its one line (and the --json document)."""
    import json

    message = STOPPED[signum] + what
    if os.environ.get("RANK", "0") != "0":  # a rank of torchrun's other than 0: rank 0 says it
        return SystemExit(128 + signum)
    if "--json" in sys.argv[1:]:
        print(json.dumps({"status": Status.INTERRUPTED, "error": message, "run_dir": None}),
              flush=True)
    sys.stderr.write(f"error: {message}\n")
    return SystemExit(128 + signum)


def starting() -> str:
    """What a stop before any command began adds to its line: nothing was written."""
    return (" before the run started; nothing was written" if sys.argv[1:2] == ["run"]
            else " while starting; nothing was written")


# before anything slow: torch and pandas take seconds to import, and a Ctrl-C meanwhile gets


class Stop:
    """The stop signal this process received, shared by the handler and the commands."""
    signum: int | None = None
    finishing = False  # writing the end state: a second signal must not cut it short
    reported = False  # the one line is out
    began = False  # a command that writes files has begun: "nothing was written" may be false
    rank = False  # this process is a rank of a data-parallel run
    world: World | None = None  # ... and the group it joined
    quiet = False  # a rank other than 0: rank 0 speaks for the run, on stderr


def _on_stop_signal(signum, frame):
    if Stop.signum is None:
        Stop.signum = signum
    # a rank's collective fails when the rank at its other end stops first, so a rank's stop
    # often arrives while that error is being handled: the handler sees Stop.signum instead
    handling = Stop.rank and sys.exc_info()[1] is not None
    if Stop.finishing or handling:
        return
    if inside_import(frame) and hold_until_imported():
        return
    stop_now(Stop.signum)


def stop_now(signum: int) -> None:
    # a CSV line is never cut in half; before store is imported nothing can be writing
    store_module = sys.modules.get("gradlab.record.store")
    if store_module is None:
        raise Interrupted(signum)
    store_module.raise_after_write(Interrupted(signum))


# A stop is never raised inside an import: a library's guarded import (try: import x / except:
# ...) would catch it, and the module it was loading would stay half-made (numpy without its
# matrix, seen once in 40 SIGTERMs at 0.6 s). The stop is held and raised at the first moment
# no import runs, read every HELD_POLL seconds; an import that outlasts HOLD_AT_MOST (a
# user's module that never finishes loading) gets the stop anyway, as does a second signal.
HELD_POLL = 0.02
HOLD_AT_MOST = 10.0


class Held:
    since: float | None = None  # when the held stop arrived (time.monotonic())
    alarm: object = None  # SIGALRM's handler before the hold


def inside_import(frame) -> bool:
    """Whether ``frame`` runs inside importlib's machinery (a module being loaded)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def hold_until_imported() -> bool:
    """Hold the stop until the import ends (True), or not (False: a second stop signal, or
    no interval timer on this platform)."""
    if not hasattr(signal, "setitimer"):
        return False
    if Held.since is not None:  # a second signal while holding the first: stop now
        release()
        return False
    Held.since = time.monotonic()
    Held.alarm = signal.signal(signal.SIGALRM, _on_held_stop_poll)
    signal.setitimer(signal.ITIMER_REAL, HELD_POLL)
    return True


def act_on_held_stop() -> None:
    """A safe point (a step taken): a stop held during an import ends the run here, if the
    poll has not ended it already."""
    if Held.since is not None and not Stop.finishing:
        release()
        stop_now(Stop.signum)


def release() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL if Held.alarm is None else Held.alarm)
    Held.since = Held.alarm = None


def _on_held_stop_poll(signum, frame):
    if inside_import(frame) and time.monotonic() - Held.since < HOLD_AT_MOST:
        signal.setitimer(signal.ITIMER_REAL, HELD_POLL)
        return
    release()
    if not Stop.finishing:
        stop_now(Stop.signum)


