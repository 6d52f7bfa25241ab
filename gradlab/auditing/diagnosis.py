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
# the fixes of the two scale mistakes, whether the scale is read off the norms or the losses
DIVIDE = "Divide each micro-batch's loss by accum_steps before backward()"
DIVIDED_ALREADY = ("A framework that accumulates (Lightning's accumulate_grad_batches, "
                   "Accelerate's backward(), the Hugging Face Trainer) divides by N itself: "
                   "leave the loss undivided there")


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
    window = own["steps"][step - 1]
    if not math.isfinite(first["grad_norm_accumulated"]):
        return Diagnosis(
            f"the accumulated run's gradient is not finite at step {step} (|g| = "
            f"{first['grad_norm_accumulated']}, the losses backward() ran on sum to "
            f"{window['loss']:.4g}) while the big batch's is (|g| = "
            f"{first['grad_norm_big_batch']:.4g}): a micro-batch's loss or gradient is NaN or "
            f"inf where the whole batch's is not; look for it before the step.", certain=True)
    ranks = result.arm.ranks
    if ranks > 1 and first["rank_grad_spread"] > first["tolerance"]:
        return _ranks_apart(first, window, ranks)
    if first["grad_norm_accumulated"] == 0 and first["grad_norm_big_batch"] > 0:
        cleared = (f"zero_grad() discarded all {window['backwards']} backward() results before "
                   f"it: it ran after the last backward() and before optimizer.step(). Call "
                   f"zero_grad() only after optimizer.step()."
                   if window["backwards"] and window["discarded"] == window["backwards"] else
                   f"backward() ran {window['backwards']} times before it and zero_grad() "
                   f"discarded {window['discarded']} of them.")
        return Diagnosis(
            f"the accumulated run's optimizer received no gradient at step {step} (|g| = 0: "
            f"every .grad None or zero; the big batch's |g| = "
            f"{first['grad_norm_big_batch']:.4g}): {cleared}", certain=True)
    clips, base_clips = (c["steps"][step - 1].get("clips", 0) for c in (own, base))
    if clips > base_clips:
        return Diagnosis(
            f"clip_grad_norm_() ran {clips} times before step {step} in the accumulated run "
            f"and {base_clips} in the big batch's: it clips each micro-batch's partial sum, not "
            f"the gradient the step applies (|g| {ratio:.4g}x the big batch's, cosine "
            f"{cosine:.4g}). Clip once, after the last backward() of the window, before "
            f"optimizer.step().", certain=True)
    if _count(own, "discarded") > _count(base, "discarded"):
        window = own["steps"][0]
        kept = window["backwards"] - window["discarded"]
        received = ("the last micro-batch's gradient alone" if kept == 1 else
                    f"the gradient of the last {kept} micro-batches")
        return Diagnosis(
            f"zero_grad() cleared .grad between the micro-batches of a step: before step 1 it "
            f"discarded {window['discarded']} of the {window['backwards']} backward() "
            f"results, so optimizer.step() received {received} "
            f"(|g| {ratio:.3g}x the big batch's, cosine {cosine:.3g}). Call zero_grad() only "
            f"after optimizer.step().", certain=True)
    if clips and cosine >= SAME_DIRECTION:
        # clip_grad_norm_() ran in both runs: the norms the step receives are clipped, so
        # their ratio says nothing of the loss; the losses backward() ran on still do
        said = (f"the accumulated gradient points the big batch's way (cosine {cosine:.6g}) "
                f"and is {ratio:.4g}x as long, but clip_grad_norm_() ran before step {step} "
                f"in both runs, so that ratio is the clipping's")
        loss_ratio = window["loss"] / base["steps"][step - 1]["loss"] \
            if base["steps"][step - 1]["loss"] else math.nan
        for factor, cause in ((n, f"the loss is not divided by N = {n}. {DIVIDE}"),
                              (1 / n, f"the loss is divided by N = {n} twice. "
                                      f"{DIVIDED_ALREADY}")):
            if abs(loss_ratio - factor) <= SAME_RATIO * factor:
                return Diagnosis(
                    f"{said}. The losses backward() ran on before it sum to {loss_ratio:.4g}x "
                    f"the big batch's: {cause}.", certain=True)
        if not math.isnan(loss_ratio) and abs(loss_ratio - 1) > SAME_RATIO:
            return Diagnosis(
                f"{said}. The losses backward() ran on before it sum to {loss_ratio:.4g}x the "
                f"big batch's: each micro-batch's loss is scaled by {loss_ratio:.4g}/N "
                f"= {loss_ratio / n:.4g} instead of 1/N = {1 / n:.4g}.", certain=True)
    if cosine >= SAME_DIRECTION and abs(ratio - n) <= SAME_RATIO * n:
        return Diagnosis(
            f"the accumulated gradient is {ratio:.4g}x the big batch's and points the same way "
            f"(cosine {cosine:.6g}), so the relative error is N - 1 = {n - 1}: the loss is not "
            f"divided by N = {n}. {DIVIDE}: (loss / accum_steps).backward().", certain=True)
    if ranks > 1 and cosine >= SAME_DIRECTION and abs(ratio - 1 / ranks) <= SAME_RATIO / ranks:
        m = result.arm.micro_batch_size
        twice = (f" (with N = W = {n}, a loss divided by N twice gives the same 1/{n}: look "
                 f"for both)" if n == ranks else "")
        return Diagnosis(
            f"the accumulated gradient is {ratio:.4g}x the big batch's and points the same way "
            f"(cosine {cosine:.6g}): 1/W of it, W = {ranks} ranks, so each rank's loss is "
            f"divided by the global batch (m·N·W = {m * n * ranks} examples) while DDP's "
            f"all-reduce (FSDP's reduce-scatter) already averages over the W ranks{twice}. "
            f"Divide each rank's loss by its own examples in the window (m·N = {m * n}), or "
            f"multiply it by W = {ranks}.", certain=True)
    if cosine >= SAME_DIRECTION and abs(ratio - 1 / n) <= SAME_RATIO / n:
        return Diagnosis(
            f"the accumulated gradient is {ratio:.4g}x the big batch's and points the same way "
            f"(cosine {cosine:.6g}): 1/N of it, N = {n}, so the loss is divided by N twice. "
            f"{DIVIDED_ALREADY}.", certain=True)
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
        measured = (f"equal at step 1, different from step {step}: there |g| is {ratio:.4g}x "
                    f"the big batch's, cosine {cosine:.6g}, scale α = <g, g_big>/|g_big|² "
                    f"{first['scale']:.4g}")
        if cosine >= SAME_DIRECTION and ratio < 1:
            share = ratio * n
            return Diagnosis(
                f"{measured}: {share:.4g} of N = {n} micro-batches' worth, in the same "
                f"direction, as when a window holds fewer micro-batches than N and is still "
                f"divided by N (a short window where the data ends). A gradient held over from "
                f"an earlier step would make it larger, not smaller.", certain=False)
        if ratio > 1:
            return Diagnosis(
                f"{measured}: larger, as when .grad still holds an earlier step's gradient "
                f"(zero_grad() ran in both runs, so that is not shown here).", certain=False)
        return Diagnosis(f"{measured}; no pattern gradlab knows fits these numbers.",
                         certain=False)
    return Diagnosis(
        f"at step 1 the gradient already points elsewhere (cosine {cosine:.6g}, |g| "
        f"{ratio:.4g}x the big batch's, scale α = <g, g_big>/|g_big|² {first['scale']:.4g}), "
        f"and what gradlab counts rules out the causes it can "
        f"see: the loss is not scaled by a constant, no BatchNorm or dropout ran in training "
        f"mode, zero_grad() discarded nothing, clip_grad_norm_() ran as often as in the big "
        f"batch's run. A cause it cannot count gives this shape: a loss normalised per "
        f"micro-batch by a count that varies between micro-batches, like tokens in sequences "
        f"of unequal length (then the error vanishes when all have equal length) or an uneven "
        f"last micro-batch; normalising by the count of the whole window removes it.",
        certain=False)


def _ranks_apart(first: dict[str, Any], window: dict[str, Any], ranks: int) -> Diagnosis:
    """The ranks stepped on different gradients: data parallelism without the reduction."""
    step, syncs, backwards = first["step"], window["syncs"], window["backwards"]
    said = (f"the {ranks} ranks' optimizers received different gradients at step {step} (the "
            f"farthest rank's is {first['rank_grad_spread']:.3g} from rank 0's, rel err), so in "
            f"training their weights drift apart")
    if syncs == 0:
        return Diagnosis(
            f"{said}: none of the {backwards} backward() calls of rank 0's window reduced "
            f"gradients across the ranks (each ran under DDP's no_sync(), or with FSDP2's "
            f"set_requires_gradient_sync(False)). Run the window's last backward() outside "
            f"no_sync() (FSDP2: set_requires_gradient_sync(True) before it).", certain=True)
    return Diagnosis(
        f"{said}, although {syncs} of the {backwards} backward() calls of rank 0's window "
        f"reduced gradients across the ranks; no pattern gradlab knows fits (a parameter that "
        f"some ranks leave out of the reducing backward() keeps each rank's own gradient).",
        certain=False)


def _count(capture: dict[str, Any], key: str, between: bool = False) -> int:
    """How often something happened before the last optimizer step, or (between) from the
    first step to the last, which gives the rate per step (unless there is only one)."""
    windows = capture["steps"]
    return sum(w[key] for w in (windows[1:] if between and len(windows) > 1 else windows))


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
