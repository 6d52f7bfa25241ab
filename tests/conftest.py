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


def library_run(*args: str):
    """A run through the library, as `gradlab run NAME --set K=V ... --out DIR` would start
    it: the tests that only need a run's results call gradlab.run(), not the CLI."""
    import gradlab

    experiment, rest = args[0], list(args[1:])
    overrides, out = [], "results"
    while rest:
        flag, value = rest.pop(0), rest.pop(0)
        if flag in ("--set", "-s"):
            overrides.append(value)
        elif flag in ("--out", "-o"):
            out = value
        else:
            raise AssertionError(f"library_run: no such option {flag}")
    return gradlab.run(experiment, overrides, out=out)


def run_json(*args: str) -> dict:
    """A run (library_run) as `gradlab run ... --json` documents it; returns the document."""
    from gradlab.cli.render import json_document
    from gradlab.record import store

    return json.loads(store.dumps(json_document(library_run(*args))))


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
