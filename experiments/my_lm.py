"""Your own training setup, checked by gradlab: a Hugging Face-style causal LM.

This file is an example to copy. gradlab calls ``make_setup(settings)`` once per
arm (with torch already seeded by the arm's seed) and gets back everything it
needs: the model, the training examples and a loss. It then trains the same
model as one big batch and as N micro-batches, under each arm's policy, and
tells you whether the gradients agree.

    gradlab run my_lm        # from the folder that holds experiments/ (my_lm.toml)

What a setup must provide, and why:

- ``model``: any ``torch.nn.Module``. Here it is called the Hugging Face way,
  ``model(input_ids=..., attention_mask=...)``, and returns an object with
  ``.logits``.
- ``train``: a dict of tensors (or a tuple ``(x, y)``), one row per example along
  dim 0. gradlab takes B rows at a time and splits them into N micro-batches
  along dim 0. Sequences are padded to one length; labels are -100 at padding.
- ``loss(model, batch)``: returns the *summed* loss of the batch and the number
  of loss units it holds (here: tokens that are scored). gradlab divides by the
  units of the whole window (``loss_scale = "by-size"``), which is what makes
  accumulation exact when micro-batches hold different numbers of tokens.
- ``units(batch)``: counts the same units *without* running the model, so the
  window's total is known before the first backward (the job Hugging Face's
  ``num_items_in_batch`` does). gradlab checks once that it agrees with the loss.
- ``test`` (optional): held-out examples, for the test loss in eval.csv.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.setup import Setup

PAD, IGNORE = 0, -100


# ----------------------------------------------------------------------------- data

def sentences() -> list[str]:
    """Short texts that ship with Python: the first line of each builtin's docstring."""
    import builtins

    lines = []
    for name in sorted(dir(builtins)):
        doc = inspect.getdoc(getattr(builtins, name)) or ""
        first = doc.split("\n")[0].strip()
        if first and first.isascii():
            lines.append(first)
    return lines


def tokenize(texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    """Byte tokens, right-padded to max_len; labels = input_ids, -100 at padding."""
    ids = torch.full((len(texts), max_len), PAD, dtype=torch.long)
    mask = torch.zeros((len(texts), max_len), dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = list(text.encode("ascii")[:max_len])
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, IGNORE)}


# ----------------------------------------------------------------------------- model

@dataclass
class CausalLMOutput:
    logits: torch.Tensor


class TinyCausalLM(nn.Module):
    """Embedding, one causal self-attention block, a head; returns ``.logits`` like HF."""

    def __init__(self, vocab: int = 128, width: int = 32, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(max_len, width)
        self.attention = nn.MultiheadAttention(width, num_heads=2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None) -> CausalLMOutput:
        length = input_ids.shape[1]
        x = self.embed(input_ids) + self.position(torch.arange(length, device=input_ids.device))
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        # Right padding with a causal mask: a real token never attends to padding, so each
        # example's logits do not depend on the others in its micro-batch.
        attended, _ = self.attention(x, x, x, attn_mask=causal, need_weights=False)
        x = x + attended
        x = x + self.mlp(x)
        return CausalLMOutput(logits=self.head(x))


# ----------------------------------------------------------------------------- loss

def scored_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens the loss scores: labels 1..L-1 (each predicted from the ones before) not -100."""
    return (batch["labels"][:, 1:] != IGNORE).sum()


def summed_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]):
    """(summed next-token cross-entropy, number of scored tokens)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    loss = F.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, scored_tokens(batch)


# ----------------------------------------------------------------------------- the factory

def make_setup(settings) -> Setup:
    """Called once per arm; ``settings`` is the arm's gradlab.config.settings.Settings."""
    texts = sentences()
    data = tokenize(texts, max_len=64)  # lengths vary from a few bytes to 64
    held_out = len(texts) // 8
    train = {k: v[held_out:] for k, v in data.items()}
    test = {k: v[:held_out] for k, v in data.items()}
    return Setup(model=TinyCausalLM(), train=train, loss=summed_token_loss,
                 units=scored_tokens, test=test)
