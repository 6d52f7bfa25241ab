"""Small finished runs for the compare and plot tests (fast: about a second each)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import gradlab

# the equivalence experiment cut down to the mlp, float32, N = 1, 2, 4 and 3 steps
MINI = ["--set", "model=mlp", "--set", "dataset=regression", "--set", "norm=none",
        "--set", "dtype=float32", "--set", "accum_steps=1,2,4", "--set", "steps=3"]


def run_dir(*args) -> Path:
    """`gradlab run ARGS --json`, asserting success; returns the run directory."""
    result = gradlab("run", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return Path(json.loads(result.stdout)["run_dir"])
