"""The run directory: run.json plus tidy CSV files, written as the run goes.

Layout (schema in the README):
    run.json      config, versions, device, times, status
    summary.csv   one row per (trial, arm): the headline numbers and the verdict
    steps.csv     one row per (trial, arm, step): the trajectory
    probe.csv     one row per (trial, arm, step, param): gradient vs the baseline's
    buffers.csv   one row per (trial, arm, step, buffer): BatchNorm running statistics vs
                  the baseline's after the same probe forward ('*': all, with eval accuracy)
    eval.csv      one row per (trial, arm, evaluated step): held-out loss and accuracy
    trace.csv     with trace=true: accumulated .grad after every micro-batch
    weights.csv   with trace=true: every parameter after every step (step 0: initial)
    checks.csv    one row per (trial, arm, check) the run verified, with its tolerance

compare and plots read only these files, so they work on old runs and on runs
copied from other machines.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gradlab.errors import GradlabError
from gradlab.record import schema
from gradlab.record.meta import RUN_STATUSES, RunMeta, Status


def now() -> str:
    return dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    from gradlab import __version__

    return {"gradlab": __version__, "python": platform.python_version(),
            "torch": torch_version(), "platform": platform.platform()}


def torch_version() -> str:
    """torch's version, without importing torch where it is not (an audit's parent): the
    installed distribution's, which is the string torch.__version__ gives."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.__version__
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # torch from a source tree
        import torch

        return torch.__version__


def git_commit() -> str | None:
    """The commit of the working directory's repository, if there is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class _Writes:
    """Stop signals wait for a write to end, so a stopped run never ends in half a line.

    A signal handler calls ``raise_after_write(exc)``: outside a write it raises at
    once; inside one, when the write is done.
    """
    depth = 0
    pending: BaseException | None = None


@contextlib.contextmanager
def whole_write() -> Iterator[None]:
    _Writes.depth += 1
    try:
        yield
    finally:
        _Writes.depth -= 1
        if _Writes.depth == 0 and _Writes.pending is not None:  # the stop beats all else
            pending, _Writes.pending = _Writes.pending, None
            raise pending


def raise_after_write(exc: BaseException) -> None:
    if _Writes.depth:
        _Writes.pending = _Writes.pending or exc
    else:
        raise exc


class RunDir:
    """A run directory being written. Create it only after the input has been validated."""

    def __init__(self, parent: Path, meta: RunMeta, name: str | None = None):
        """The directory PARENT/NAME-STAMP (NAME: the experiment's), with run.json saying
        it is running."""
        parent = Path(parent)
        name = name or meta.experiment
        created, path = [], None
        try:  # from the first look at the path: a name the system refuses is --out's error too
            created = _missing_folders(parent)  # to remove again if the run cannot start
            parent.mkdir(parents=True, exist_ok=True)
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = parent / f"{name}-{stamp}"
            suffix = 1
            while path.exists():  # two runs in the same second
                suffix += 1
                path = parent / f"{name}-{stamp}-{suffix}"
            path.mkdir()
            self.path = path
            self.swept_settings = {k for t in meta.trials for k in t.get("swept", {})}
            described = meta.as_dict()
            self.meta = {"experiment": described.pop("experiment"), "status": Status.RUNNING,
                         "started": now(), "ended": None, **described, "versions": versions(),
                         "git_commit": git_commit(), "command": sys.argv,
                         "pid": os.getpid(), "host": socket.gethostname()}
            self.finished_trials: set[int] = set()  # trials whose summary rows are written
            self._write_meta()
        except BaseException as err:  # a full disk, or a Ctrl-C: leave nothing behind
            if path is not None and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            if isinstance(err, OSError):
                raise GradlabError(f"--out {parent}: cannot create the run directory there "
                                   f"({_why(err, parent)}); give --out a folder you can "
                                   f"write to") from None
            raise

    def _write_meta(self) -> None:
        tmp = self.path / "run.json.tmp"
        with whole_write():
            tmp.write_text(json.dumps(_jsonable(self.meta), indent=2) + "\n", encoding="utf-8")
            tmp.replace(self.path / "run.json")  # never leave a half-written run.json

    def append(self, table: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        allowed = schema.allowed_columns(table, self.swept_settings)
        undeclared = {c for row in rows for c in row} - allowed
        if undeclared:  # a writer and schema.py disagree: a bug, caught before it reaches disk
            raise AssertionError(f"{table}.csv: columns {sorted(undeclared)} are not declared "
                                 f"in gradlab/record/schema.py")
        path = self.path / f"{table}.csv"
        with whole_write():
            pd.DataFrame(rows).to_csv(path, mode="a", header=not path.exists(), index=False)
            if table == "summary":
                self.finished_trials.update(row["trial"] for row in rows)

    def finish(self, status: Status, error: str | None = None, rank: int | None = None) -> None:
        """The run's end; ``rank``: the rank of a data-parallel run whose failure ended it."""
        self.meta.update(status=status, ended=now())
        if error:
            self.meta["error"] = error
        if rank is not None:
            self.meta["failed_rank"] = rank
        self._write_meta()


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _why(err: OSError, parent: Path) -> str:
    """What stopped a folder from being created, in words."""
    for folder in (parent, *parent.parents):
        with contextlib.suppress(OSError):  # a name too long to look at is not a file
            if folder.is_file():
                return f"'{folder}' is a file, not a folder"
    named = f": '{err.filename}'" if err.filename else ""
    return f"{err.strerror or err}{named}"


def _jsonable(value: Any) -> Any:
    """NaN and infinity are not JSON; write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(_jsonable(value), indent=2)


# ----------------------------------------------------------------------------- reading

@dataclass
class Run:
    """A finished run directory, read back: run.json as ``meta``, each CSV as a DataFrame."""
    path: Path
    meta: dict[str, Any]
    _tables: dict[str, pd.DataFrame | None] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def experiment(self) -> str:
        return self.meta["experiment"]

    def table(self, name: str) -> pd.DataFrame | None:
        """One CSV as a DataFrame (None when the run did not write it), checked on first read."""
        if name not in self._tables:
            self._tables[name] = _read_table(self.path / f"{name}.csv", name)
        return self._tables[name]

    def arm_settings(self) -> pd.DataFrame:
        """One row per (trial, arm) with every setting of that arm, from run.json."""
        return pd.DataFrame([{"trial": t["trial"], "arm": arm, **spec["settings"]}
                             for t in self.meta["trials"] for arm, spec in t["arms"].items()])

    def swept_keys(self) -> list[str]:
        return list(dict.fromkeys(k for t in self.meta["trials"] for k in t.get("swept", {})))


def load_run(path: Path) -> Run:
    """Read a run directory, refusing anything unfinished or damaged. Reads only, never writes."""
    path = Path(path)
    if not path.is_dir():
        raise GradlabError(f"'{path}' does not exist or is not a folder; give a run directory "
                           f"(the path 'gradlab run' printed) or a folder of runs")
    meta = _read_meta(path)
    status = meta["status"]
    rerun = f"rerun the experiment ({' '.join(meta.get('command') or ['gradlab run'])})"
    if status == Status.RUNNING:
        raise GradlabError(_running(path, meta, rerun))
    if status in (Status.FAILED, Status.INTERRUPTED):
        reason = str(meta.get("error") or "").strip().splitlines()
        why = f": {reason[-1]}" if reason else ""
        happened = "was interrupted" if status == Status.INTERRUPTED else "failed"
        raise GradlabError(f"run '{path}' {happened}{why}; its results are incomplete, so "
                           f"{rerun}")
    run = Run(path, meta)
    for name in schema.REQUIRED:  # the tables compare and plots read, checked up front
        run.table(name)
    for name in ("summary", "steps"):
        if run.table(name) is None:
            raise GradlabError(f"run '{path}' has no {name}.csv although run.json says it is "
                               f"complete; the folder is damaged, so rerun the experiment")
    _check_complete(run)
    return run


def _running(path: Path, meta: dict[str, Any], rerun: str) -> str:
    """Why a run marked running cannot be read: still running, or its process died."""
    pid, host = meta.get("pid"), meta.get("host")
    here = socket.gethostname()
    if isinstance(pid, int) and host == here and not _alive(pid):
        return (f"run '{path}' is marked running, but its process (pid {pid}) is gone; the run "
                f"was cut off, so {rerun}")
    where = f" on host {host}" if host and host != here else ""
    process = f" as pid {pid}" if pid else ""
    return (f"run '{path}' is still running{where}{process} (started {meta.get('started')}); "
            f"wait for it to finish, or {rerun} if its process died")


def _alive(pid: int) -> bool:
    """Whether a process of this machine has that id (signal 0 checks without sending)."""
    if pid <= 0 or os.name != "posix":  # elsewhere os.kill would end the process: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to someone else
        return True
    return True


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "run.json"
    if not meta_path.is_file():
        if not any(path.iterdir()):
            raise GradlabError(f"'{path}' is an empty folder, not a run directory; give the "
                               f"path 'gradlab run' printed")
        raise GradlabError(f"'{path}' is not a run directory (no run.json in it); give the "
                           f"path 'gradlab run' printed, or a folder that holds run directories")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GradlabError(f"'{meta_path}' is corrupted or truncated ({err}); rerun the "
                           f"experiment") from None
    missing = [k for k in ("experiment", "status", "trials") if not isinstance(meta, dict)
               or k not in meta]
    if missing or meta["status"] not in RUN_STATUSES:
        raise GradlabError(f"'{meta_path}' is not a gradlab run.json (missing or bad: "
                           f"{', '.join(missing) or 'status'}); rerun the experiment")
    return meta


def _read_table(path: Path, name: str) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    damaged = f"'{path}' is truncated or corrupted"
    raw = path.read_bytes()
    # pandas fills a half-written last line with NaN without a word; every line we write ends
    if not raw.endswith(b"\n") or not raw.startswith(b"trial,arm"):
        where = "its last line is cut off" if raw.startswith(b"trial,arm") else \
            "it does not start with the header 'trial,arm,...'"
        raise GradlabError(f"{damaged} ({where}); rerun the experiment")
    try:
        frame = pd.read_csv(io.StringIO(raw.decode("utf-8")))
    except (UnicodeDecodeError, pd.errors.ParserError) as err:
        detail = str(err).strip().splitlines()[-1]
        raise GradlabError(f"{damaged} ({detail}); rerun the experiment") from None
    required = (*schema.KEYS, *schema.REQUIRED.get(name, ()))
    missing = [c for c in required if c not in frame]
    if missing:
        raise GradlabError(f"{damaged} (no column {', '.join(missing)}); rerun the experiment")
    for column in required:
        if column not in schema.TEXT_COLUMNS and not pd.api.types.is_numeric_dtype(frame[column]):
            raise GradlabError(f"{damaged} (column '{column}' holds text where numbers belong); "
                               f"rerun the experiment")
    return frame


def _check_complete(run: Run) -> None:
    """Every (trial, arm) of run.json has its summary row and all of its steps."""
    summary, steps = run.table("summary"), run.table("steps")
    last_step = steps.groupby(["trial", "arm"])["step"].max()
    have = set(zip(summary["trial"], summary["arm"], strict=True))
    for trial in run.meta["trials"]:
        for arm, spec in trial["arms"].items():
            key = (trial["trial"], arm)
            if key not in have:
                raise GradlabError(f"'{run.path / 'summary.csv'}' is truncated: no row for "
                                   f"trial {key[0]} arm '{arm}'; rerun the experiment")
            if last_step.get(key) != spec["settings"]["steps"]:
                raise GradlabError(f"'{run.path / 'steps.csv'}' is truncated: trial {key[0]} "
                                   f"arm '{arm}' stops before step {spec['settings']['steps']}; "
                                   f"rerun the experiment")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories named, or held one level down in a folder named."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / "run.json").exists():
            inside = sorted(p for p in path.iterdir() if (p / "run.json").is_file())
            found += inside or [path]  # no runs inside: load_run says what it is instead
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def load_runs(paths: list[Path]) -> list[Run]:
    """Several runs of one experiment (a comparison across experiments compares nothing)."""
    runs = [load_run(p) for p in find_runs(paths)]
    experiments = dict.fromkeys(r.experiment for r in runs)
    if len(experiments) > 1:
        named = ", ".join(f"{r.name} ({r.experiment})" for r in runs)
        raise GradlabError(f"these runs are of different experiments: {named}; compare runs of "
                           f"one experiment at a time")
    return runs
