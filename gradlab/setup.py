"""What gradlab trains: a model, its examples and a loss — built in, or your own.

Your own training setup is a factory in your module, named by the ``setup`` setting
(``--set setup=mypkg.train:make_setup``). gradlab seeds torch, calls
``make_setup(settings)`` and gets back a :class:`Setup`::

    from gradlab.setup import Setup

    def make_setup(settings):
        model = MyCausalLM()                       # any torch.nn.Module
        train = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return Setup(model, train, loss=summed_token_loss, units=count_tokens)

Examples are a tuple of tensors (``(x, y)``) or a dict of tensors, all with the
examples along dim 0; padded sequences of any length are fine. gradlab takes
windows of B examples from them and splits each window along dim 0 into N
micro-batches. The loss returns the *summed* loss of a micro-batch and the number
of loss units it holds (examples, or non-padding tokens); gradlab divides by the
units of the whole window, which is what makes (B/N)×N equal B×1 for images and
language models alike. ``units`` counts the units of a batch without running the
model (default: its number of examples), so the window's total is known before
the first backward; gradlab checks once that it agrees with what the loss says.

A loss that couples the examples of a batch (a contrastive loss with in-batch
negatives: InfoNCE, NT-Xent, CLIP, sentence-transformers' MultipleNegativesRanking)
cannot be split into micro-batches: each example is scored against the others in
the batch the loss sees. Give it as two functions in place of ``loss``::

    def embed(model, batch):          # the batch's embeddings, examples along dim 0
        a, b = batch
        return model(a), model(b)     # a tensor, or a tuple of tensors

    def info_nce(embeddings):         # the loss of a whole batch of embeddings
        za, zb = embeddings
        logits = za @ zb.T / 0.1
        return F.cross_entropy(logits, torch.arange(len(za)), reduction="sum"), len(za)

    Setup(model, train, embed=embed, coupled_loss=info_nce)

gradlab then knows the loss couples the batch. Under ``accumulation = "gradcache"``
(what ``auto`` picks for such a setup when N > 1) it embeds every micro-batch
without a graph, computes ``coupled_loss`` on the whole window's embeddings and its
gradient with respect to them, then re-runs each micro-batch with a graph (same
random state, so dropout draws the same masks) and backpropagates that gradient:
the big batch's gradient, with the activation memory of one micro-batch. Under
``accumulation = "plain"`` it computes ``coupled_loss(embed(model, micro_batch))``
inside each micro-batch, as a plain accumulation loop does, and says that this is
not the big batch's gradient: each example meets B/N − 1 others instead of B − 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.errors import GradlabError

IGNORE_INDEX = -100  # label value cross-entropy skips (PyTorch's and Hugging Face's default)
Examples = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
# loss(model, batch) -> (summed loss over the batch, number of loss units in it)
LossFn = Callable[[nn.Module, Examples], tuple[torch.Tensor, torch.Tensor | int]]
# units(batch) -> number of loss units in it, without running the model
UnitsFn = Callable[[Examples], torch.Tensor | int]
# accuracy(model, batch) -> (number of correct predictions, number of predictions)
AccuracyFn = Callable[[nn.Module, Examples], tuple[torch.Tensor | int, torch.Tensor | int]]
# what embed returns: a tensor, or a tuple of tensors, with the examples along dim 0
Embeddings = torch.Tensor | tuple[torch.Tensor, ...]
# embed(model, batch) -> the batch's embeddings (the part of the forward done per example)
EmbedFn = Callable[[nn.Module, Examples], Embeddings]
# coupled_loss(embeddings) -> (summed loss, units) of a whole batch, each example scored
# against the others
CoupledLossFn = Callable[[Embeddings], tuple[torch.Tensor, torch.Tensor | int]]


@dataclass
class Setup:
    """Everything gradlab needs to train one arm; the arm's settings say how."""

    model: nn.Module
    train: Examples  # training examples along dim 0: (x, y) or a dict of tensors
    loss: LossFn | None = None  # (summed loss, units) of a batch; or embed and coupled_loss
    units: UnitsFn | None = None  # default: one unit per example
    test: Examples | None = None  # held-out examples, for test loss (and accuracy)
    accuracy: AccuracyFn | None = None  # (correct, total) on a batch, for test accuracy
    shuffle: bool = True  # False keeps the training examples in the order given
    # a loss that couples the batch, in two parts (in place of loss): see the module's doc
    embed: EmbedFn | None = None  # the embeddings of a batch's examples
    coupled_loss: CoupledLossFn | None = None  # (summed loss, units) of a batch's embeddings

    def __post_init__(self):
        if (self.embed is None) != (self.coupled_loss is None):
            given, missing = ("embed", "coupled_loss") if self.embed is not None \
                else ("coupled_loss", "embed")
            raise GradlabError(f"Setup got {given} but no {missing}; a loss that couples the "
                               f"batch needs both: embed(model, batch) -> embeddings and "
                               f"coupled_loss(embeddings) -> (summed loss, units)")
        if self.coupled and self.loss is not None:
            raise GradlabError("Setup got loss and also embed/coupled_loss; give one: loss for "
                               "a loss computed per example, embed and coupled_loss for one "
                               "that couples the batch")
        if not self.coupled and self.loss is None:
            raise GradlabError("Setup needs a loss: loss(model, batch) -> (summed loss, units), "
                               "or embed and coupled_loss for a loss that couples the batch")

    @property
    def coupled(self) -> bool:
        """Does the loss score each example against the others in its batch?"""
        return self.coupled_loss is not None

    def batch_loss(self, model: nn.Module, batch: Examples) -> tuple[torch.Tensor, object]:
        """(summed loss, units) of a batch on its own: for a coupled loss, its examples are
        scored against each other only (what plain accumulation does to a micro-batch)."""
        if self.coupled:
            return self.coupled_loss(self.embed(model, batch))
        return self.loss(model, batch)

    def count_units(self, batch: Examples) -> torch.Tensor | int:
        return self.units(batch) if self.units is not None else num_examples(batch)

    @property
    def device(self) -> torch.device:
        """Where the model lives (and so where its batches must go)."""
        for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
            return tensor.device
        return torch.device("cpu")


# ----------------------------------------------------------------------------- examples

def tensors(batch: Examples) -> list[torch.Tensor]:
    return list(batch.values()) if isinstance(batch, dict) else list(batch)


def num_examples(batch: Examples) -> int:
    return tensors(batch)[0].shape[0]  # (len() of a tensor goes through Python: 5x slower)


def take(batch: Examples, index: torch.Tensor) -> Examples:
    """The examples at ``index`` (a window of B, in the stream's order)."""
    if isinstance(batch, dict):
        return {k: v[index] for k, v in batch.items()}
    return tuple(t[index] for t in batch)


def split(batch: Examples, n: int) -> list[Examples]:
    """N micro-batches in order; when N does not divide B their sizes differ by at most one."""
    if n == 1:  # the batch itself, not views of it (a big batch's step, every step)
        return [batch]
    if isinstance(batch, dict):
        parts = {k: torch.tensor_split(v, n) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(n)]
    return list(zip(*(torch.tensor_split(t, n) for t in batch), strict=True))


def cast(batch: Examples | None, dtype: torch.dtype, device: torch.device) -> Examples | None:
    """Floating tensors to the arm's dtype, every tensor to its device (ids stay integers)."""
    if batch is None:
        return None

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    if isinstance(batch, dict):
        return {k: move(v) for k, v in batch.items()}
    return tuple(move(t) for t in batch)


def check_examples(batch: object, where: str) -> int:
    """A tuple or dict of tensors sharing their first dimension; returns the example count."""
    if isinstance(batch, dict):
        items = list(batch.items())
    elif isinstance(batch, tuple | list):
        items = [(f"[{i}]", v) for i, v in enumerate(batch)]
    else:
        raise GradlabError(f"{where} is a {type(batch).__name__}; give a tuple (x, y) or a dict "
                           f"of tensors with the examples along dim 0")
    if not items:
        raise GradlabError(f"{where} is empty; give a tuple (x, y) or a dict of tensors")
    for name, value in items:
        if not isinstance(value, torch.Tensor):
            raise GradlabError(f"{where}{'' if name.startswith('[') else ' '}{name} is a "
                               f"{type(value).__name__}, not a tensor; convert it with "
                               f"torch.as_tensor (every value must be a tensor)")
        if value.dim() == 0:
            raise GradlabError(f"{where} {name} is a scalar; every tensor needs the examples "
                               f"along dim 0")
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = (~torch.isfinite(value)).reshape(len(value), -1).any(1).nonzero()[:, 0]
            raise GradlabError(f"{where}{'' if name.startswith('[') else ' '}{name} holds NaN "
                               f"or inf in {len(bad)} example(s) (the first: row "
                               f"{int(bad[0])}); every loss and gradient would be NaN from "
                               f"there: drop or fix those rows")
    lengths = {name: len(value) for name, value in items}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise GradlabError(f"{where}: tensors differ in length along dim 0 ({listed}); every "
                           f"tensor must hold one row per example")
    return next(iter(lengths.values()))


# ----------------------------------------------------------------------------- built-in losses
# The classic (x, y) batches: one loss unit per example.

def mse_loss(model: nn.Module, batch: Examples) -> tuple[torch.Tensor, int]:
    """Each example's mean squared error over its outputs, summed over the examples."""
    x, y = batch
    per_example = F.mse_loss(model(x), y, reduction="none").reshape(len(x), -1).mean(1)
    return per_example.sum(), len(x)


def cross_entropy_loss(model: nn.Module, batch: Examples) -> tuple[torch.Tensor, int]:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum"), len(x)


def class_accuracy(model: nn.Module, batch: Examples) -> tuple[torch.Tensor, int]:
    x, y = batch
    return (model(x).argmax(1) == y).sum(), len(y)


def split_at(batch: Examples, index: int) -> tuple[Examples, Examples]:
    """The first ``index`` examples, and the rest."""
    if isinstance(batch, dict):
        parts = {k: torch.tensor_split(v, [index]) for k, v in batch.items()}
        return tuple({k: parts[k][i] for k in batch} for i in range(2))
    first, rest = zip(*(torch.tensor_split(t, [index]) for t in batch), strict=True)
    return first, rest
