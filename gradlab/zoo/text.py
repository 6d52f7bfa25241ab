"""Variable-length text and tiny causal language models, for the `tokens` experiment.

The 2024 transformers/TRL accumulation bug: with padded sequences of different
lengths, dividing each micro-batch's *mean token loss* by N (a mean of means)
weights a token in a short micro-batch more than one in a long micro-batch, so
it is not the big-batch gradient. Dividing each micro-batch's *summed* token
loss by the number of scored tokens in the whole window is. The pieces here make
that measurable on a CPU in seconds:

- text that ships with Python (standard-library docstrings), so nothing is
  downloaded, as byte-level tokens (ASCII, 128 ids, NUL is padding);
- examples of random length, right-padded, in the Hugging Face batch layout
  (``input_ids``, ``attention_mask``, ``labels`` with -100 at padding);
- two small causal language models whose logits for one example depend on
  nothing but that example, so that splitting a batch changes only rounding;
- the loss as (summed token loss, scored tokens), the units the engine needs
  to normalise by the window's total.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.errors import GradlabError
from gradlab.setup import IGNORE_INDEX

VOCAB_SIZE = 128  # byte-level tokens: every ASCII code point is its own id
PAD_ID = 0  # NUL never occurs in the corpus, so it is free to mean "padding"

# Pure-Python standard-library modules present on Python 3.11 and later (none is
# deprecated for removal), sorted. A fixed list keeps the corpus the same from one
# run to the next; their docstrings change between Python versions, so the text
# (and every number computed from it) is the same for a given Python version.
CORPUS_MODULES = (
    "argparse", "base64", "bisect", "calendar", "cmd", "collections", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "difflib", "enum",
    "fnmatch", "fractions", "functools", "getopt", "glob", "graphlib", "heapq", "html",
    "ipaddress", "json", "keyword", "numbers", "pathlib", "pprint", "queue", "random",
    "reprlib", "sched", "secrets", "shlex", "statistics", "string", "textwrap", "timeit",
    "tomllib", "uuid", "zipfile",
)


def _public_members(module) -> list[object]:
    """The module's public classes and functions, sorted by name.

    ``__all__`` is the module's own statement of its API; without one, the public
    names defined in the module itself (or in its C accelerator, as bisect's
    functions are), not names it merely imported.
    """
    if hasattr(module, "__all__"):
        names = sorted(module.__all__)
    else:
        home = {module.__name__, "_" + module.__name__}
        names = sorted(n for n in dir(module) if not n.startswith("_")
                       and getattr(getattr(module, n), "__module__", None) in home)
    members = [getattr(module, name) for name in names]
    return [m for m in members if inspect.isclass(m) or inspect.isroutine(m)]


def _clean(text: str) -> str:
    """One line of ASCII: runs of whitespace become one space, other characters are dropped."""
    return " ".join("".join(c for c in text if 0 < ord(c) < VOCAB_SIZE).split())


@functools.cache
def docstring_corpus() -> list[str]:
    """Docstrings of CORPUS_MODULES and their public classes and functions, in order.

    Each piece is one whitespace-normalised ASCII line; empty pieces are dropped,
    and so are repeats (a class re-exported by a second module, or a docstring
    inherited from a base class, is text the corpus already holds).
    """
    pieces: list[str] = []
    seen: set[str] = set()
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *_public_members(module)]:
            piece = _clean(inspect.getdoc(obj) or "")
            if piece and piece not in seen:
                seen.add(piece)
                pieces.append(piece)
    return pieces


@functools.cache
def _corpus_ids() -> torch.Tensor:
    """The corpus as one long row of token ids, pieces separated by newlines."""
    data = "\n".join(docstring_corpus()).encode("ascii")
    return torch.tensor(list(data), dtype=torch.long)


def token_examples(n_examples: int, min_len: int, max_len: int,
                   seed: int) -> dict[str, torch.Tensor]:
    """``n_examples`` stretches of the corpus, lengths uniform in [min_len, max_len], padded.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each (n_examples,
    max_len) long. Padding is on the right (PAD_ID, mask 0, label -100), so a
    causal model's real positions never see it. Lengths and start offsets come
    from a generator seeded by ``seed`` alone: the same arguments give the same
    examples, and min_len == max_len gives equal lengths (where the mean of
    micro-batch means is exact, a control for the experiment).
    """
    if n_examples < 1:
        raise GradlabError(f"n_examples={n_examples}: need at least one example; "
                           f"set n_examples >= 1")
    if min_len < 2:
        raise GradlabError(f"min_len={min_len}: a sequence needs at least 2 tokens to "
                           f"predict one; set min_len >= 2")
    if max_len < min_len:
        raise GradlabError(f"max_len={max_len} is below min_len={min_len}; "
                           f"set max_len >= min_len")
    corpus = _corpus_ids()
    if max_len > len(corpus):
        raise GradlabError(f"max_len={max_len} exceeds the corpus ({len(corpus)} tokens); "
                           f"set max_len <= {len(corpus)}")
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n_examples,), generator=generator)
    starts = torch.randint(0, len(corpus) - max_len + 1, (n_examples,), generator=generator)
    positions = torch.arange(max_len)
    real = positions < lengths[:, None]
    input_ids = torch.where(real, corpus[starts[:, None] + positions], PAD_ID)
    return {
        "input_ids": input_ids,
        "attention_mask": real.long(),
        "labels": input_ids.masked_fill(~real, IGNORE_INDEX),
    }


class GRULanguageModel(nn.Module):
    """Embedding, one GRU layer, linear head.

    A unidirectional recurrence reads left to right, so padding on the right
    cannot reach a real position, and each batch row is its own recurrence:
    ``attention_mask`` is accepted for the Hugging Face call signature and not needed.
    """

    def __init__(self, vocab_size: int = VOCAB_SIZE, embed: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        states, _ = self.gru(self.embed(input_ids))
        return self.head(states)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions 0..t only.

    Written out rather than taken from nn.MultiheadAttention or
    scaled_dot_product_attention: their fused CPU/GPU paths pick kernels by
    shape, mask and train/eval mode, and a fully masked row gives NaN there. Here
    every row sees at least itself, so padded positions stay finite, and with
    padding on the right the causal mask alone keeps it away from real positions.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise GradlabError(f"d_model={d_model} is not divisible by n_heads={n_heads}; "
                               f"choose n_heads that divides d_model")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # (batch, heads, length, head width)
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, length, width))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)); no dropout."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerLanguageModel(nn.Module):
    """A small GPT: token and learned position embeddings, causal blocks, linear head.

    LayerNorm works within a position and attention is causal, so with padding
    on the right an example's logits at its real positions depend on that
    example alone; ``attention_mask`` is accepted for the Hugging Face call
    signature and not needed.
    """

    def __init__(self, vocab_size: int = VOCAB_SIZE, d_model: int = 32, n_heads: int = 2,
                 n_layers: int = 2, max_len: int = 256):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.blocks = nn.Sequential(*(TransformerBlock(d_model, n_heads)
                                      for _ in range(n_layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_len:
            raise GradlabError(f"sequences of {length} tokens exceed the transformer's "
                               f"max_len={self.max_len}; raise max_len or shorten the data")
        positions = torch.arange(length, device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)
        return self.head(self.norm(self.blocks(x)))


def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many tokens ``lm_loss`` scores in ``batch``: labels 1..L-1 that are not -100.

    A tensor (no host sync); the engine sums it over a window and divides each
    micro-batch's summed loss by the total.
    """
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def lm_loss(model: nn.Module,
            batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy, scored tokens) for ``batch``, Hugging Face style.

    The logits at position t predict the label at t+1; labels of -100 are skipped.
    A model may return the logits or an object with ``.logits`` (a Hugging Face
    output). The sum, not the mean, so that the caller chooses the normaliser:
    the window's token count gives the big-batch gradient, the micro-batch's own
    count gives the mean of means. Computed in the logits' dtype.
    """
    output = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = getattr(output, "logits", output)
    predicted = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = batch["labels"][:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(predicted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, count_tokens(batch)


def next_token_accuracy(model: nn.Module,
                        batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(correctly predicted next tokens, scored tokens): the held-out accuracy of a LM."""
    output = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    predicted = getattr(output, "logits", output)[:, :-1].argmax(-1)
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    return ((predicted == targets) & scored).sum(), scored.sum()
