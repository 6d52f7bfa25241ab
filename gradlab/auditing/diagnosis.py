"""Why an audit differs: the likely mistake behind the first difference, named from what the
worker counted (zero_grad(), scheduler steps, the layers that ran) and how the accumulated
gradient relates to the big batch's."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

from gradlab.auditing.result import LR_RTOL

if TYPE_CHECKING:
    from gradlab.auditing.result import AuditResult

# a gradient "points the same way" above this cosine, and is "N times as long" within
# this relative distance of N: not-divided-by-N gives cosine 1 and ratio N to rounding
SAME_DIRECTION = 1 - 1e-6
SAME_RATIO = 1e-3


class Diagnosis(NamedTuple):
    text: str
    certain: bool  # read off what the loop did (counts, an exact multiple), not a likeness


def diagnose(result: AuditResult) -> Diagnosis:
    """The likely mistake behind the first difference.

    Certain diagnoses rest on facts no nondeterminism can fake: how often zero_grad() and
    the scheduler ran, or a gradient that is an exact multiple of the big batch's. The
    others name the usual cause of a pattern, and are given only for a loop shown to be
    deterministic.
    """
    first = result.first_difference
    n, step = result.arm.accum_steps, first["step"]
    base, own = result.captures["big-batch"], result.captures["accumulated"]
    ratio = (first["grad_norm_accumulated"] / first["grad_norm_big_batch"]
             if first["grad_norm_big_batch"] else math.inf)
    cosine = first["cosine"]

    if first["rel_lr_diff"] > LR_RTOL:
        said = (f"the learning rate differs from step {step}: {first['lr_accumulated']:.6g} "
                f"instead of the big batch's {first['lr_big_batch']:.6g}")
        sa, sb = (_count(c, "scheduler_steps", between=True) for c in (own, base))
        span = ("between the first and the last optimizer step" if len(own["steps"]) > 1
                else "before the optimizer step")
        if sa > sb:
            rate = ("once per micro-batch" if sb and sa == n * sb else
                    f"{sa / sb:.3g} times per optimizer step" if sb else "before the step")
            pace = f"{sa / sb:.3g}x too fast" if sb else "ahead"
            return Diagnosis(
                f"{said}. {span.capitalize()} the scheduler stepped {sa} times in the "
                f"accumulated run and {sb} times in the big batch's: it is stepped {rate}, so "
                f"the schedule runs {pace}. Call scheduler.step() once per optimizer step, next "
                f"to optimizer.step().", certain=True)
        return Diagnosis(
            f"{said}, although both runs stepped their scheduler {sa} times {span}: the "
            f"schedule itself depends on the batch size or the number of micro-batches.",
            certain=False)
    if first["settings_differ"]:
        return Diagnosis(
            f"the optimizer's settings differ from step {step}: {first['settings_differ']}: "
            f"they depend on N in the loop; the big batch's update needs the big batch's "
            f"settings.", certain=True)
    if _count(own, "discarded") > _count(base, "discarded"):
        window = own["steps"][0]
        return Diagnosis(
            f"zero_grad() cleared .grad between the micro-batches of a step: before step 1 it "
            f"discarded {window['discarded']} of the {window['backwards']} backward() "
            f"results, so optimizer.step() received the last micro-batch's gradient alone "
            f"(|g| {ratio:.3g}x the big batch's, cosine {cosine:.3g}). Call zero_grad() only "
            f"after optimizer.step().", certain=True)
    if cosine >= SAME_DIRECTION and abs(ratio - n) <= SAME_RATIO * n:
        return Diagnosis(
            f"the accumulated gradient is {ratio:.4g}x the big batch's and points the same way "
            f"(cosine {cosine:.6g}), so the relative error is N - 1 = {n - 1}: the loss is not "
            f"divided by N = {n}. Divide each micro-batch's loss by accum_steps before "
            f"backward(): (loss / accum_steps).backward().", certain=True)
    if cosine >= SAME_DIRECTION and abs(ratio - 1 / n) <= SAME_RATIO / n:
        return Diagnosis(
            f"the accumulated gradient is {ratio:.4g}x the big batch's and points the same way "
            f"(cosine {cosine:.6g}): 1/N of it, N = {n}, so the loss is divided by N twice. "
            f"A framework that accumulates (Lightning's accumulate_grad_batches, Accelerate's "
            f"backward(), the Hugging Face Trainer) divides by N itself: leave the loss "
            f"undivided there.", certain=True)
    if cosine >= SAME_DIRECTION and step == 1:
        return Diagnosis(
            f"the accumulated gradient is {ratio:.4g}x the big batch's and points the same way "
            f"(cosine {cosine:.6g}): each micro-batch's loss is scaled by {ratio:.4g}/N "
            f"= {ratio / n:.4g} instead of 1/N = {1 / n:.4g}.", certain=True)
    layers = own["layers"]
    if layers["batchnorm"]:
        return Diagnosis(
            f"the model has BatchNorm in training mode ({_few(layers['batchnorm'])}): it "
            f"normalises each micro-batch of {result.arm.micro_batch_size} by that "
            f"micro-batch's own statistics, not the {result.base.batch_size} of the big batch, "
            f"and no accumulation can reproduce that (cosine {cosine:.6g} at step {step}). Use "
            f"GroupNorm or LayerNorm, or keep BatchNorm in eval mode, when accumulating.",
            certain=False)
    if layers["dropout"]:
        return Diagnosis(
            f"the model has dropout in training mode ({_few(layers['dropout'])}): micro-batches "
            f"draw other random masks than the big batch, so the gradients differ even when the "
            f"loop is right. Audit with dropout off (p = 0).", certain=False)
    if step > 1:
        if own["steps"][step - 1]["zero_grads"] == 0 and base["steps"][step - 1]["zero_grads"]:
            return Diagnosis(
                f"equal at step 1, different from step {step}: no zero_grad() ran in the "
                f"accumulated run between optimizer steps {step - 1} and {step}, so step {step} "
                f"received step {step - 1}'s gradient as well. Call zero_grad() after every "
                f"optimizer.step().", certain=True)
        return Diagnosis(
            f"equal at step 1, different from step {step}: typical of gradients not cleared "
            f"after an optimizer step (step {step} then also holds the previous steps' "
            f"gradients).", certain=False)
    return Diagnosis(
        f"at step 1 the gradient already points elsewhere (cosine {cosine:.6g}) with the loss "
        f"scaled right, no BatchNorm and no dropout: typical of a loss normalised per "
        f"micro-batch by a count that varies between micro-batches, like tokens in sequences "
        f"of unequal length (the error vanishes when all have equal length) or an uneven last "
        f"micro-batch. Normalise by the count of the whole window: sum the losses, divide by "
        f"the tokens (examples) of all N micro-batches.", certain=False)


def _count(capture: dict[str, Any], key: str, between: bool = False) -> int:
    """How often something happened before the last optimizer step, or (between) from the
    first step to the last, which gives the rate per step (unless there is only one)."""
    windows = capture["steps"]
    return sum(w[key] for w in (windows[1:] if between and len(windows) > 1 else windows))


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
