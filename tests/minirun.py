"""Small finished runs for the compare and plot tests (fast: about a second each)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import gradlab

# the equivalence experiment cut down to the mlp, float32, N = 1, 2, 4 and 3 steps
MINI = ["--set", "model=mlp", "--set", "dataset=regression", "--set", "norm=none",
        "--set", "dtype=float32", "--set", "accum_steps=1,2,4", "--set", "steps=3"]


def run_dir(*args, exit_code: int = 0) -> Path:
    """`gradlab run ARGS --json`, asserting it exits with ``exit_code`` (1: a run whose arms
    broke a promise of the spec); returns the run directory."""
    result = gradlab("run", *args, "--json")
    assert result.exit_code == exit_code, result.stderr
    return Path(json.loads(result.stdout)["run_dir"])
