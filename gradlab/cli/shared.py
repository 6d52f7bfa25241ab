"""The Typer app and what its commands share: the consoles, the options, the one line an
error ends with, and the one place an exception becomes an exit code (``ended``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from gradlab import __version__
from gradlab.cli.signals import Stop
from gradlab.config import spec
from gradlab.errors import GradlabError
from gradlab.lab.experiment import RunEnded
from gradlab.record.meta import Status

app = typer.Typer(
    help="gradlab: does your gradient accumulation compute the big-batch gradient? "
         "Run paired experiments (B x 1 against (B/N) x N) and measure.",
    epilog="Start with `gradlab run toy`, then `gradlab run` (the equivalence experiment); "
           "`gradlab list` shows what there is, `gradlab show NAME` what a spec will run.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


# off a terminal (a pipe, a log file, CI) lines are as long as they need to be: a table is
# printed whole, one line per row, and a message on one line
UNBOUNDED = 10_000


def console(stderr: bool = False) -> Console:
    """Rich's console on stdout or stderr, made at each use, so that it writes to the
    stream and the width (COLUMNS) in force then. A terminal (or a set COLUMNS) gets its
    width, tables squeezed to fit; anything else long lines (rich would wrap at 80)."""
    stream = sys.stderr if stderr else sys.stdout
    fixed = stream.isatty() or "COLUMNS" in os.environ
    return Console(stderr=stderr, width=None if fixed else UNBOUNDED,
                   quiet=stderr and Stop.quiet)


def say(message: str, markup: bool = False) -> None:
    """A message for people, on stderr: in a terminal wrapped between words at its width,
    elsewhere one line."""
    console(stderr=True).print(message, markup=markup, highlight=False)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"gradlab {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option(
        "--version", "-V", callback=version_callback, is_eager=True,
        help="Print gradlab's version and exit.")] = False,
) -> None:
    """The options that come before a command."""


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and "
                                                      "nothing else (no table, no progress).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder that receives the run "
                                                          "directory.")]


def complete_spec_names(incomplete: str) -> list[str]:
    """Shell completion of an experiment name (gradlab --install-completion)."""
    return [name for name in spec.findable_specs() if name.startswith(incomplete)]


SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", metavar="KEY=VALUE",
    help="Override a setting; a comma list sweeps it (`--set accum_steps=2,4`); "
         "ARM.KEY=VALUE sets it in one arm. Repeatable.")]

# above this many trials a run needs --yes (gradlab.lab.experiment.MAX_TRIALS, which imports
# nothing slow): a typo in a sweep should not start hours of work
MAX_TRIALS = 1000
YesOpt = Annotated[bool, typer.Option(
    "--yes", help=f"Run even when the sweep makes more than {MAX_TRIALS} trials.")]


TableOpt = Annotated[str, typer.Option(
    "--table", "-t", help="compact: one row per arm and setting, one column per N, each cell "
                          "the judged error marked ✓ (as the spec expects), ✗ or · (not "
                          "checked); full: one row per arm of every trial, every column.")]
TABLES = ("compact", "full")


def fail(message: str, code: int = 2) -> typer.Exit:
    """An error's one line on stderr, and the exit code to end with."""
    one_line = " ".join(message.split())  # an exception's text may hold newlines
    console(stderr=True).print(f"[bold red]error:[/] {escape(one_line)}", highlight=False,
                               soft_wrap=True)
    return typer.Exit(code)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise fail(f"{option} {value}: choose one of {', '.join(choices)}")



def ended(error: GradlabError | RunEnded, json_out: bool = False) -> typer.Exit:
    """The one place an exception becomes an exit code: bad input (GradlabError) 2, a run
    that did not complete (RunEnded) its own code (1 failed, 128 + N stopped by signal N).
    Its one line goes to stderr; with --json, its document to stdout."""
    if isinstance(error, RunEnded):
        message, code, status, run_dir = error.message, error.code, error.status, error.run_dir
    else:
        message, code, status, run_dir = str(error), 2, Status.BAD_INPUT, None
    Stop.reported = True
    if Stop.world is not None and Stop.world.rank == 0:
        Stop.world.record_reported(code)
    if json_out and not Stop.quiet:  # (quiet: a rank other than 0, which rank 0 speaks for)
        # plain json: store (and pandas) may be what was being imported when it stopped
        typer.echo(json.dumps({"status": status, "error": " ".join(message.split()),
                               "run_dir": str(getattr(run_dir, "path", run_dir)) if run_dir
                               else None}, indent=2))
    return fail(message, code)
