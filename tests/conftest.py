"""Shared helpers: drive the CLI as a user would, and small finished runs to read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradlab.cli import app


def gradlab(*args: str, env: dict[str, str] | None = None):
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr).
    ``env`` sets environment variables for the call (COLUMNS=80: an 80-column terminal)."""
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="gradlab", env=env)


def run_json(*args: str) -> dict:
    """`gradlab run ... --json`, asserting success; returns the parsed document."""
    result = gradlab("run", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def arm_rows(doc: dict, arm: str) -> list[dict]:
    """Every trial's row for one arm, each with the trial's swept settings merged in."""
    return [{**t["settings"], **a} for t in doc["trials"] for a in t["arms"] if a["arm"] == arm]


@pytest.fixture(scope="session")
def equivalence_run(tmp_path_factory) -> dict:
    """A complete equivalence run at N = 2 and 4 (20 steps, as the default), shared by tests."""
    out = tmp_path_factory.mktemp("runs")
    return run_json("equivalence", "--set", "accum_steps=2,4", "--set", "steps=20",
                    "--out", str(out))


@pytest.fixture(scope="session")
def equivalence_dir(equivalence_run) -> Path:
    return Path(equivalence_run["run_dir"])
