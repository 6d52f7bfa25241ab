"""`gradlab audit`: the user's own training loop against its big-batch twin."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer

from gradlab.cli.audit_table import json_document, render
from gradlab.cli.shared import JsonOpt, OutOpt, app, console, ended
from gradlab.cli.signals import Stop
from gradlab.errors import GradlabError


@app.command()
def audit(
    entrypoint: Annotated[str, typer.Argument(
        help="Your training function as pkg.module:train, with the signature "
             "train(micro_batch_size, accum_steps, max_steps).", show_default=False)],
    accum_steps: Annotated[int, typer.Option(
        "--accum-steps", "-n", help="N, the micro-batches per optimizer step to check.",
        show_default=False)],
    micro_batch_size: Annotated[int, typer.Option(
        "--micro-batch-size", "-m", help="m: the big-batch twin runs with m*N x 1.")] = 8,
    steps: Annotated[int, typer.Option(
        "--steps", "-k", help="Optimizer steps each run makes (max_steps).")] = 5,
    out: OutOpt = Path("results"),
    copy_limit: Annotated[int | None, typer.Option(
        help="Copy every gradient while parameters x steps <= this many elements (default "
             "5e7); above, estimate the errors from norms and random projections.",
        show_default=False)] = None,
    nproc_per_node: Annotated[int, typer.Option(
        "--nproc-per-node", "-w",
        help="W: run the accumulated loop on W ranks, started by torch's launcher (torchrun) "
             "on this machine, against the big batch m*N*W on one process. For loops that "
             "call torch.distributed.init_process_group() (DDP, FSDP2).")] = 1,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", metavar="SECONDS",
        help="Stop both loops when neither has taken an optimizer step for this long (a loop "
             "that hangs or never returns). 0: no limit.",
        show_default="10x the slowest step so far, 300 s at least")] = None,
    sequential: Annotated[bool, typer.Option(
        "--sequential", help="Run the two loops one after the other, not side by side (when "
                             "both do not fit in memory at once).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Check your own, unchanged training loop against its big-batch twin; exit 1 if they differ.

    Calls train(m, N, K) and train(m*N, 1, K), each in its own process, records the
    gradient and learning rate every optimizer.step() receives, and compares them
    step by step. Prints the run directory (readable by compare, plot and report).

    Examples:

    * `gradlab audit experiments.tutorial_loop:train --accum-steps 4`

    * `gradlab audit mypkg.train:train -n 8 -m 4 --steps 20` - in CI: exit 1 when it differs

    * `gradlab audit mypkg.train:train -n 4 --json` - the verdict and every step as JSON

    * `gradlab audit experiments.ddp_loop:train -n 4 --nproc-per-node 2` - a DDP loop on 2 ranks
    """
    Stop.began = True
    err = console(stderr=True)
    try:
        from gradlab.api import audit as run_audit  # starts torch processes: only audit needs it
        from gradlab.auditing.result import COPY_LIMIT

        # a spinner on a terminal only: in a log or CI, stderr holds the result and nothing else
        spinner = err.is_terminal and not json_out
        with err.status("auditing") if spinner else contextlib.nullcontext() as status:
            result = run_audit(
                entrypoint, accum_steps, micro_batch_size=micro_batch_size, steps=steps, out=out,
                copy_limit=COPY_LIMIT if copy_limit is None else copy_limit,
                parallel=not sequential, nproc_per_node=nproc_per_node, timeout=timeout,
                say=status.update if status else lambda line: None)
    except GradlabError as e:
        raise ended(e, json_out) from None
    if json_out:
        typer.echo(json.dumps(json_document(result), indent=2, default=str))
    else:
        render(result, err)
        err.print("run directory:", highlight=False)
        typer.echo(str(result.run_dir))
    if result.failed:
        raise typer.Exit(1)

