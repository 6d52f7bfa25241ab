"""The gradlab command line. Thin: parse, validate, call the library, render.

A command's result goes to stdout: the tables of `list`, `show` and `compare`, the
run directory's path (`run`), the paths written (`plot`, `report`, `init`), or one
JSON document with --json. Progress, messages, warnings and `run`'s own table go to
stderr, so `gradlab run ... | xargs gradlab compare` and `gradlab list | grep lr` work.

Start-up is fast: torch, pandas and matplotlib are imported inside the commands that
need them, never here (tests/test_ux.py holds that).

SIGINT (Ctrl-C) and SIGTERM (kill, timeout, a batch scheduler) stop gradlab at any
moment with one line and exit code 130 or 143; a run directory that exists by then
is marked interrupted, with the trials finished so far kept.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from gradlab.cli.signals import (
    Early,
    Held,
    Stop,
    _note_early_stop,
    _on_stop_signal,
    catch_stop_signals,
    early_stop,
    restore_signal_handlers,
    starting,
)

# before anything slow: torch and pandas take seconds to import, and a Ctrl-C meanwhile gets
# the one line too (only Python's own start-up, some milliseconds, comes before this)
_handlers_before_import = catch_stop_signals(_note_early_stop)
try:
    from gradlab.cli import audit, read, run, specs  # noqa: F401  (each adds its commands)
    from gradlab.cli.shared import app
finally:
    restore_signal_handlers(_handlers_before_import)
if Early.signum is not None:
    raise early_stop(Early.signum, starting())

__all__ = ["app", "main", "script"]


def main() -> None:
    """The `gradlab` command: the app, with SIGINT and SIGTERM ending it in one line."""
    Stop.signum, Stop.finishing, Stop.reported, Stop.began = None, False, False, False
    Stop.rank, Stop.world, Stop.quiet = False, None, False
    Held.since = Held.alarm = None
    previous = catch_stop_signals(_on_stop_signal)
    try:
        app()
    except KeyboardInterrupt:  # outside any command, e.g. while typer reads the arguments
        Stop.finishing = True
        raise early_stop(Stop.signum or signal.SIGINT,
                         "" if Stop.began else starting()) from None
    except SystemExit as ended:
        # typer turns a KeyboardInterrupt that leaves a command (or its argument parsing)
        # into a silent exit 130
        if ended.code == 130 and Stop.signum is not None and not Stop.reported:
            Stop.finishing = True
            raise early_stop(Stop.signum, "" if Stop.began else starting()) from None
        if ended.code == 1 and stdout_closed():  # `gradlab list | head -1`: the reader had
            raise SystemExit(0) from None         # enough, as with any Unix filter
        raise
    finally:
        restore_signal_handlers(previous)


def stdout_closed() -> bool:
    """Whether stdout's reader went away (`gradlab list | head -1`). click then wraps stdout
    to silence its flush and exits 1; rich points stdout at /dev/null and exits 1."""
    # by name: click's class is PacifyFlushWrapper in some versions, _PacifyFlushWrapper in
    # others, and typer has its own copy of the code that wraps
    if type(sys.stdout).__name__.lstrip("_") == "PacifyFlushWrapper":
        with contextlib.suppress(OSError, ValueError):  # and Python's own exit is quiet too
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
        return True
    return _is_devnull() and not _STDOUT_WAS_DEVNULL


def _is_devnull() -> bool:
    try:
        out, null = os.fstat(sys.__stdout__.fileno()), os.stat(os.devnull)
    except (OSError, ValueError, AttributeError):
        return False
    return (out.st_dev, out.st_ino) == (null.st_dev, null.st_ino)


_STDOUT_WAS_DEVNULL = _is_devnull()  # `gradlab run > /dev/null` keeps its exit code


def script() -> None:
    """The `gradlab` console script and `python -m gradlab`: main(), then a quick exit.

    After a run, Python's teardown of the interpreter (torch's modules and every object
    freed one by one) holds the shell's prompt back for about a second (benchmarks/RESULTS.md,
    "Start-up costs"). By then every file is closed and every worker gone, so once main()
    is done and its output flushed, the process ends without that teardown (os._exit),
    unless some thread is still running: that exit is left to Python."""
    import threading

    try:
        main()
        code = 0
    except SystemExit as ended:  # as Python itself turns one into an exit status
        code = ended.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # e.g. a closed pipe: Python's own exit says so
        sys.exit(code)
    if threading.active_count() > 1:
        sys.exit(code)
    os._exit(code)


