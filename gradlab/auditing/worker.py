"""The audit's worker: runs the user's train() once, in its own process, under hooks that
record what every optimizer step receives.

Every optimizer in torch ends in ``torch.optim.Optimizer.step()``, and torch offers a
global hook there, so the worker records, at every step, the gradient the optimizer
receives and each parameter group's learning rate, without a line of the user's code
changed (plain PyTorch, Accelerate, Lightning and the Hugging Face Trainer alike). It
also counts what happened since the previous step: backward() calls (and the sum of
the scalars they ran on: the loss the step's gradient is the gradient of), zero_grad()
calls and the backward() results they discarded, scheduler steps, and clip_grad_norm_()
calls.

Under torch's launcher (``gradlab audit --nproc-per-node W``) each rank runs this worker
and saves its own record (``label.rankR.pkl``). It also counts the backward() calls that
reduced gradients across the ranks (DDP outside ``no_sync()``, FSDP2 with
``set_requires_gradient_sync(True)``), records an FSDP2 gradient whole (its DTensor's
``full_tensor()``: every rank is at the optimizer step together, so the gather meets),
and, following, writes the leader's weights into its own shard of each parameter.

The parent starts it as ``python -m gradlab.auditing.worker``; it imports only the standard
library, torch and gradlab's torch-free helpers, so a process starts as fast as the user's
own script.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import pickle
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradlab import entrypoints
from gradlab.auditing import ranks
from gradlab.auditing.result import (
    CHUNK,
    PROJECTIONS,
    beat_of,
    locate_entrypoint,
    no_module,
    rank_record,
)
from gradlab.errors import GradlabError, where


def resolve_entrypoint(text: str):
    """The user's train function from 'pkg.module:function', checked against the contract,
    as a callable taking (micro_batch_size, accum_steps, max_steps) by position: by name
    when the function uses the contract's names (in whatever order), else by position."""
    module_name, attr = path = locate_entrypoint(text)
    try:
        module, fn = entrypoints.load(path)
    except entrypoints.NotFound:  # found, but a package on the way does not hold it
        raise no_module(text, module_name) from None
    except entrypoints.LoadFailed as e:  # the user's module top level raised
        raise GradlabError(f"entrypoint '{text}': importing {module_name} raised "
                           f"{type(e.error).__name__}: {e.error}") from None
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items()
                       if inspect.isfunction(v) and v.__module__ == module.__name__)
        what = "is not a function" if hasattr(module, attr) else "does not exist"
        raise GradlabError(f"entrypoint '{text}': {module_name}.{attr} {what}; functions in "
                           f"{module_name}: {', '.join(found) or 'none'}")
    try:
        signature = inspect.signature(fn)
    except ValueError:  # a builtin without a signature: let the call decide
        return _by_name(fn)
    try:  # the contract's names, in any order: called by name
        signature.bind(micro_batch_size=1, accum_steps=1, max_steps=1)
        return _by_name(fn)
    except TypeError:
        pass
    try:  # other names (train(m, n, k)): called by position, in the contract's order
        signature.bind(1, 1, 1)
        return fn
    except TypeError:
        raise GradlabError(f"entrypoint '{text}' is {attr}({', '.join(signature.parameters)}); "
                           f"it must accept train(micro_batch_size: int, accum_steps: int, "
                           f"max_steps: int)") from None


def _by_name(fn):
    """fn, called with the three numbers by the contract's names."""
    @functools.wraps(fn)
    def call(micro_batch_size: int, accum_steps: int, max_steps: int):
        return fn(micro_batch_size=micro_batch_size, accum_steps=accum_steps,
                  max_steps=max_steps)
    return call


@dataclass
class Window:
    """What happened between two optimizer steps."""
    backwards: int = 0
    discarded: int = 0        # backward() results a zero_grad() cleared before any step
    zero_grads: int = 0
    scheduler_steps: int = 0
    clips: int = 0            # clip_grad_norm_(), clip_grads_with_norm_(), clip_grad_value_()
    syncs: int = 0            # backward() calls that reduced gradients across the ranks
    scaler_updates: int = 0   # GradScaler.update() calls (mixed precision's loss scale)
    pending: int = 0          # backward() calls since .grad was last cleared or stepped on
    losses: list = field(default_factory=list)  # the scalars backward() ran on, detached
    loss_known: bool = True

    def counts(self) -> dict[str, Any]:
        # read only now, at the step, which waits for the device anyway (grads are copied)
        loss = math.fsum(float(t) for t in self.losses) if self.loss_known and self.backwards \
            else math.nan
        return {"backwards": self.backwards, "discarded": self.discarded,
                "zero_grads": self.zero_grads, "scheduler_steps": self.scheduler_steps,
                "clips": self.clips, "syncs": self.syncs,
                "scaler_updates": self.scaler_updates, "loss": loss}


class Recorder:
    """The hooks of one worker: what each optimizer step receives, and what led to it."""

    def __init__(self, max_steps: int, copy_limit: int, lead: Path | None = None,
                 follow: Path | None = None, beat: Path | None = None):
        self.max_steps, self.copy_limit = max_steps, copy_limit
        # rewritten with the step count at every optimizer step: the parent reads how long
        # the loop has gone without one (auditing.parent.Watch)
        self.beat = beat
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
        self.optimizers: dict[int, int] = {}  # id(optimizer) -> 0, 1, ... in order of first step
        self.device = "cpu"
        self.rank = ranks.of_environment()     # (rank, world size) under torch's launcher
        self.joined = False                   # the loop called init_process_group()
        self.fsdp_sharded = False             # the loop called FSDP2's fully_shard()
        self.fsdp_sync = True                 # its last set_requires_gradient_sync(flag)
        self.kept: dict[int, nn.Module] = {}  # the DDP models, kept alive: see worker()
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
        self._wrap(torch.amp.GradScaler, "update", self.on_scaler_update)
        # the module attribute every caller looks up (Accelerate's and Lightning's clipping
        # too); installed before the user's module is imported, so its own import binds it
        # (clip_grads_with_norm_: what Accelerate, and so the Hugging Face Trainer, call
        # with a norm of their own; torch's clip_grad_norm_ does not go through this name)
        for clip in ("clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_"):
            if clip in vars(torch.nn.utils):
                self._wrap(torch.nn.utils, clip, self.on_clip)
        if self.rank is not None:
            self._install_distributed()

    def _install_distributed(self) -> None:
        """Count the backward() calls that reduce gradients across the ranks."""
        import torch.distributed as dist
        import torch.distributed.fsdp as fsdp
        from torch.nn.parallel import DistributedDataParallel

        self._wrap(dist, "init_process_group", self.on_join)
        # DDP decides in forward() whether the backward() that follows all-reduces
        self._wrap(DistributedDataParallel, "forward", self.on_ddp_forward)
        if "fully_shard" in vars(fsdp):
            self._wrap(fsdp, "fully_shard", self.on_fully_shard)
            self._wrap(fsdp.FSDPModule, "set_requires_gradient_sync", self.on_gradient_sync)

    def _wrap(self, owner, name: str, before) -> None:
        """``owner.name`` (a class's method, or a module's function) calls ``before`` with its
        arguments (the object first, for a method) and then does what it did."""
        original = vars(owner)[name]

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            before(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(owner, name, wrapped)
        self._undo.append(lambda: setattr(owner, name, original))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    # -- the hooks
    def on_forward(self, module: nn.Module, args) -> None:
        self.seen.setdefault(id(module), module)

    # each hook takes the arguments of what it wraps, and reads only those it needs
    def on_join(self, *_, **__) -> None:
        self.joined = True

    def on_ddp_forward(self, module, *_, **__) -> None:
        self.kept.setdefault(id(module), module)
        if torch.is_grad_enabled() and module.require_backward_grad_sync:
            self.window.syncs += 1

    def on_fully_shard(self, module, *_, **__) -> None:
        self.fsdp_sharded = True

    def on_gradient_sync(self, module, requires_gradient_sync: bool, *_, **__) -> None:
        self.fsdp_sync = bool(requires_gradient_sync)

    def on_backward(self, tensor: torch.Tensor, *_, **__) -> None:
        w = self.window
        w.backwards += 1
        w.pending += 1
        if self.fsdp_sharded and self.fsdp_sync:
            w.syncs += 1
        if tensor.numel() == 1:
            w.losses.append(tensor.detach())
        else:
            w.loss_known = False

    def on_zero_grad(self, owner, *_, **__) -> None:
        w = self.window
        w.zero_grads += 1
        w.discarded += w.pending
        w.pending = 0

    def on_scaler_update(self, scaler, *_, **__) -> None:
        self.window.scaler_updates += 1

    def on_clip(self, parameters, *_, **__) -> None:
        self.window.clips += 1

    def on_scheduler_step(self, scheduler, *_, **__) -> None:
        if getattr(scheduler, "_step_count", None) != 0:  # 0: the step its __init__ makes
            self.window.scheduler_steps += 1

    def on_step(self, optimizer: torch.optim.Optimizer, args, kwargs):
        """Before optimizer.step(): record what it receives. Called with a closure
        (``optimizer.step(closure)``: LBFGS, Lightning's automatic optimization, which runs
        the window's last forward and backward in it), the gradient the step applies exists
        only once the closure has run, so the closure is wrapped to record after its first
        call (LBFGS calls it again at other weights: those are not what the step received, nor
        the next window's)."""
        # args are step()'s own, self first: (optimizer, closure) when it is given by position
        closure = kwargs["closure"] if "closure" in kwargs else args[1] if len(args) > 1 else None
        if closure is None:
            self.record(optimizer)
            return None
        recorded = False

        def recording_closure():
            nonlocal recorded
            if recorded:  # a further evaluation inside this step: not the next window's
                held, self.window = self.window, Window()
                try:
                    return closure()
                finally:
                    self.window = held
            loss = closure()
            recorded = True
            self.record(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": recording_closure}
        return (args[0], recording_closure, *args[2:]), kwargs

    def record(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradient, learning rates and settings the step is about to apply, and what led
        to them since the last step."""
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
            "optimizer": self.optimizers.setdefault(id(optimizer), len(self.optimizers)),
            "lrs": [float(group["lr"]) for group in optimizer.param_groups],
            "settings": [_settings(group) for group in optimizer.param_groups],
            **self.window.counts(),
        }
        grads = [ranks.whole(p.grad) for _, _, p in params]
        if self.sketch:
            record["norms"] = [_norm(g) for g in grads]
            record["projections"] = [_project(name, g) for name, g in zip(names, grads,
                                                                          strict=True)]
        else:
            # one flat tensor per step (torch.cat promotes mixed float dtypes losslessly):
            # one copy to the host, and one tensor to save instead of one per parameter
            record["grad"] = torch.cat([
                (g.detach() if g is not None else torch.zeros(p.shape, dtype=p.dtype,
                                                                    device=p.device)).reshape(-1)
                for g, (_, _, p) in zip(grads, params, strict=True)]).to("cpu", copy=True)
        self.steps.append(record)
        self.window = Window()
        if self.beat is not None:
            self.beat.write_text(str(len(self.steps)))

    def after_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if self.sketch:  # too large to pass along every step: each run keeps its own
            return
        step, names = len(self.steps), self.steps[-1]["names"]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.lead:
            weights = torch.cat([ranks.whole(p.detach()).reshape(-1).cpu() for p in params])
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
        if self.rank is None or self.rank[1] == 1:  # every rank reads it: the parent removes it
            path.unlink()
        weights = raw.view(getattr(torch, self._layout["dtype"]))
        sizes = [p.numel() for p in params]
        if weights.numel() != sum(sizes):
            self.follow = None
            return
        with torch.no_grad():
            for p, value in zip(params, weights.split(sizes), strict=True):
                ranks.set_whole(p, value.view(p.shape))
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


def _array(t: torch.Tensor):
    """A host tensor as a numpy array; bfloat16, which numpy lacks, widened to float32
    (exactly: every bfloat16 is a float32)."""
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


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
    """' at FILE:LINE' of the innermost frame outside torch and this file: where the user's
    code failed (the innermost frame of all when torch raised on its own)."""
    found = where(err, skip=(str(Path(torch.__file__).parent), __file__)) or where(err)
    return f" at {Path(found[0]).name}:{found[1]}" if found else ""


def worker(entrypoint: str, micro_batch_size: int, accum_steps: int, max_steps: int,
           copy_limit: int, out: Path, lead: Path | None = None,
           follow: Path | None = None) -> bool:
    """Run train() once under the hooks and pickle what they saw (or why not) to out: numbers,
    strings and numpy arrays, so that the parent reads it without torch. Whether it ran
    without an error."""
    call = f"train({micro_batch_size}, {accum_steps}, {max_steps})"
    result: dict[str, Any] = {"error": None}
    rank = ranks.of_environment()
    if rank and rank[1] > 1:  # each rank its own record
        out = rank_record(out, rank[0])
    try:
        recorder = Recorder(max_steps, copy_limit, lead, follow, beat=beat_of(out))
        recorder.install()
        try:
            train = resolve_entrypoint(entrypoint)
            start = time.perf_counter()
            train(micro_batch_size, accum_steps, max_steps)
        finally:
            recorder.uninstall()
        if recorder.rank and recorder.rank[1] > 1 and not recorder.joined:
            raise GradlabError(f"{call} ran on {recorder.rank[1]} ranks but never called "
                               f"torch.distributed.init_process_group(), so each rank trained "
                               f"alone; --nproc-per-node audits a loop that joins the ranks "
                               f"torchrun starts (see experiments/ddp_loop.py)")
        result.update(recorder.result(), seconds=time.perf_counter() - start)
    except GradlabError as e:
        result["error"] = str(e)
    except SystemExit as e:  # the loop meant to end its script: say so, not "died"
        result["error"] = (f"{call} {entrypoints.failure(e).removeprefix('it ')}; the audit calls "
                           f"train() and needs it to return: return instead of exiting")
    except Exception as e:  # the user's loop failed: say where, in one line
        message = str(e).strip().splitlines()
        result["error"] = (f"{call} raised {type(e).__name__}"
                           f"{': ' + message[0] if message else ''}{_where(e)}; fix the loop "
                           f"(run it alone to see the traceback) and audit again")
        result["lost_peer"] = ranks.lost_peer(e)
    for step in result.get("steps", ()):  # read by a parent that imports no torch
        if "grad" in step:
            step["grad"] = _array(step["grad"])
        if "projections" in step:
            step["projections"] = [_array(t) for t in step["projections"]]
    _write_whole(out, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    return result["error"] is None


if __name__ == "__main__":
    entry, m, n, k, limit, path, role, shared = sys.argv[1:]
    ran = worker(entry, int(m), int(n), int(k), int(limit), Path(path),
                 lead=Path(shared) if role == "lead" else None,
                 follow=Path(shared) if role == "follow" else None)
    # The process ends here, its record saved, without waiting for what the loop left
    # running (a thread that is not a daemon would keep it alive for ever) and without
    # running destructors: in torch 2.13 freeing a DDP reducer whose gloo group has work in
    # flight can deadlock (the group's destructor, holding the GIL, joins a thread that
    # waits for the GIL), so the recorder keeps the models. A rank that failed must end the
    # others, which would wait for it in a collective: torch's launcher stops them all when
    # one exits with an error.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if not ran and ranks.of_environment() else 0)
