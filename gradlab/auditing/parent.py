"""gradlab audit: the user's own, unchanged training loop against its big-batch twin.

The user's entrypoint ``train(micro_batch_size, accum_steps, max_steps)`` seeds itself,
builds its model, optimizer and data, and makes ``max_steps`` optimizer steps. gradlab
calls it twice, each time in a fresh process:

    accumulated   train(m, N, K)      N micro-batches of m per optimizer step
    big-batch     train(m*N, 1, K)    one batch of m*N per step (the baseline)

Every optimizer in torch ends in ``torch.optim.Optimizer.step()``, and torch offers a
global hook there, so each process records, at every step, the gradient the optimizer
receives and each parameter group's learning rate, without a line of the user's code
changed (plain PyTorch, Accelerate, Lightning and the Hugging Face Trainer alike). It
also counts what happened since the previous step: backward() calls (and the sum of
the scalars they ran on: the loss the step's gradient is the gradient of), zero_grad()
calls and the backward() results they discarded, and scheduler steps. The parent
compares the two records step by step with the verdict rule every gradlab verdict
uses, and names the mistake when the pattern is a known one.

The module has two halves. The worker (``python -m gradlab.auditing.parent``) imports only the
standard library and torch, so a process starts as fast as the user's own script;
the parent (``audit``) validates, runs the workers, compares, diagnoses and writes the
run directory.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from gradlab.errors import GradlabError
from gradlab.record import schema

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

# ============================================================================ worker

def locate_entrypoint(text: str) -> tuple[str, str]:
    """(module, function) of 'pkg.module:function', checked without running the module."""
    module_name, sep, attr = text.partition(":")
    if not sep or not module_name or not attr:
        raise GradlabError(f"entrypoint '{text}': give it as pkg.module:function, e.g. "
                           f"experiments.tutorial_loop:train")
    if os.getcwd() not in sys.path:  # `gradlab audit mymodule:train` from the project folder
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):  # its parent package is missing or broken
        found = False
    if not found:
        raise GradlabError(f"entrypoint '{text}': no module named '{module_name}'; run from "
                           f"the folder that holds it, or put it on PYTHONPATH")
    return module_name, attr


def resolve_entrypoint(text: str):
    """The user's train function from 'pkg.module:function', checked against the contract."""
    module_name, attr = locate_entrypoint(text)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module top level raised
        raise GradlabError(f"entrypoint '{text}': importing {module_name} raised "
                           f"{type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items()
                       if inspect.isfunction(v) and v.__module__ == module.__name__)
        what = "is not a function" if hasattr(module, attr) else "does not exist"
        raise GradlabError(f"entrypoint '{text}': {module_name}.{attr} {what}; functions in "
                           f"{module_name}: {', '.join(found) or 'none'}")
    try:
        signature = inspect.signature(fn)
    except ValueError:  # a builtin without a signature: let the call decide
        return fn
    try:
        signature.bind(micro_batch_size=1, accum_steps=1, max_steps=1)
    except TypeError:
        raise GradlabError(f"entrypoint '{text}' is {attr}({', '.join(signature.parameters)}); "
                           f"it must accept train(micro_batch_size: int, accum_steps: int, "
                           f"max_steps: int)") from None
    return fn


@dataclass
class Window:
    """What happened between two optimizer steps."""
    backwards: int = 0
    discarded: int = 0        # backward() results a zero_grad() cleared before any step
    zero_grads: int = 0
    scheduler_steps: int = 0
    pending: int = 0          # backward() calls since .grad was last cleared or stepped on
    losses: list = field(default_factory=list)  # the scalars backward() ran on, detached
    loss_known: bool = True

    def counts(self) -> dict[str, Any]:
        # read only now, at the step, which waits for the device anyway (grads are copied)
        loss = math.fsum(float(t) for t in self.losses) if self.loss_known and self.backwards \
            else math.nan
        return {"backwards": self.backwards, "discarded": self.discarded,
                "zero_grads": self.zero_grads, "scheduler_steps": self.scheduler_steps,
                "loss": loss}


class Recorder:
    """The hooks of one worker: what each optimizer step receives, and what led to it."""

    def __init__(self, max_steps: int, copy_limit: int, lead: Path | None = None,
                 follow: Path | None = None):
        self.max_steps, self.copy_limit = max_steps, copy_limit
        # the big-batch run leads: it leaves its weights after every step in `lead`; the
        # accumulated run follows: after each of its steps it takes those weights, so
        # every step's gradient of both runs is taken at the same weights
        self.lead, self.follow = lead, follow
        self.forced = 0  # steps after which the weights were set to the leader's
        self._layout: dict[str, Any] | None = None  # names and dtype of the weights passed
        self.steps: list[dict[str, Any]] = []
        self.window = Window()
        self.seen: dict[int, nn.Module] = {}  # modules run before the first step
        self.names: dict[int, str] = {}       # id(parameter) -> name in its model
        self.layers: dict[str, list[str]] = {"batchnorm": [], "dropout": []}
        self.sketch: bool | None = None
        self.device = "cpu"
        self._undo: list = []

    # -- installing
    def install(self) -> None:
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.lr_scheduler import LRScheduler
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        self._undo.append(register_optimizer_step_pre_hook(self.on_step).remove)
        if self.lead or self.follow:
            self._undo.append(register_optimizer_step_post_hook(self.after_step).remove)
        # names the parameters at the first step, then goes: a forward hook costs per call
        self._forward_hook = register_module_forward_pre_hook(self.on_forward)
        self._undo.append(self._forward_hook.remove)
        # torch has no global hook for these; wrapping the methods changes nothing they do
        self._wrap(torch.Tensor, "backward", self.on_backward)
        self._wrap(torch.optim.Optimizer, "zero_grad", self.on_zero_grad)
        self._wrap(nn.Module, "zero_grad", self.on_zero_grad)
        self._wrap(LRScheduler, "step", self.on_scheduler_step)

    def _wrap(self, owner: type, name: str, before) -> None:
        original = owner.__dict__[name]

        @functools.wraps(original)
        def wrapped(obj, *args, **kwargs):
            before(obj)
            return original(obj, *args, **kwargs)

        setattr(owner, name, wrapped)
        self._undo.append(lambda: setattr(owner, name, original))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    # -- the hooks
    def on_forward(self, module: nn.Module, args) -> None:
        self.seen.setdefault(id(module), module)

    def on_backward(self, tensor: torch.Tensor) -> None:
        w = self.window
        w.backwards += 1
        w.pending += 1
        if tensor.numel() == 1:
            w.losses.append(tensor.detach())
        else:
            w.loss_known = False

    def on_zero_grad(self, owner) -> None:
        w = self.window
        w.zero_grads += 1
        w.discarded += w.pending
        w.pending = 0

    def on_scheduler_step(self, scheduler) -> None:
        if getattr(scheduler, "_step_count", None) != 0:  # 0: the step its __init__ makes
            self.window.scheduler_steps += 1

    def on_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if not self.steps:
            self._first_step()
        params = [(g, i, p) for g, group in enumerate(optimizer.param_groups)
                  for i, p in enumerate(group["params"])]
        if self.sketch is None:
            total = sum(p.numel() for _, _, p in params)
            self.sketch = total * self.max_steps > self.copy_limit
            self.device = str(params[0][2].device) if params else "cpu"
        names = [self.names.get(id(p), f"param_groups.{g}.params.{i}") for g, i, p in params]
        record: dict[str, Any] = {
            "names": names,
            "shapes": [tuple(p.shape) for _, _, p in params],
            "dtypes": [str(p.grad.dtype if p.grad is not None else p.dtype).removeprefix("torch.")
                       for _, _, p in params],
            "lrs": [float(group["lr"]) for group in optimizer.param_groups],
            "settings": [_settings(group) for group in optimizer.param_groups],
            **self.window.counts(),
        }
        grads = [p.grad for _, _, p in params]
        if self.sketch:
            record["norms"] = [_norm(g) for g in grads]
            record["projections"] = [_project(name, g) for name, g in zip(names, grads,
                                                                          strict=True)]
        else:
            # one flat tensor per step (torch.cat promotes mixed float dtypes losslessly):
            # one copy to the host, and one tensor to save instead of one per parameter
            record["grad"] = torch.cat([
                (g.detach() if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, (_, _, p) in zip(grads, params, strict=True)]).to("cpu", copy=True)
        self.steps.append(record)
        self.window = Window()

    def after_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if self.sketch:  # too large to pass along every step: each run keeps its own
            return
        step, names = len(self.steps), self.steps[-1]["names"]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.lead:
            weights = torch.cat([p.detach().reshape(-1) for p in params]).cpu()
            layout = {"names": names, "dtype": str(weights.dtype).removeprefix("torch.")}
            if layout != self._layout:  # written once, not every step
                _write_whole(self.lead / f"{step}.layout.json",
                             json.dumps(layout).encode())
                self._layout = layout
            # raw bytes: a step's weights cost a write and a read, not a pickle
            _write_whole(self.lead / f"{step}.weights", weights.view(torch.uint8).numpy())
            return
        if self.follow is None:
            return
        path = self.follow / f"{step}.weights"
        while not path.exists() and not (self.follow / "done").exists():
            time.sleep(0.0005)
        changed = self.follow / f"{step}.layout.json"
        if changed.exists():
            self._layout = json.loads(changed.read_text())
        if not path.exists() or self._layout is None or self._layout["names"] != names:
            self.follow = None  # the leader stopped, or trains another model: the parent
            return              # says which, by step count, name and shape
        raw = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        path.unlink()
        weights = raw.view(getattr(torch, self._layout["dtype"]))
        sizes = [p.numel() for p in params]
        if weights.numel() != sum(sizes):
            self.follow = None
            return
        with torch.no_grad():
            for p, value in zip(params, weights.split(sizes), strict=True):
                p.copy_(value.view_as(p))
        self.forced += 1

    def _first_step(self) -> None:
        """Name the parameters after the models that ran; then stop watching forwards."""
        modules = list(self.seen.values())
        inside = {id(c) for m in modules for c in m.modules() if c is not m}
        roots = [m for m in modules if id(m) not in inside]
        holders = [r for r in roots if any(True for _ in r.parameters())]
        for j, root in enumerate(holders):
            prefix = f"{type(root).__name__}.{j}." if len(holders) > 1 else ""
            for name, p in root.named_parameters():
                self.names.setdefault(id(p), prefix + name)
            for name, m in root.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                    self.layers["batchnorm"].append(name)
                if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                    self.layers["dropout"].append(name)
        self._forward_hook.remove()
        self.seen.clear()

    def result(self) -> dict[str, Any]:
        return {"steps": self.steps, "after_last_step": self.window.counts(),
                "sketch": bool(self.sketch), "layers": self.layers, "device": self.device,
                "forced": self.forced}


def _write_whole(path: Path, data) -> None:
    """Write, then rename: a reader sees the whole file or none of it."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        f.write(data if isinstance(data, bytes) else data.tobytes())
    partial.replace(path)


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's optimizer settings (momentum, weight_decay, betas...) but lr."""
    def plain(value):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return value.item()
        if isinstance(value, tuple | list):
            return tuple(plain(v) for v in value)
        return value
    return {key: plain(value) for key, value in group.items() if key not in ("params", "lr")
            and isinstance(plain(value), bool | int | float | str | tuple | None)}


def _norm(grad: torch.Tensor | None) -> float:
    return 0.0 if grad is None else float(torch.linalg.vector_norm(grad.detach(),
                                                                   dtype=torch.float64))


def _project(name: str, grad: torch.Tensor | None) -> torch.Tensor:
    """grad . r_k for PROJECTIONS fixed random vectors r_k, in float64.

    r_k is drawn from a generator seeded by the parameter's name, so both runs project
    onto the same vectors; it is drawn again at every step instead of kept, which would
    cost PROJECTIONS times the model's memory.
    """
    if grad is None:
        return torch.zeros(PROJECTIONS, dtype=torch.float64)
    flat = grad.detach().reshape(-1)
    out = torch.zeros(PROJECTIONS, dtype=torch.float64, device=flat.device)
    for k in range(PROJECTIONS):
        generator = torch.Generator(device=flat.device)
        generator.manual_seed(zlib.crc32(f"{name}#{k}".encode()))
        for chunk in flat.split(CHUNK):
            r = torch.randn(chunk.numel(), generator=generator, device=flat.device)
            out[k] += torch.dot(r.double(), chunk.double())
    return out.cpu()


def _where(err: BaseException) -> str:
    """file:line of the innermost frame outside torch, where the user's code failed."""
    frames = traceback.extract_tb(err.__traceback__)
    torch_dir = str(Path(torch.__file__).parent)
    mine = [f for f in frames if not f.filename.startswith(torch_dir)
            and Path(f.filename) != Path(__file__)]
    frame = (mine or frames or [None])[-1]
    return f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""


def worker(entrypoint: str, micro_batch_size: int, accum_steps: int, max_steps: int,
           copy_limit: int, out: Path, lead: Path | None = None,
           follow: Path | None = None) -> None:
    """Run train() once under the hooks and torch.save what they saw (or why not) to out."""
    call = f"train({micro_batch_size}, {accum_steps}, {max_steps})"
    result: dict[str, Any] = {"error": None}
    try:
        fn = resolve_entrypoint(entrypoint)
        recorder = Recorder(max_steps, copy_limit, lead, follow)
        recorder.install()
        start = time.perf_counter()
        try:
            fn(micro_batch_size=micro_batch_size, accum_steps=accum_steps, max_steps=max_steps)
        finally:
            recorder.uninstall()
        result.update(recorder.result(), seconds=time.perf_counter() - start)
    except GradlabError as e:
        result["error"] = str(e)
    except Exception as e:  # the user's loop failed: say where, in one line
        message = str(e).strip().splitlines()
        result["error"] = (f"{call} raised {type(e).__name__}"
                           f"{': ' + message[0] if message else ''}{_where(e)}; fix the loop "
                           f"(run it alone to see the traceback) and audit again")
    torch.save(result, out)


# ============================================================================ parent

@dataclass(frozen=True)
class Arm:
    name: str
    micro_batch_size: int
    accum_steps: int

    @property
    def batch_size(self) -> int:
        return self.micro_batch_size * self.accum_steps

    def call(self, max_steps: int) -> str:
        return f"train({self.micro_batch_size}, {self.accum_steps}, {max_steps})"


@dataclass
class Audit:
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
    verdict: str = "equivalent"
    first_difference: dict[str, Any] | None = None
    diagnosis: str | None = None
    same_weights: bool = False          # the accumulated run followed the big batch's weights
    copy_limit: int = COPY_LIMIT
    rechecked: bool = False             # the big-batch call ran twice: the loop is deterministic
    seconds: dict[str, float] = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def failed(self) -> bool:
        return self.verdict != "equivalent"


def twins(micro_batch_size: int, accum_steps: int) -> tuple[Arm, Arm]:
    """The baseline (m*N x 1) and the accumulated arm (m x N)."""
    return (Arm("big-batch", micro_batch_size * accum_steps, 1),
            Arm("accumulated", micro_batch_size, accum_steps))


def verdict_of(dtype: str, accum_steps: int, rel_err: float) -> tuple[str, float]:
    """equivalent or differs, and the tolerance: the one verdict rule of gradlab (schema.py).

    A user's loop gives no float64 reference to measure the big batch's own rounding
    against, so the floor is 0 and the accumulated run is judged on its distance from
    its big-batch twin: (N - 1)·u + 32·u_acc.
    """
    tolerance, verdict = schema.judge(False, dtype, accum_steps,
                                      {"max_rel_grad_err": rel_err})
    return verdict, tolerance


def audit(entrypoint: str, micro_batch_size: int, accum_steps: int, max_steps: int,
          out: Path, *, copy_limit: int = COPY_LIMIT, parallel: bool = True,
          say=lambda message: None) -> Audit:
    """Run the two loops, compare them step by step, diagnose, and write the run directory."""
    for value, flag, least in ((accum_steps, "--accum-steps", 2),
                               (micro_batch_size, "--micro-batch-size", 1),
                               (max_steps, "--steps", 1), (copy_limit, "--copy-limit", 0)):
        if value < least:
            extra = " (N = 1 would compare the loop with itself)" if least == 2 else ""
            raise GradlabError(f"{flag} {value}: give an integer >= {least}{extra}")
    locate_entrypoint(entrypoint)  # imports nothing: the user's module may be slow to import
    base, arm = twins(micro_batch_size, accum_steps)

    start = time.perf_counter()
    say(f"running {arm.call(max_steps)} and {base.call(max_steps)}, each in its own process")
    # memory-backed where there is one: the weights pass through it at every step
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="gradlab-audit-", dir=shm) as tmp:
        runs = [(base, "big-batch", "lead"), (arm, "accumulated", "follow")]
        captured = run_loops(entrypoint, runs, max_steps, copy_limit, Path(tmp), parallel)
        result = examine(entrypoint, base, arm, max_steps, captured)
        result.copy_limit = copy_limit
        diagnosis = diagnose(result) if result.failed else None
        result.rechecked = bool(diagnosis and not diagnosis.certain)
        if result.rechecked:  # before blaming accumulation: does the loop repeat itself?
            say(f"they differ; running {base.call(max_steps)} again: is the loop deterministic?")
            again = run_loops(entrypoint, [(base, "again", "alone")], max_steps, copy_limit,
                              Path(tmp), parallel)
            check_deterministic(base, max_steps, captured["big-batch"], again["again"],
                                result.dtype)
    result.diagnosis = diagnosis.text if diagnosis else None
    result.seconds = {"audit": time.perf_counter() - start,
                      **{f"train {name}": c["seconds"] for name, c in captured.items()}}
    result.run_dir = write_run(result, out)
    return result


def run_loops(entrypoint: str, runs: list[tuple[Arm, str, str]], max_steps: int,
              copy_limit: int, tmp: Path, parallel: bool) -> dict[str, dict[str, Any]]:
    """Each (arm, label, role) in a fresh process; what its hooks saw, by label.

    role: 'lead' leaves its weights after every step in tmp/weights, 'follow' takes
    them after each of its own steps; the parent marks the leader done when it exits,
    so a follower never waits for a leader that failed or stopped early.
    """
    env = dict(os.environ)
    # the worker imports the user's module from where the parent could
    paths = [os.getcwd(), *(p for p in sys.path if p and Path(p).is_dir())]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
        [*paths, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]))
    shared = tmp / "weights"
    shared.mkdir(exist_ok=True)
    (shared / "done").unlink(missing_ok=True)
    started = []
    for arm, label, role in runs:
        out, log = tmp / f"{label}.pt", tmp / f"{label}.log"
        command = [sys.executable, "-m", "gradlab.auditing.parent", entrypoint,
                   str(arm.micro_batch_size), str(arm.accum_steps), str(max_steps),
                   str(copy_limit), str(out), role, str(shared)]
        with log.open("wb") as sink:  # the loop's own prints: shown only if it dies
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                       stdin=subprocess.DEVNULL)
        started.append((arm, label, role, process, out, log))
        if not parallel:
            process.wait()
            if role == "lead":
                (shared / "done").touch()
    while any(process.poll() is None for *_, process, _, _ in started):
        if all(process.poll() is not None for _, _, role, process, _, _ in started
               if role == "lead"):
            (shared / "done").touch()
        time.sleep(0.01)
    captured = {}
    for arm, label, _, process, out, log in started:
        if not out.is_file():
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise GradlabError(f"{arm.call(max_steps)} died without a result (exit code "
                               f"{process.returncode}: {tail[0]}); run it alone to see why")
        result = torch.load(out, weights_only=False)
        if result["error"]:
            raise GradlabError(result["error"])
        captured[label] = result
    return captured


def check_runs(captured: dict[str, dict], arms: dict[str, Arm], max_steps: int) -> None:
    """Both runs stepped, equally often, over parameters of the same names and shapes."""
    calls = {label: arms[label].call(max_steps) for label in arms}
    for label, c in captured.items():
        if not c["steps"]:
            raise GradlabError(f"{calls[label]} never called optimizer.step() (no torch.optim "
                               f"optimizer stepped); the audit compares what reaches step(), "
                               f"so train() must train with a torch.optim optimizer")
    counts = {label: len(c["steps"]) for label, c in captured.items()}
    if len(set(counts.values())) > 1:
        made = ", ".join(f"{calls[label]} made {n}" for label, n in counts.items())
        raise GradlabError(f"the two runs made different numbers of optimizer steps ({made}); "
                           f"train() must stop after max_steps = {max_steps} optimizer steps, "
                           f"counting optimizer.step() calls, not micro-batches")
    base, arm = captured["big-batch"], captured["accumulated"]
    for step, (b, a) in enumerate(zip(base["steps"], arm["steps"], strict=True), start=1):
        if b["names"] != a["names"]:
            only = sorted(set(b["names"]) ^ set(a["names"]))[:3] or b["names"][:3]
            raise GradlabError(f"at step {step} the two runs' optimizers hold different "
                               f"parameters (e.g. {', '.join(only)}); train() must build the "
                               f"same model and optimizer whatever the batch size")
        for name, sb, sa in zip(b["names"], b["shapes"], a["shapes"], strict=True):
            if sb != sa:
                raise GradlabError(f"parameter '{name}' has shape {list(sa)} in "
                                   f"{calls['accumulated']} but {list(sb)} in "
                                   f"{calls['big-batch']}; train() must build the same model "
                                   f"whatever the batch size")


def dtype_of(capture: dict[str, Any]) -> str:
    """The least precise dtype among the gradients: the one that sets the rounding floor."""

    dtypes = set(capture["steps"][0]["dtypes"])
    unknown = sorted(d for d in dtypes if d not in schema.UNIT_ROUNDOFF)
    if unknown:
        raise GradlabError(f"the gradients are {', '.join(unknown)}; gradlab judges "
                           f"{', '.join(schema.UNIT_ROUNDOFF)} gradients")
    return max(dtypes, key=schema.UNIT_ROUNDOFF.get)


def examine(entrypoint: str, base: Arm, arm: Arm, max_steps: int,
            captured: dict[str, dict]) -> Audit:
    """The two runs' records compared step by step (checked first: comparable at all?)."""
    check_runs(captured, {base.name: base, arm.name: arm}, max_steps)
    ref, own = captured["big-batch"], captured["accumulated"]
    dtype = dtype_of(ref)
    estimate = ref["sketch"] or own["sketch"]
    steps, params = [], []
    tables = gradient_tables(ref["steps"], own["steps"], estimate)
    for step, (b, a, rows) in enumerate(zip(ref["steps"], own["steps"], tables, strict=True),
                                        start=1):
        overall = rows[-1]
        verdict, tolerance = verdict_of(dtype, arm.accum_steps, overall["rel_l2_err"])
        lr_diff = max(abs(x - y) / abs(y) if y else abs(x - y)
                      for x, y in zip(a["lrs"], b["lrs"], strict=False))
        settings = settings_differences(b["settings"], a["settings"])
        if lr_diff > LR_RTOL or len(a["lrs"]) != len(b["lrs"]) or settings:
            verdict = "differs"
        steps.append({
            "trial": 0, "arm": arm.name, "step": step, "rel_grad_err": overall["rel_l2_err"],
            "max_abs_grad_err": overall["max_abs_err"], "cosine": overall["cosine"],
            "grad_norm_big_batch": overall["ref_norm"],
            "grad_norm_accumulated": overall["arm_norm"],
            "lr_big_batch": b["lrs"][0], "lr_accumulated": a["lrs"][0], "rel_lr_diff": lr_diff,
            "loss_big_batch": b["loss"], "loss_accumulated": a["loss"],
            "tolerance": tolerance, "verdict": verdict, "estimate": estimate,
            "settings_differ": "; ".join(settings)})
        params += [{"trial": 0, "arm": arm.name, "step": step, **r} for r in rows]
    result = Audit(entrypoint, base, arm, max_steps, dtype, estimate, steps, params, captured,
                   same_weights=own["forced"] == len(own["steps"]))
    differing = [s for s in steps if s["verdict"] != "equivalent"]
    if differing:
        result.verdict, result.first_difference = "differs", differing[0]
    return result


def settings_differences(ref: list[dict], own: list[dict]) -> list[str]:
    """The optimizer settings (but lr) in which the accumulated run differs, one per line.

    The accumulated run steps at the big batch's weights, so a setting that changes the
    update and not the gradient (weight decay or momentum scaled with N) shows only here.
    """
    def same(a, b) -> bool:
        if isinstance(a, tuple) and isinstance(b, tuple):
            return len(a) == len(b) and all(map(same, a, b))
        if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
            return abs(a - b) <= LR_RTOL * abs(b) if b else a == b
        return a == b
    out = []
    for g, (b, a) in enumerate(zip(ref, own, strict=False)):
        for key in sorted(set(a) | set(b)):
            if not same(a.get(key), b.get(key)):
                where = f"group {g} " if len(ref) > 1 else ""
                out.append(f"{where}{key} {a.get(key)!r} (big batch: {b.get(key)!r})")
    return out


def gradient_tables(ref: list[dict], own: list[dict],
                    estimate: bool) -> list[list[dict[str, Any]]]:
    """For each step, per parameter and then '*' for all together: probe.compare_tensors's
    metrics, computed for runs of steps with the same parameters at once (a long audit
    would otherwise spend milliseconds a step on tiny tensor operations), or estimated."""
    if estimate:
        return [estimated_rows(b, a) for b, a in zip(ref, own, strict=True)]
    tables: list[list[dict[str, Any]]] = []
    start = 0
    while start < len(ref):
        layout = (ref[start]["names"], ref[start]["shapes"])
        most = max(1, CHUNK // max(1, ref[start]["grad"].numel()))  # bounds the temporaries
        end = start + 1
        while end < len(ref) and end - start < most and \
                (ref[end]["names"], ref[end]["shapes"]) == layout:
            end += 1
        tables += batched_rows(torch.stack([s["grad"].double() for s in ref[start:end]]),
                               torch.stack([s["grad"].double() for s in own[start:end]]),
                               *layout)
        start = end
    return tables


def batched_rows(ref: torch.Tensor, arm: torch.Tensor, names: list[str],
                 shapes: list[tuple]) -> list[list[dict[str, Any]]]:
    """probe.compare for each row of (steps x elements) matrices, per parameter and '*'."""
    sizes = [math.prod(shape) for shape in shapes]
    bounds = [0, *itertools.accumulate(sizes)]
    columns = [*zip(names, bounds, bounds[1:], strict=False), ("*", 0, bounds[-1])]
    metrics = {}
    for name, lo, hi in columns:
        r, a = ref[:, lo:hi], arm[:, lo:hi]
        d = a - r
        diff, ref_norm, arm_norm = d.norm(dim=1), r.norm(dim=1), a.norm(dim=1)
        rel = torch.where(ref_norm > 0, diff / ref_norm,
                          torch.where(diff == 0, 0.0, math.inf))
        both = (ref_norm > 0) & (arm_norm > 0)
        # a zero gradient has no direction: the same only if both are zero (as probe.py)
        cosine = torch.where(both, (a * r).sum(dim=1) / (arm_norm * ref_norm),
                             torch.where(arm_norm == ref_norm, 1.0, math.nan))
        max_abs = d.abs().amax(dim=1) if hi > lo else torch.zeros(len(d), dtype=d.dtype)
        metrics[name] = zip(max_abs.tolist(), rel.tolist(), cosine.tolist(),
                            ref_norm.tolist(), arm_norm.tolist(), strict=True)
    keys = ("max_abs_err", "rel_l2_err", "cosine", "ref_norm", "arm_norm")
    by_step = zip(*(metrics[name] for name, _, _ in columns), strict=True)
    return [[{"param": name, **dict(zip(keys, values, strict=True))}
             for (name, _, _), values in zip(columns, step, strict=True)] for step in by_step]


def estimated_rows(ref: dict, own: dict) -> list[dict[str, Any]]:
    """Per parameter and '*', from the norms and projections of the two gradients."""
    rows = []
    for name, nb, na, pb, pa in zip(ref["names"], ref["norms"], own["norms"],
                                    ref["projections"], own["projections"], strict=True):
        rows.append({"param": name, **_estimated(pb, pa, nb, na)})
    rows.append({"param": "*", **_estimated(torch.cat(ref["projections"]),
                                            torch.cat(own["projections"]),
                                            math.hypot(*ref["norms"]), math.hypot(*own["norms"]))})
    return rows


def _estimated(ref_proj: torch.Tensor, arm_proj: torch.Tensor, ref_norm: float,
               arm_norm: float) -> dict[str, float]:
    """probe.compare's metrics from exact norms and the projections of the two gradients.

    Each parameter's PROJECTIONS projections estimate |g_arm - g_ref|^2 (their mean
    square difference) and the cosine (that of the projected vectors: exactly 1 when one
    gradient is a positive multiple of the other, as without the division by N).
    """
    diff2 = float(((arm_proj - ref_proj) ** 2).sum()) / PROJECTIONS
    rel = math.sqrt(diff2) / ref_norm if ref_norm else (0.0 if diff2 == 0 else math.inf)
    scale = float(arm_proj.norm() * ref_proj.norm())
    cosine = float(arm_proj @ ref_proj) / scale if scale else float(ref_norm == arm_norm)
    return {"max_abs_err": math.nan, "rel_l2_err": rel, "cosine": cosine,
            "ref_norm": ref_norm, "arm_norm": arm_norm}


def check_deterministic(base: Arm, max_steps: int, first: dict, again: dict, dtype: str) -> None:
    """The same call twice must give the same record, or no difference means anything."""
    call = base.call(max_steps)
    fix = ("seed everything inside train() (torch.manual_seed, the DataLoader's generator, "
           "random and numpy) and avoid nondeterministic kernels, then audit again")
    if len(first["steps"]) != len(again["steps"]):
        raise GradlabError(f"the loop is not deterministic: {call} made {len(first['steps'])} "
                           f"optimizer steps once and {len(again['steps'])} the next time; {fix}")
    estimate = first["sketch"] or again["sketch"]
    for step, (a, b) in enumerate(zip(again["steps"], first["steps"], strict=True), start=1):
        rel = gradient_tables([b], [a], estimate)[0][-1]["rel_l2_err"] \
            if a["names"] == b["names"] else math.inf
        verdict, tolerance = verdict_of(dtype, base.accum_steps, rel)
        if verdict != "equivalent" or a["lrs"] != b["lrs"]:
            raise GradlabError(
                f"the loop is not deterministic: {call} run twice hands the optimizer "
                f"different gradients at step {step} (rel err {rel:.3g}, tolerance "
                f"{tolerance:.3g}), so the difference between the big batch and the "
                f"accumulated run says nothing about accumulation; {fix}")


# ---------------------------------------------------------------------------- diagnosis

# a gradient "points the same way" above this cosine, and is "N times as long" within
# this relative distance of N: not-divided-by-N gives cosine 1 and ratio N to rounding
SAME_DIRECTION = 1 - 1e-6
SAME_RATIO = 1e-3


class Diagnosis(NamedTuple):
    text: str
    certain: bool  # read off what the loop did (counts, an exact multiple), not a likeness


def diagnose(result: Audit) -> Diagnosis:
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
    if cosine >= SAME_DIRECTION and step == 1:
        return Diagnosis(
            f"the accumulated gradient is {ratio:.4g}x the big batch's and points the same way "
            f"(cosine {cosine:.6g}): each micro-batch's loss is scaled by {ratio / n:.4g}/N "
            f"instead of 1/N.", certain=True)
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


# ---------------------------------------------------------------------------- run directory

WEIGHTS_NOTE = {
    True: "both at the big batch's weights: after each optimizer step the accumulated run "
          "takes the big batch's weights (gradlab audit)",
    False: "each at its own run's weights, which drift apart by rounding from step to step "
           "(gradlab audit: the weights were too large to pass along)",
}


def write_run(result: Audit, out: Path) -> Path:
    """A run directory that compare, plot and report read like any other run's."""
    from gradlab.record import store  # pandas: only the parent needs it

    module = result.entrypoint.partition(":")[0].rsplit(".", 1)[-1]
    arms = (result.base, result.arm)
    settings = {a.name: {"entrypoint": result.entrypoint, "batch_size": a.batch_size,
                         "accum_steps": a.accum_steps, "micro_batch_size": a.micro_batch_size,
                         "dtype": result.dtype, "steps": result.max_steps,
                         "seed": "set by train()"} for a in arms}
    run_dir = store.RunDir(out, f"audit-{module}", {
        "experiment": "audit",
        "description": f"gradlab audit {result.entrypoint}: {result.arm.call(result.max_steps)}"
                       f" against {result.base.call(result.max_steps)}, each in its own process,"
                       f" compared at every optimizer step",
        "entrypoint": result.entrypoint,
        "gradients_at": WEIGHTS_NOTE[result.same_weights],
        "device": result.captures["accumulated"]["device"],
        "trials": [{"trial": 0, "swept": {},
                    "arms": {a.name: {"baseline": a is result.base,
                                      "expect": "" if a is result.base else "equivalent",
                                      "settings": settings[a.name]} for a in arms}}],
        "audit": {"verdict": result.verdict, "estimate": result.estimate,
                  "first_difference": (result.first_difference or {}).get("step"),
                  "diagnosis": result.diagnosis, "determinism_rechecked": result.rechecked,
                  "seconds": result.seconds},
    })
    for table, rows in (("summary", summary_rows(result)), ("steps", step_rows(result)),
                        ("probe", result.params), ("checks", check_rows(result)),
                        ("audit", result.steps)):
        run_dir.append(table, rows)
    run_dir.finish("complete")
    return run_dir.path


def step_rows(result: Audit) -> list[dict[str, Any]]:
    rows = []
    for s in result.steps:
        ref_loss = s["loss_big_batch"]
        for a in (result.base, result.arm):
            key = "big_batch" if a is result.base else "accumulated"
            loss = s[f"loss_{key}"]
            rows.append({"trial": 0, "arm": a.name, "step": s["step"],
                         "examples": s["step"] * a.batch_size, "loss": loss,
                         "grad_norm": s[f"grad_norm_{key}"], "lr": s[f"lr_{key}"],
                         "weight_dist": math.nan,
                         "rel_loss_diff": abs(loss - ref_loss) / abs(ref_loss) if ref_loss
                         else math.nan})
    return sorted(rows, key=lambda r: (r["arm"] != result.base.name, r["step"]))


def summary_rows(result: Audit) -> list[dict[str, Any]]:
    steps, last = result.steps, result.steps[-1]
    rows = []
    for a in (result.base, result.arm):
        is_base = a is result.base
        rows.append({
            "trial": 0, "arm": a.name, "baseline": is_base, "batch_size": a.batch_size,
            "accum_steps": a.accum_steps, "micro_batch": a.micro_batch_size,
            "dtype": result.dtype,
            "max_rel_grad_err": math.nan if is_base else max(s["rel_grad_err"] for s in steps),
            "max_abs_grad_err": math.nan if is_base else max(s["max_abs_grad_err"]
                                                             for s in steps),
            "min_grad_cosine": math.nan if is_base else min(s["cosine"] for s in steps),
            "final_loss": last["loss_big_batch" if is_base else "loss_accumulated"],
            "max_rel_loss_diff": 0.0 if is_base else max(
                abs(s["loss_accumulated"] - s["loss_big_batch"]) / abs(s["loss_big_batch"])
                if s["loss_big_batch"] else math.nan for s in steps),
            "final_weight_dist": math.nan, "final_test_loss": math.nan,
            "final_test_accuracy": math.nan, "max_rel_buffer_diff": math.nan,
            "max_rel_lr_diff": math.nan if is_base else max(s["rel_lr_diff"] for s in steps),
            "first_difference": math.nan if is_base or not result.first_difference
            else result.first_difference["step"],
            "rel_tolerance": math.nan if is_base else steps[0]["tolerance"],
            "estimate": result.estimate,
            "expect": "" if is_base else "equivalent",
            "verdict": "baseline" if is_base else result.verdict,
            "diagnosis": "" if is_base else result.diagnosis or "",
        })
    return rows


def check_rows(result: Audit) -> list[dict[str, Any]]:
    worst = max(s["rel_lr_diff"] for s in result.steps)
    differing = sum(bool(s["settings_differ"]) for s in result.steps)
    return [{"trial": 0, "arm": result.arm.name, "check": "learning rate = big batch's",
             "value": worst, "tolerance": LR_RTOL, "passed": worst <= LR_RTOL},
            {"trial": 0, "arm": result.arm.name, "check": "steps whose optimizer settings differ",
             "value": float(differing), "tolerance": 0.0, "passed": differing == 0}]


# ---------------------------------------------------------------------------- rendering

def render(result: Audit, console) -> None:
    """The step table, the first difference and its diagnosis, on the given rich console."""
    from rich.table import Table
    from rich.text import Text

    from gradlab.readers.compare import fmt

    estimate = " (estimated)" if result.estimate else ""
    title = (f"audit {result.entrypoint}: {result.arm.call(result.max_steps)} against "
             f"{result.base.call(result.max_steps)}, {result.dtype}")
    console.print(title, highlight=False, soft_wrap=True, markup=False, emoji=False)
    table = Table()
    for header in ("step", f"rel grad err{estimate}", "tolerance", "cosine",
                   "lr big-batch", "lr accumulated", "verdict"):
        table.add_column(header, justify="left" if header in ("verdict",) else "right",
                         no_wrap=True)
    for s in shown_steps(result.steps):
        if s is None:
            table.add_row("...", "", "", "", "", "", "")
            continue
        style = "green" if s["verdict"] == "equivalent" else "red"
        table.add_row(str(s["step"]), fmt(s["rel_grad_err"]), fmt(s["tolerance"]),
                      _cosine(s["cosine"]), fmt(s["lr_big_batch"]), fmt(s["lr_accumulated"]),
                      f"[{style}]{s['verdict']}[/]")
    console.print(table)
    worst = max(s["rel_grad_err"] for s in result.steps)
    plain = {"highlight": False, "soft_wrap": True, "markup": False, "emoji": False}
    console.print(f"verdict: equivalent when rel grad err = ||g_acc - g_big|| / ||g_big|| <= "
                  f"tolerance = (N - 1)·u + {schema.REORDER}·u_acc ({result.dtype}; your loop "
                  f"gives no float64 reference, so the floor is 0) "
                  f"and the learning rates and optimizer settings agree (to {LR_RTOL:g}); "
                  f"gradients {WEIGHTS_NOTE[result.same_weights].split(' (')[0]}", **plain)
    if result.estimate:
        console.print(f"estimate: parameters x steps > {result.copy_limit:g} elements, too many to "
                      f"copy: the errors are estimated from the norm and {PROJECTIONS} random "
                      f"projections of each parameter's gradient", **plain)
    if not result.failed:
        console.print(Text.assemble(
            ("equivalent", "bold green"),
            f" at every one of the {len(result.steps)} steps: the accumulated loop hands the "
            f"optimizer the big batch's gradient (max rel grad err {fmt(worst)} <= "
            f"{fmt(result.steps[0]['tolerance'])}) and learning rate"), soft_wrap=True)
        return
    first = result.first_difference
    what = (f"rel grad err {fmt(first['rel_grad_err'])} (tolerance {fmt(first['tolerance'])}), "
            f"cosine {_cosine(first['cosine'])}")
    if first["rel_lr_diff"] > LR_RTOL:
        what += (f"; learning rate {fmt(first['lr_accumulated'])} against "
                 f"{fmt(first['lr_big_batch'])}")
    if first["settings_differ"]:
        what += f"; optimizer settings: {first['settings_differ']}"
    console.print(Text.assemble(("differs", "bold red"), f" from step {first['step']}: {what}"),
                  soft_wrap=True)
    if result.diagnosis:
        console.print(f"diagnosis: {result.diagnosis}", **plain)


def _cosine(value: float) -> str:
    """A cosine shows how close to 1 it is: 0.99999994 is not 1."""
    if math.isnan(value):
        return "-"
    if value > 0.999:
        return f"{value:.8f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def shown_steps(steps: list[dict], keep: int = 12) -> list[dict | None]:
    """All steps when few; else the first ones, the first difference and the last (None: ...)."""
    if len(steps) <= keep:
        return steps
    wanted = {1, 2, 3, len(steps)}
    first = next((s["step"] for s in steps if s["verdict"] != "equivalent"), None)
    if first:
        wanted |= {first - 1, first, first + 1}
    out: list[dict | None] = []
    for s in steps:
        if s["step"] in wanted:
            if out and out[-1] is not None and out[-1]["step"] != s["step"] - 1:
                out.append(None)
            out.append(s)
    return out


if __name__ == "__main__":
    entry, m, n, k, limit, path, role, shared = sys.argv[1:]
    worker(entry, int(m), int(n), int(k), int(limit), Path(path),
           lead=Path(shared) if role == "lead" else None,
           follow=Path(shared) if role == "follow" else None)
