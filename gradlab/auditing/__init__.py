"""gradlab audit: the user's own, unchanged training loop against its big-batch twin.

The user's entrypoint ``train(micro_batch_size, accum_steps, max_steps)`` seeds itself,
builds its model, optimizer and data, and makes ``max_steps`` optimizer steps. gradlab
calls it twice, each time in a fresh process:

    accumulated   train(m, N, K)      N micro-batches of m per optimizer step
    big-batch     train(m*N, 1, K)    one batch of m*N per step (the baseline)

The worker (worker.py) records what every optimizer step receives, through torch's global
hooks; the parent (parent.py) runs the two in lockstep and compares them step by step;
diagnosis.py names the mistake when the pattern is a known one; rundir.py writes the run
directory that compare, plot and report read.

``audit`` and ``AuditResult`` are imported on first use: the worker process imports this
package too, and must start as fast as the user's own script.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradlab.auditing.parent import audit
    from gradlab.auditing.result import AuditResult

__all__ = ["AuditResult", "audit"]


def __getattr__(name: str) -> Any:
    if name == "audit":
        from gradlab.auditing.parent import audit
        return audit
    if name == "AuditResult":
        from gradlab.auditing.result import AuditResult
        return AuditResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
