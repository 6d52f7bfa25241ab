"""The `tokens` experiment's pieces: corpus, padded examples, per-example models, token loss.

The last tests show, with a plain loop, the maths the experiment measures: on
variable-length sequences, summed token loss / the window's token count
accumulates to the big-batch gradient, and the mean of micro-batch means does not.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gradlab.errors import GradlabError
from gradlab.zoo.text import (
    PAD_ID,
    VOCAB_SIZE,
    GRULanguageModel,
    TransformerLanguageModel,
    count_tokens,
    docstring_corpus,
    lm_loss,
    token_examples,
)

MODELS = [GRULanguageModel, TransformerLanguageModel]


def make_model(model_class, dtype=torch.float64, seed=0) -> torch.nn.Module:
    """A model with weights fixed by ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_class().to(dtype)


def lengths_of(batch) -> torch.Tensor:
    return batch["attention_mask"].sum(dim=1)


# --- corpus ---------------------------------------------------------------------------------


def test_corpus_is_ascii_one_line_pieces_and_deterministic():
    pieces = docstring_corpus()
    assert len(pieces) > 100 and sum(map(len, pieces)) > 50_000
    assert pieces[0].startswith("Command-line parsing library")  # argparse, first in the list
    for piece in pieces:
        assert piece and piece == piece.strip()
        assert all(32 <= ord(c) < VOCAB_SIZE for c in piece), piece  # no NUL, tab, newline
        assert "  " not in piece
    assert len(set(pieces)) == len(pieces)

    docstring_corpus.cache_clear()
    assert docstring_corpus() == pieces


# --- examples -------------------------------------------------------------------------------


def test_token_examples_layout():
    batch = token_examples(1000, min_len=8, max_len=64, seed=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for tensor in batch.values():
        assert tensor.shape == (1000, 64) and tensor.dtype == torch.long

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    lengths = lengths_of(batch)
    # Right padding: the mask is 1 for exactly the first `length` positions.
    torch.testing.assert_close(mask, (torch.arange(64) < lengths[:, None]).long(), rtol=0, atol=0)
    real = mask.bool()
    assert (ids[~real] == PAD_ID).all() and (ids[real] != PAD_ID).all()
    assert ((ids >= 0) & (ids < VOCAB_SIZE)).all()
    torch.testing.assert_close(labels[real], ids[real], rtol=0, atol=0)
    assert (labels[~real] == -100).all()
    assert int(lengths.min()) == 8 and int(lengths.max()) == 64
    assert len(lengths.unique()) == 57  # every length in 8..64 occurs
    assert int(count_tokens(batch)) == int((lengths - 1).sum())

    text = "\n".join(docstring_corpus())
    for row, length in zip(ids[:20], lengths[:20], strict=True):
        assert bytes(row[:length].tolist()).decode("ascii") in text


def test_equal_lengths_have_no_padding():
    batch = token_examples(16, min_len=24, max_len=24, seed=3)
    assert (batch["attention_mask"] == 1).all() and (batch["labels"] != -100).all()
    assert batch["input_ids"].shape == (16, 24)


def test_token_examples_are_seeded():
    first, again = token_examples(8, 4, 32, seed=7), token_examples(8, 4, 32, seed=7)
    other = token_examples(8, 4, 32, seed=8)
    for key in first:
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=0)
    assert not torch.equal(first["input_ids"], other["input_ids"])
    assert not torch.equal(lengths_of(first), lengths_of(other))


@pytest.mark.parametrize(("args", "setting"), [
    ((0, 4, 8), "n_examples"),
    ((4, 1, 8), "min_len"),
    ((4, 8, 7), "max_len"),
    ((4, 2, 10**9), "max_len"),
])
def test_bad_arguments_raise_one_line(args, setting):
    with pytest.raises(GradlabError) as err:
        token_examples(*args, seed=0)
    message = str(err.value)
    assert message.startswith(f"{setting}=") and "set " in message and "\n" not in message


# --- loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lm_loss_is_summed_next_token_cross_entropy(dtype):
    model = make_model(GRULanguageModel, dtype)
    batch = token_examples(6, 3, 12, seed=1)
    loss_sum, units = lm_loss(model, batch)
    assert loss_sum.dtype == dtype and loss_sum.shape == () and units.shape == ()

    logits = model(batch["input_ids"])
    expected = sum(F.cross_entropy(logits[row, :length - 1], batch["input_ids"][row, 1:length],
                                   reduction="sum")
                   for row, length in enumerate(lengths_of(batch).tolist()))
    torch.testing.assert_close(loss_sum, expected, rtol=1e-6 if dtype == torch.float32 else 1e-13,
                               atol=0)
    assert int(units) == int((lengths_of(batch) - 1).sum())
    torch.testing.assert_close(units, count_tokens(batch), rtol=0, atol=0)


def test_lm_loss_reads_logits_from_an_output_object():
    model = make_model(TransformerLanguageModel)
    batch = token_examples(4, 3, 10, seed=2)

    def wrapped(input_ids, attention_mask=None):
        return SimpleNamespace(logits=model(input_ids, attention_mask))

    torch.testing.assert_close(lm_loss(wrapped, batch), lm_loss(model, batch), rtol=0, atol=0)


# --- models: one example's logits depend on that example alone -------------------------------


@pytest.mark.parametrize("model_class", MODELS)
@pytest.mark.parametrize("training", [True, False])
def test_logits_are_per_example(model_class, training):
    model = make_model(model_class).train(training)
    batch = token_examples(8, 4, 24, seed=5)
    real = batch["attention_mask"].bool()
    logits = model(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (8, 24, VOCAB_SIZE) and logits.dtype == torch.float64
    assert torch.isfinite(logits).all()  # padded positions included

    rows = slice(2, 5)
    micro = model(batch["input_ids"][rows], batch["attention_mask"][rows])
    torch.testing.assert_close(micro[real[rows]], logits[rows][real[rows]], rtol=1e-12, atol=1e-12)

    more_padding = F.pad(batch["input_ids"], (0, 40), value=PAD_ID)
    padded = model(more_padding, F.pad(batch["attention_mask"], (0, 40)))
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:, :24][real], logits[real], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_class", MODELS)
def test_logits_are_causal(model_class):
    """Changing token 5 changes the logits from position 5 on, and none before."""
    model = make_model(model_class)
    ids = token_examples(2, 12, 12, seed=4)["input_ids"]
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] % (VOCAB_SIZE - 1)) + 1  # another non-pad token
    before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :5], before[:, :5], rtol=1e-12, atol=1e-12)
    assert (after[:, 5:] - before[:, 5:]).abs().amax(dim=-1).min() > 1e-8


def test_transformer_rejects_sequences_longer_than_max_len():
    model = TransformerLanguageModel(max_len=16)
    with pytest.raises(GradlabError, match="max_len=16"):
        model(torch.ones(1, 17, dtype=torch.long))


# --- the maths the experiment shows --------------------------------------------------------


def accumulated_grad(model, batch, n_micro: int, normalise: str) -> torch.Tensor:
    """The flat gradient after N micro-batch backwards of a plain accumulation loop.

    "global": each micro-batch's summed loss / the window's token count.
    "mean-of-means": each micro-batch's mean token loss / N (the 2024 bug).
    """
    model.zero_grad()
    window_tokens = count_tokens(batch)
    for chunk in zip(*(t.chunk(n_micro) for t in batch.values()), strict=True):
        micro = dict(zip(batch, chunk, strict=True))
        loss_sum, tokens = lm_loss(model, micro)
        if normalise == "global":
            loss = loss_sum / window_tokens
        else:
            loss = loss_sum / tokens / n_micro
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def big_batch_grad(model, batch) -> torch.Tensor:
    return accumulated_grad(model, batch, 1, "global")


def relative_error(grad, reference) -> float:
    return float((grad - reference).norm() / reference.norm())


PAIRS = [(16, 2), (8, 4), (4, 8)]  # (micro_batch, N): effective batch 32 throughout


@functools.cache
def window(model_class, min_len: int):
    """(model, 32 examples of min_len..64 tokens, the big-batch gradient), shared by the pairs."""
    model = make_model(model_class)
    batch = token_examples(32, min_len=min_len, max_len=64, seed=0)
    return model, batch, big_batch_grad(model, batch)


@pytest.mark.parametrize("model_class", MODELS)
@pytest.mark.parametrize(("micro_batch", "n_micro"), PAIRS)
def test_global_token_normalisation_is_the_big_batch(model_class, micro_batch, n_micro):
    model, batch, big = window(model_class, min_len=8)
    assert len(batch["input_ids"]) == micro_batch * n_micro
    lengths = lengths_of(batch)
    assert lengths.max() >= 5 * lengths.min()
    tokens_per_micro = [int(count_tokens({"labels": t})) for t in batch["labels"].chunk(n_micro)]
    assert len(set(tokens_per_micro)) > 1  # the micro-batches hold different token counts

    global_norm = accumulated_grad(model, batch, n_micro, "global")
    torch.testing.assert_close(global_norm, big, rtol=1e-12, atol=1e-15)

    mean_of_means = accumulated_grad(model, batch, n_micro, "mean-of-means")
    assert relative_error(mean_of_means, big) > 1e-3


@pytest.mark.parametrize("model_class", MODELS)
@pytest.mark.parametrize(("micro_batch", "n_micro"), PAIRS)
def test_mean_of_means_is_exact_when_lengths_are_equal(model_class, micro_batch, n_micro):
    model, batch, big = window(model_class, min_len=64)
    assert len(batch["input_ids"]) == micro_batch * n_micro
    assert (lengths_of(batch) == 64).all()
    mean_of_means = accumulated_grad(model, batch, n_micro, "mean-of-means")
    torch.testing.assert_close(mean_of_means, big, rtol=1e-12, atol=1e-15)
