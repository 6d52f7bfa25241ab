"""Small finished runs for the compare and plot tests (fast: about a second each)."""

from __future__ import annotations

from pathlib import Path

from conftest import library_run

# the equivalence experiment cut down to the mlp, float32, N = 1, 2, 4 and 3 steps
MINI = ["--set", "model=mlp", "--set", "dataset=regression", "--set", "norm=none",
        "--set", "dtype=float32", "--set", "accum_steps=1,2,4", "--set", "steps=3"]


def run_dir(*args, exit_code: int = 0) -> Path:
    """A finished run (through the library, as `gradlab run ARGS` starts it), asserting that
    its arms kept (exit_code 0) or broke (1) a promise of the spec; returns its directory."""
    result = library_run(*(str(a) for a in args))
    assert (1 if result.failures else 0) == exit_code, result.failures
    return result.run_dir
