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

import datetime as dt
import json
import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

STATUSES = ("running", "complete", "failed", "interrupted")


def now() -> str:
    return dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    import torch

    from gradlab import __version__

    return {"gradlab": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def git_commit() -> str | None:
    """The commit of the working directory's repository, if there is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class RunDir:
    """A run directory being written. Create it only after the input has been validated."""

    def __init__(self, parent: Path, name: str, meta: dict[str, Any]):
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        parent.mkdir(parents=True, exist_ok=True)
        path = parent / f"{name}-{stamp}"
        suffix = 1
        while path.exists():  # two runs in the same second
            suffix += 1
            path = parent / f"{name}-{stamp}-{suffix}"
        path.mkdir()
        self.path = path
        self.meta = {"experiment": name, "status": "running", "started": now(), "ended": None,
                     **meta, "versions": versions(), "git_commit": git_commit(),
                     "command": sys.argv}
        self._write_meta()

    def _write_meta(self) -> None:
        tmp = self.path / "run.json.tmp"
        tmp.write_text(json.dumps(_jsonable(self.meta), indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path / "run.json")  # never leave a half-written run.json

    def append(self, table: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        path = self.path / f"{table}.csv"
        pd.DataFrame(rows).to_csv(path, mode="a", header=not path.exists(), index=False)

    def finish(self, status: str, error: str | None = None) -> None:
        self.meta.update(status=status, ended=now())
        if error:
            self.meta["error"] = error
        self._write_meta()


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
