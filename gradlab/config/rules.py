"""The rules that need more than one setting: every cross-setting check, in one place.

Each value alone was checked by gradlab.config.settings.coerce when it was read; these run
once per arm of every trial (gradlab.config.spec.expand), and each error names where each
value came from (the spec's [settings], a sweep axis, an arm, a --set) and how to fix it.
"""

from __future__ import annotations

from gradlab.config.settings import (
    Accumulation,
    Autocast,
    Backend,
    ClipAt,
    Device,
    DropoutMode,
    Dtype,
    GradAccumDtype,
    GradScaling,
    LossScale,
    Parallel,
    Scheduler,
    Settings,
    Sync,
    ZeroGrad,
)
from gradlab.errors import GradlabError

# the built-in models that put a dropout layer after each hidden activation when dropout > 0
DROPOUT_MODELS = ("mlp", "cnn")


def validate(s: Settings, where: str, origin=lambda key: "") -> None:
    """Checks that need more than one setting (each value alone was checked by coerce).

    ``origin(key)`` says where the arm's value of a key came from, for the message.
    """
    def shown(key: str) -> str:
        came_from = origin(key)
        return f"{key}={getattr(s, key)}" + (f" ({came_from})" if came_from else "")

    if s.accum_steps > s.batch_size:
        raise GradlabError(f"{where}: {shown('accum_steps')} is larger than "
                           f"{shown('batch_size')}, so a micro-batch would be empty; use "
                           f"accum_steps <= batch_size")
    if s.temperature <= 0:
        raise GradlabError(f"{where}: {shown('temperature')}; the temperature divides the "
                           f"similarities, so it must be positive (e.g. temperature=0.1)")
    if s.accumulation == Accumulation.GRADCACHE and s.loss_scale != LossScale.BY_SIZE:
        raise GradlabError(f"{where}: {shown('accumulation')} computes one loss over the whole "
                           f"window, so {shown('loss_scale')} has no micro-batch losses to "
                           f"combine; use loss_scale=by-size with gradcache")
    if s.accum_steps * s.world_size > s.batch_size:
        raise GradlabError(f"{where}: {shown('world_size')} ranks x {shown('accum_steps')} "
                           f"micro-batches is more than {shown('batch_size')} examples, so a "
                           f"rank's micro-batch would be empty; use world_size x accum_steps "
                           f"<= batch_size")
    validate_sharding(s, where, shown)
    if s.world_size > 1 and s.backend == Backend.NCCL and s.device == Device.CPU:
        raise GradlabError(f"{where}: {shown('backend')} all-reduces CUDA tensors only, and "
                           f"{shown('device')}; use backend=gloo (or auto), or device=cuda")
    if s.budget_mb > 0 and not s.cost:
        raise GradlabError(f"{where}: {shown('budget_mb')} needs cost=true, which measures "
                           f"the memory it is compared with; run the cost experiment "
                           f"(gradlab run cost --set budget_mb=...) or add --set cost=true")
    if s.min_len > s.max_len:
        raise GradlabError(f"{where}: {shown('min_len')} is larger than {shown('max_len')}; "
                           f"use min_len <= max_len")
    if s.clip_norm == 0 and origin("clip_at") not in ("", "the default"):
        raise GradlabError(f"{where}: {shown('clip_at')} asks for clipping but "
                           f"{shown('clip_norm')} turns it off; give clip_norm > 0, the "
                           f"largest gradient norm")
    if s.dropout > 0 and (s.setup or s.model not in DROPOUT_MODELS):
        raise GradlabError(f"{where}: {shown('dropout')} but only the built-in "
                           f"{' and '.join(DROPOUT_MODELS)} have a dropout layer; use one of "
                           f"them, or put dropout in your own model and leave dropout=0")
    if s.mask_draws == 1:
        raise GradlabError(f"{where}: {shown('mask_draws')}; a mean and its standard error "
                           f"need at least 2 draws (0: no check)")
    if s.mask_draws and (s.dropout == 0 or s.dropout_mode != DropoutMode.TRAIN):
        off = shown("dropout") if s.dropout == 0 else shown("dropout_mode")
        raise GradlabError(f"{where}: {shown('mask_draws')} averages over dropout masks, but "
                           f"with {off} there are none; set dropout > 0 and "
                           f"dropout_mode=train, or mask_draws=0")
    if s.scheduler == Scheduler.NONE and (s.warmup_steps or origin("scheduler_step")
                                          not in ("", "the default")):
        asked = shown("warmup_steps") if s.warmup_steps else shown("scheduler_step")
        raise GradlabError(f"{where}: {asked} needs a schedule, but {shown('scheduler')}; "
                           f"set scheduler=warmup-cosine")
    if s.scheduler == Scheduler.WARMUP_COSINE and s.warmup_steps >= s.steps:
        raise GradlabError(f"{where}: {shown('warmup_steps')} leaves none of the "
                           f"{shown('steps')} for the cosine; use warmup_steps < steps")
    validate_precision(s, where, shown)


def validate_sharding(s: Settings, where: str, shown) -> None:
    """What FSDP2 (parallel=fsdp) can do: its optimizer steps on gradient shards, which exist
    only after a reduce-scatter, and the gradient of the micro-batches before it lives in the
    unsharded parameters, out of .grad's reach."""
    if s.world_size == 1:
        return  # one process: nothing is reduced, nothing sharded
    if s.sync == Sync.OVERWRITING and s.parallel != Parallel.FSDP:
        raise GradlabError(f"{where}: {shown('sync')} replaces a gradient shard, and "
                           f"{shown('parallel')} keeps no shards; use parallel=fsdp, or "
                           f"sync=every-micro-batch")
    if s.parallel != Parallel.FSDP:
        return
    if s.sync == Sync.NEVER:
        raise GradlabError(f"{where}: {shown('sync')} with {shown('parallel')}: FSDP's optimizer "
                           f"steps on the gradient shards a reduce-scatter makes, so a window "
                           f"that never reduces leaves nothing to step on; use sync=no-sync, "
                           f"every-micro-batch or every-micro-batch-overwriting")
    if s.zero_grad in (ZeroGrad.EVERY_STEP, ZeroGrad.AFTER_BACKWARD) \
            or s.clip_at == ClipAt.PER_MICRO_BATCH:
        asked = shown("clip_at") if s.clip_at == ClipAt.PER_MICRO_BATCH else shown("zero_grad")
        raise GradlabError(f"{where}: {asked} with {shown('parallel')}: inside a window FSDP "
                           f"holds the gradient in its unsharded parameters, not in .grad, so "
                           f"nothing there can clear or clip it; use parallel=ddp to measure "
                           f"that, or zero_grad=every-n and clip_at=after-accumulation")
    if s.grad_scaler == GradScaling.ON:
        raise GradlabError(f"{where}: {shown('grad_scaler')} with {shown('parallel')}: "
                           f"gradlab's GradScaler path unscales whole gradients, not FSDP's "
                           f"shards; use grad_scaler=off (bfloat16 autocast needs none), or "
                           f"parallel=ddp")


def validate_precision(s: Settings, where: str, shown) -> None:
    """autocast, grad_scaler, grad_accum_dtype and clip_at: the combinations that mean
    something (what torch itself supports on the device is checked when the model is built)."""
    if s.autocast != Autocast.NONE and s.dtype != Dtype.FLOAT32:
        raise GradlabError(f"{where}: {shown('autocast')} with {shown('dtype')}: autocast "
                           f"computes in {s.autocast} from float32 parameters; set dtype=float32, "
                           f"or autocast=none to compute in {s.dtype} itself")
    if s.grad_scaler == GradScaling.ON and s.autocast != Autocast.FLOAT16:
        raise GradlabError(f"{where}: {shown('grad_scaler')} with {shown('autocast')} and "
                           f"{shown('dtype')}: a GradScaler keeps float16 gradients from "
                           f"underflowing and unscales float32 ones, so it needs dtype=float32 "
                           f"with autocast=float16 (bfloat16 and float32 have float32's range: "
                           f"use grad_scaler=off)")
    if s.grad_scaler == GradScaling.ON and s.zero_grad == ZeroGrad.NEVER:
        raise GradlabError(f"{where}: {shown('grad_scaler')} with {shown('zero_grad')}: the "
                           f"scaler unscales all of .grad once per window, so .grad must start "
                           f"each window empty; use zero_grad=every-n")
    if s.grad_accum_dtype == GradAccumDtype.FLOAT32 and s.dtype == Dtype.FLOAT64:
        raise GradlabError(f"{where}: {shown('grad_accum_dtype')} with {shown('dtype')} would "
                           f"round float64 gradients to float32; use grad_accum_dtype=param")
    if s.world_size > 1 and s.grad_accum_dtype == GradAccumDtype.FLOAT32:
        raise GradlabError(f"{where}: {shown('world_size')} with {shown('grad_accum_dtype')}: "
                           f"DDP all-reduces what .grad holds at the last backward, not a "
                           f"buffer beside it; use grad_accum_dtype=param")
    if s.clip_at == ClipAt.PER_MICRO_BATCH and (s.grad_scaler == GradScaling.ON or
                                                s.grad_accum_dtype == GradAccumDtype.FLOAT32):
        other = shown("grad_scaler") if s.grad_scaler == GradScaling.ON \
            else shown("grad_accum_dtype")
        raise GradlabError(f"{where}: {shown('clip_at')} with {other}: clipping each partial "
                           f"sum is measured with the gradient summed in .grad, unscaled; use "
                           f"grad_scaler=off and grad_accum_dtype=param, or "
                           f"clip_at=after-accumulation")
    if s.clip_at == ClipAt.BEFORE_UNSCALE and s.grad_scaler == GradScaling.OFF:
        raise GradlabError(f"{where}: {shown('clip_at')} with {shown('grad_scaler')}: there "
                           f"is no unscale_ to clip before; use grad_scaler=on, or "
                           f"clip_at=after-accumulation")
