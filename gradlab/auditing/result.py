"""What an audit compares (the two calls of train()), within which limits, and what it found:
shared by the worker, the parent that fills it in, the diagnosis, the run directory and the
CLI's table. Torch-free, so the CLI can read a result without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradlab import entrypoints
from gradlab.errors import GradlabError
from gradlab.record.schema import fmt
from gradlab.record.verdict import Verdict

# A run copies every gradient (to host memory, in its own dtype) while parameters x
# max_steps stays within this many elements: 200 MB in float32. Above it, each
# parameter's gradient is kept as its norm and PROJECTIONS projections onto fixed random
# vectors, and the errors are estimates (E[(r.d)^2] = |d|^2 for r with independent
# N(0, 1) entries).
COPY_LIMIT = 50_000_000
PROJECTIONS = 4
CHUNK = 1 << 24  # elements projected or compared at a time: bounds the float64 temporaries

# Learning rates are Python floats from the same scheduler code in both runs: a right
# loop gives them bit for bit, so anything beyond float64 noise is a real difference.
LR_RTOL = 1e-12


def locate_entrypoint(text: str) -> entrypoints.ImportPath:
    """(module, function) of 'pkg.module:function', checked without running the module."""
    path = entrypoints.parse(text)
    if path is None:
        raise GradlabError(f"entrypoint '{text}': give it as pkg.module:function, e.g. "
                           f"experiments.tutorial_loop:train")
    entrypoints.search_here()
    if not entrypoints.exists(path.module):
        raise no_module(text, path.module)
    return path


def no_module(text: str, module: str) -> GradlabError:
    return GradlabError(f"entrypoint '{text}': no module named '{module}'; run from the "
                        f"folder that holds it, or put it on PYTHONPATH")


@dataclass(frozen=True)
class Arm:
    """One call of the user's train(): m examples a micro-batch, N micro-batches a step, on
    ``ranks`` processes started by torch's launcher (0: one plain process)."""
    name: str
    micro_batch_size: int
    accum_steps: int
    ranks: int = 0

    @property
    def batch_size(self) -> int:
        """Examples per optimizer step, over all ranks."""
        return self.micro_batch_size * self.accum_steps * max(self.ranks, 1)

    @property
    def pieces(self) -> int:
        """The partial gradients the step's gradient is summed from: N on each rank."""
        return self.accum_steps * max(self.ranks, 1)

    def call(self, max_steps: int) -> str:
        where = {0: ""}.get(self.ranks, f" on {self.ranks} rank{'s' * (self.ranks > 1)}")
        return f"train({self.micro_batch_size}, {self.accum_steps}, {max_steps}){where}"


def rank_record(out: Path, rank: int) -> Path:
    """Where rank R of a run on several ranks saves its record, beside the run's own."""
    return out.with_name(f"{out.stem}.rank{rank}{out.suffix}")


def records_of(arm: Arm, out: Path) -> list[Path]:
    """Where the run's workers save their records: ``out``, or one per rank."""
    return [out] if arm.ranks <= 1 else [rank_record(out, r) for r in range(arm.ranks)]


def beat_of(record: Path) -> Path:
    """The file a worker rewrites at every optimizer step, beside its record."""
    return record.with_name(record.name + ".beat")


def twins(micro_batch_size: int, accum_steps: int, ranks: int = 1) -> tuple[Arm, Arm]:
    """The baseline (m*N*W x 1) and the accumulated arm (m x N on each of W ranks).

    On W > 1 ranks the baseline is one process, under torch's launcher too (so the loop's
    init_process_group() works): a baseline on W ranks with N = 1 would share the
    accumulated run's division by W, and hide the mistake of dividing by it twice.
    """
    if ranks == 1:
        return (Arm("big-batch", micro_batch_size * accum_steps, 1),
                Arm("accumulated", micro_batch_size, accum_steps))
    return (Arm("big-batch", micro_batch_size * accum_steps * ranks, 1, ranks=1),
            Arm("accumulated", micro_batch_size, accum_steps, ranks=ranks))


@dataclass
class AuditResult:
    """What an audit found; ``steps`` has one row per optimizer step (audit.csv)."""
    entrypoint: str
    base: Arm
    arm: Arm
    max_steps: int
    dtype: str
    estimate: bool                      # sketches, not copies: errors are estimates
    steps: list[dict[str, Any]]
    params: list[dict[str, Any]]        # per step and parameter (probe.csv)
    captures: dict[str, dict[str, Any]]
    verdict: Verdict = Verdict.EQUIVALENT
    first_difference: dict[str, Any] | None = None
    diagnosis: str | None = None
    same_weights: bool = False          # the accumulated run followed the big batch's weights
    copy_limit: int = COPY_LIMIT
    rechecked: bool = False             # the big-batch call ran twice: the loop is deterministic
    seconds: dict[str, float] = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def failed(self) -> bool:
        return self.verdict != Verdict.EQUIVALENT


def cosine_text(value: float) -> str:
    """A cosine shows how close to 1 it is: 0.99999994 is not 1."""
    if math.isnan(value):
        return "-"
    if value > 0.999:
        return f"{value:.8f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def difference_text(first: dict[str, Any]) -> str:
    """What differs at a step, in words: 'rel grad err 3 (tolerance 3.89e-15), cosine 1', then
    the learning rates and the optimizer settings when they differ (the table's and the
    pytest assertion's words alike)."""
    what = (f"rel grad err {fmt(first['rel_grad_err'])} (tolerance {fmt(first['tolerance'])}), "
            f"cosine {cosine_text(first['cosine'])}")
    if first["rel_lr_diff"] > LR_RTOL:
        what += (f"; learning rate {fmt(first['lr_accumulated'])} against "
                 f"{fmt(first['lr_big_batch'])}")
    if first["settings_differ"]:
        what += f"; optimizer settings: {first['settings_differ']}"
    return what
