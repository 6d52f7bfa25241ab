"""gradlab for a project's own tests: one assertion that a training loop accumulates right.

    from gradlab.testing import assert_accumulation_equivalent

    def test_my_loop_accumulates_like_one_big_batch():
        assert_accumulation_equivalent("mypkg.train:train", accum_steps=4, steps=3)

It runs ``gradlab audit`` (the same two processes, the same verdict rule) and raises
AssertionError with the first difference and its measured diagnosis when the loop differs.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gradlab.api import audit
from gradlab.auditing.result import difference_text


def assert_accumulation_equivalent(train: str | Callable, accum_steps: int, *,
                                   micro_batch_size: int = 8, steps: int = 3,
                                   nproc_per_node: int = 1,
                                   out: str | Path | None = None) -> None:
    """Assert that train(m, N, K) hands every optimizer step what train(m·N, 1, K) does.

    ``train``: 'pkg.module:function' or a module-level function with the audit's contract,
    train(micro_batch_size, accum_steps, max_steps). ``nproc_per_node``: W > 1 runs the
    accumulated loop on W ranks (torchrun) against the big batch m·N·W on one. ``out``:
    where the run directory goes; by default a temporary folder, removed when the loop is
    equivalent and kept (its path is in the message) when it is not. A loop gradlab cannot
    audit at all raises gradlab's GradlabError, whose message says how to fix it.
    """
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="gradlab-test-"))
    result = audit(train, accum_steps, micro_batch_size=micro_batch_size, steps=steps,
                   out=folder, nproc_per_node=nproc_per_node)
    if not result.failed:
        if out is None:
            shutil.rmtree(folder, ignore_errors=True)
        return
    first = result.first_difference
    lines = [f"{result.arm.call(steps)} differs from {result.base.call(steps)} from step "
             f"{first['step']}: {difference_text(first)}",
             f"diagnosis: {result.diagnosis or 'none: no pattern gradlab knows fits'}",
             f"run directory: {result.run_dir}"]
    raise AssertionError("\n".join(lines))
