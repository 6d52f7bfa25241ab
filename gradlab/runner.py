"""Trials: every arm from the same initial weights, on the same examples in the same order.

For each trial the baseline arm trains first and leaves its weights before every
step. Then each arm

* trains on its own for ``steps`` steps (the trajectory: where training ends up),
* and, every ``probe_every`` steps, computes its gradient at the *baseline's*
  weights on the baseline's batch (the probe: the gradient alone, nothing else
  differs),

and the numbers go to the run directory as each trial finishes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradlab import engine, probe, zoo
from gradlab.errors import GradlabError
from gradlab.spec import Arm, Settings, Trial
from gradlab.store import RunDir

DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "bfloat16": torch.bfloat16, "float16": torch.float16}

# the CSV files of a run directory, in the order they are written
TABLES = ("summary", "steps", "probe", "buffers", "eval", "trace", "weights", "checks")

# summary keys: the --json contract reads these names
SUMMARY_METRICS = ("max_rel_grad_err", "max_abs_grad_err", "min_grad_cosine", "final_loss",
                   "max_rel_loss_diff", "final_weight_dist", "final_test_loss",
                   "final_test_accuracy", "max_rel_buffer_diff")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GradlabError("device=cuda but this machine has no CUDA device (or this torch "
                           "build has no CUDA); use --set device=cpu or device=auto")
    return torch.device(name)


@dataclass
class Prepared:
    """An arm with its data and a freshly initialised model, ready to train."""
    arm: Arm
    data: zoo.Data
    model: nn.Module
    device: torch.device

    @property
    def s(self) -> Settings:
        return self.arm.settings


def call_factory(kind: str, name: str, *args) -> Any:
    """Call a built-in or user factory; a user's exception becomes a one-line input error."""
    factory = zoo.resolve(kind, name)
    try:
        return factory(*args)
    except GradlabError:
        raise
    except Exception as err:
        signature = "(settings)" if kind == "dataset" else "(settings, data)"
        raise GradlabError(f"{kind} '{name}' failed: {type(err).__name__}: {err}; a {kind} "
                           f"factory is called as factory{signature}") from None


def load_data(s: Settings, device: torch.device) -> zoo.Data:
    data = call_factory("dataset", s.dataset, s)
    if isinstance(data, tuple):  # a user's factory may return just (x, y)
        x, y = data
        data = zoo.Data(x, y, loss="cross_entropy" if not y.is_floating_point() else "mse")
    if not isinstance(data, zoo.Data):
        raise GradlabError(f"dataset '{s.dataset}' returned {type(data).__name__}; "
                           f"return gradlab.zoo.Data or a tuple (x, y)")
    dtype = DTYPES[s.dtype]

    def cast(t):
        if t is None:
            return None
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    return zoo.Data(cast(data.x_train), cast(data.y_train), cast(data.x_test),
                    cast(data.y_test), data.loss, data.shuffle)


def build_model(s: Settings, data: zoo.Data, device: torch.device) -> nn.Module:
    torch.manual_seed(s.seed)  # every arm of a trial starts from the same weights
    model = call_factory("model", s.model, s, data)
    if not isinstance(model, nn.Module):
        raise GradlabError(f"model '{s.model}' returned {type(model).__name__}, "
                           f"not a torch.nn.Module")
    return model.to(device, DTYPES[s.dtype])


def check_micro_batches(arm: Arm, model: nn.Module) -> None:
    """BatchNorm1d needs two values per channel; a micro-batch of one example has one."""
    s = arm.settings
    smallest = s.batch_size // s.accum_steps
    has_bn1d = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    if has_bn1d and smallest == 1 and s.bn_mode == "train":
        raise GradlabError(
            f"arm '{arm.name}': BatchNorm1d would see micro-batches of 1 example "
            f"(batch_size={s.batch_size}, accum_steps={s.accum_steps}), so one value per "
            f"channel and no batch statistics; use norm=gn or norm=ln, or a smaller accum_steps")


def prepare(arm: Arm, data_cache: dict) -> Prepared:
    s = arm.settings
    device = resolve_device(s.device)
    key = (s.dataset, s.dtype, str(device))
    if key not in data_cache:
        data_cache[key] = load_data(s, device)
    data = data_cache[key]
    model = build_model(s, data, device)
    check_micro_batches(arm, model)
    return Prepared(arm, data, model, device)


def preflight(trials: list[Trial]) -> None:
    """Build every arm once before anything is written, so bad input fails fast and clean."""
    cache: dict = {}
    for trial in trials:
        for arm in trial.arms:
            prepared = prepare(arm, cache)
            if len(prepared.data.x_train) < arm.settings.batch_size:
                raise GradlabError(
                    f"arm '{arm.name}': batch_size={arm.settings.batch_size} but dataset "
                    f"'{arm.settings.dataset}' has {len(prepared.data.x_train)} training "
                    f"examples; use a smaller batch_size")
            try_forward(prepared)


def try_forward(p: Prepared) -> None:
    """One forward and loss on the smallest micro-batch, to catch shape and dtype mismatches."""
    s = p.s
    x, y = engine.split(p.data.x_train[:s.batch_size], p.data.y_train[:s.batch_size],
                        s.accum_steps)[-1]
    engine.set_train_mode(p.model, s)
    try:
        with torch.no_grad():
            engine.mean_loss(p.model, x, y, p.data.loss)
    except (RuntimeError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GradlabError(f"arm '{p.arm.name}': model '{s.model}' on dataset '{s.dataset}' "
                           f"(micro-batch of {len(x)}, {s.dtype}) failed: {first}") from None


def batches(data: zoo.Data, s: Settings) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The seeded stream of examples, B at a time; every arm of a trial reads the same one."""
    n = len(data.x_train)
    g = torch.Generator().manual_seed(s.seed)
    order = torch.empty(0, dtype=torch.long)
    while True:
        while len(order) < s.batch_size:  # epochs are concatenated, reshuffled each time
            epoch = torch.randperm(n, generator=g) if data.shuffle else torch.arange(n)
            order = torch.cat([order, epoch])
        idx, order = order[:s.batch_size].to(data.x_train.device), order[s.batch_size:]
        yield data.x_train[idx], data.y_train[idx]


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def evaluate(model: nn.Module, data: zoo.Data) -> dict[str, float]:
    if data.x_test is None:
        return {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(data.x_test)
        loss = engine.loss_of(out, data.y_test, data.loss).item()
    model.train(was_training)
    accuracy = (float((out.argmax(1) == data.y_test).double().mean())
                if data.loss == "cross_entropy" else math.nan)
    return {"test_loss": loss, "test_accuracy": accuracy}


@dataclass
class BaselineRecord:
    """What the baseline leaves for the other arms: its weights along the way."""
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)  # before each step
    params_after: dict[int, torch.Tensor] = field(default_factory=dict)  # examples -> params
    loss_at: dict[int, float] = field(default_factory=dict)  # examples -> step loss
    grads: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> gradient
    # step -> running statistics after the baseline's probe forward (BatchNorm only)
    buffers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class TrialResult:
    summary: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    probe: list[dict[str, Any]] = field(default_factory=list)
    buffers: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    trace: list[dict[str, Any]] = field(default_factory=list)
    weights: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)


def run_trial(trial: Trial, data_cache: dict, advance: Callable[[int], None]) -> TrialResult:
    result = TrialResult()
    base = prepare(trial.baseline, data_cache)
    record = BaselineRecord()
    ordered = [base] + [prepare(a, data_cache) for a in trial.arms if not a.baseline]
    for prepared in ordered:
        rows = train_arm(trial, prepared, base, record, result)
        result.summary.append(summarise(trial, prepared, rows))
        advance(prepared.s.steps)
    return result


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def train_arm(trial: Trial, p: Prepared, base: Prepared, record: BaselineRecord,
              result: TrialResult) -> dict[str, list]:
    s, is_base = p.s, p.arm.baseline
    ids = {"trial": trial.index, "arm": p.arm.name}
    comparable = same_architecture(p.model, base.model)
    probe_model = build_model(s, p.data, p.device) if comparable and not is_base else None
    optimizer = engine.make_optimizer(p.model, s)
    collected: dict[str, list] = {"probe": [], "buffers": [], "steps": [], "eval": []}
    stream = batches(p.data, s)
    examples = 0
    held = HeldGradientCheck(p) if s.zero_grad == "never" else None
    if s.trace:
        result.weights += _weights(ids, 0, p.model)
    for step in range(1, s.steps + 1):
        x, y = next(stream)
        if is_base:
            record.states.append({k: v.clone() for k, v in p.model.state_dict().items()})
        elif probe_model is not None and _probe_due(s, step) and step <= len(record.states) \
                and s.batch_size == base.s.batch_size:
            rows = probe_step(probe_model, s, base, record, step, x, y)
            collected["probe"] += [{**ids, "step": step, **r} for r in rows]
            rows = probe_buffers(probe_model, p.data, record.buffers[step])
            collected["buffers"] += [{**ids, "step": step, **r} for r in rows]

        trace = _trace_hook(ids, step, result.trace) if s.trace else None
        if held is not None:
            held.add_fresh(p.model, x, y)
        stats = engine.train_step(p.model, optimizer, x, y, s, p.data.loss, trace)
        if held is not None:
            held.compare(p.model)
        examples += s.batch_size
        if s.trace:
            result.weights += _weights(ids, step, p.model)

        params = flat_params(p.model)
        if is_base:
            record.params_after[examples] = params
            record.loss_at[examples] = stats.loss
        ref = record.params_after.get(examples) if comparable else None
        ref_loss = record.loss_at.get(examples, math.nan)
        collected["steps"].append({
            **ids, "step": step, "examples": examples, "loss": stats.loss,
            "grad_norm": stats.grad_norm, "update_norm": stats.update_norm,
            "weight_dist": (params - ref).norm().item() if ref is not None else math.nan,
            "rel_loss_diff": abs(stats.loss - ref_loss) / abs(ref_loss) if ref_loss else math.nan,
        })
        if (s.eval_every and step % s.eval_every == 0) or step == s.steps:
            metrics = evaluate(p.model, p.data)
            if metrics:
                collected["eval"].append({**ids, "step": step, "examples": examples, **metrics})

    result.probe += collected["probe"]
    result.buffers += collected["buffers"]
    result.steps += collected["steps"]
    result.eval += collected["eval"]
    if held is not None:
        result.checks.append(held.row(ids))
    return collected


def _probe_due(s: Settings, step: int) -> bool:
    return step == 1 or (s.probe_every > 0 and (step - 1) % s.probe_every == 0)


def gradient_at(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor, s: Settings, loss_kind: str) -> dict[str, torch.Tensor]:
    """The gradient an arm's policy produces for one batch at the given weights."""
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    engine.accumulate(model, x, y, s, loss_kind)
    return probe.grads_of(model)


def probe_step(probe_model: nn.Module, s: Settings, base: Prepared, record: BaselineRecord,
               step: int, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    """Arm's gradient vs the baseline's, both at the baseline's weights before ``step``."""
    state = record.states[step - 1]
    if step not in record.grads:  # the baseline has finished training, so its model is free
        record.grads[step] = gradient_at(base.model, state, x, y, base.s, base.data.loss)
        record.buffers[step] = running_stats(base.model)
    arm = gradient_at(probe_model, state, x, y, s, base.data.loss)
    return probe.compare_grads(arm, record.grads[step])


class HeldGradientCheck:
    """Under zero_grad='never', the .grad held after step t must be the sum of the fresh
    gradients of steps 1..t, each taken at the weights of its own step.

    A fresh gradient is what the ordinary loop would compute at those weights: the
    same settings with zero_grad='every-n', on a scratch model, before the step.
    """

    name = "held grad = sum of fresh grads"

    def __init__(self, p: Prepared):
        self.scratch = build_model(p.s, p.data, p.device)
        self.settings = dataclasses.replace(p.s, zero_grad="every-n")
        self.loss_kind = p.data.loss
        self.total: dict[str, torch.Tensor] | None = None  # float64 sum of fresh gradients
        self.worst = 0.0  # largest relative error over the steps so far

    def add_fresh(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        fresh = gradient_at(self.scratch, model.state_dict(), x, y, self.settings,
                            self.loss_kind)
        self.total = fresh if self.total is None else {
            name: self.total[name] + fresh[name] for name in fresh}

    def compare(self, model: nn.Module) -> None:
        overall = probe.compare_grads(probe.grads_of(model), self.total)[-1]
        self.worst = max(self.worst, overall["rel_l2_err"])

    def row(self, ids: dict) -> dict[str, Any]:
        # the sum of steps*N terms rounds like one accumulation of that many terms
        s = self.settings
        tolerance = probe.rel_tolerance(s.dtype, s.steps * s.accum_steps)
        return {**ids, "check": self.name, "value": self.worst, "tolerance": tolerance,
                "passed": self.worst <= tolerance}


def running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm running means and variances (num_batches_tracked is a counter, not a statistic)."""
    return {name: b.detach().clone() for name, b in model.named_buffers()
            if name.endswith(("running_mean", "running_var"))}


def probe_buffers(probe_model: nn.Module, data: zoo.Data,
                  ref: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Running statistics an arm's probe pass left, vs the baseline's, and what they do to eval.

    Called right after ``probe_step``: both passes started from the baseline's weights
    and statistics, the baseline's forward updated them once, the arm's N times.
    The '*' row also evaluates the baseline's weights with the arm's statistics and
    with the baseline's, so the accuracy change is due to the statistics alone.
    """
    if not ref:
        return []
    rows = [{"buffer": r.pop("param"), **r}
            for r in probe.compare_grads(running_stats(probe_model), ref)]
    with_arm = evaluate(probe_model, data)
    probe_model.load_state_dict(ref, strict=False)
    with_ref = evaluate(probe_model, data)
    if with_arm:
        rows[-1].update(test_accuracy=with_arm["test_accuracy"],
                        ref_test_accuracy=with_ref["test_accuracy"])
    return rows


def _trace_hook(ids: dict, step: int, sink: list) -> engine.TraceHook:
    def record(micro_batch: int, model: nn.Module) -> None:
        sink.extend({**ids, "step": step, "micro_batch": micro_batch + 1, "param": name,
                     "element": i, "grad": value}
                    for name, i, value in _elements(model, lambda p: p.grad))
    return record


def _weights(ids: dict, step: int, model: nn.Module) -> list[dict[str, Any]]:
    """Every parameter element after ``step`` (0: the initial weights), for traced runs."""
    return [{**ids, "step": step, "param": name, "element": i, "value": value}
            for name, i, value in _elements(model, lambda p: p)]


def _elements(model: nn.Module, tensor_of) -> Iterator[tuple[str, int, float]]:
    """(parameter name, element index, value) of ``tensor_of(param)`` (None reads as zeros)."""
    for name, p in model.named_parameters():
        tensor = tensor_of(p)
        values = (tensor.detach().double().flatten().tolist() if tensor is not None
                  else [0.0] * p.numel())
        yield from ((name, i, v) for i, v in enumerate(values))


def summarise(trial: Trial, p: Prepared, rows: dict[str, list]) -> dict[str, Any]:
    s = p.s
    overall = [r for r in rows["probe"] if r["param"] == "*"]
    steps, evals = rows["steps"], rows["eval"]
    tolerance = probe.rel_tolerance(s.dtype, s.accum_steps)
    out: dict[str, Any] = {
        "trial": trial.index, "arm": p.arm.name, "baseline": p.arm.baseline,
        **{key: getattr(s, key) for key in trial.swept},  # the arm's own value of each
        "batch_size": s.batch_size, "accum_steps": s.accum_steps, "micro_batch": s.micro_batch,
        "dtype": s.dtype,
        "max_rel_grad_err": max((r["rel_l2_err"] for r in overall), default=math.nan),
        "max_abs_grad_err": max((r["max_abs_err"] for r in overall), default=math.nan),
        "min_grad_cosine": min((r["cosine"] for r in overall), default=math.nan),
        "final_loss": steps[-1]["loss"],
        "max_rel_loss_diff": max((r["rel_loss_diff"] for r in steps), default=math.nan),
        "final_weight_dist": steps[-1]["weight_dist"],
        "final_test_loss": evals[-1]["test_loss"] if evals else math.nan,
        "final_test_accuracy": evals[-1]["test_accuracy"] if evals else math.nan,
        "max_rel_buffer_diff": max((r["rel_l2_err"] for r in rows["buffers"] if r["buffer"] == "*"),
                                   default=math.nan),
        "rel_tolerance": math.nan if p.arm.baseline else tolerance,
        "expect": p.arm.expect or "",
    }
    out["verdict"] = probe.verdict(p.arm.baseline, out["max_rel_grad_err"], tolerance)
    return out


def run_trials(trials: list[Trial], run_dir: RunDir,
               advance: Callable[[int], None] = lambda n: None) -> list[TrialResult]:
    """Run every trial, appending its rows to the run directory as soon as it is done."""
    cache: dict = {}
    results = []
    for trial in trials:
        result = run_trial(trial, cache, advance)
        for table in TABLES:
            run_dir.append(table, getattr(result, table))
        results.append(result)
    return results
