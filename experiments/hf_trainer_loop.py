"""A tiny GPT-2 trained the way the Hugging Face docs write it: ``Trainer(model,
TrainingArguments(gradient_accumulation_steps=N, ...), train_dataset=...)``.

    pip install transformers     # or: pip install -e ".[hf]"
    gradlab audit experiments.hf_trainer_loop:train --accum-steps 4
    gradlab audit experiments.hf_trainer_loop:train_dividing_twice --accum-steps 4

The model is random-init (nothing is downloaded) and the text is the source of Python's own
json package, one byte a token. Trainer handles the accumulation itself: it hands the model
``num_items_in_batch``, the window's count of label tokens, so each micro-batch's loss is its
token sum over the window's token count, and the N backward() calls add up to the big
batch's token mean. Every sequence has the same length, so that is also the mean of the N
micro-batch means. It then clips that window's gradient once (max_grad_norm) and steps.
Nothing in this file knows about gradlab.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging

logging.set_verbosity_error()  # no "Training ..." banners or warnings on stderr

VOCAB, SEQ_LEN = 128, 32  # bytes of ASCII text, one token each; 32 tokens a sequence


def dataset() -> list[dict[str, torch.Tensor]]:
    """Equal-length blocks of token ids (labels = inputs: GPT-2 shifts them itself)."""
    ids = torch.tensor(list(Path(json.__file__).read_bytes()), dtype=torch.long) % VOCAB
    blocks = ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)  # ~440 sequences
    return [{"input_ids": b, "labels": b} for b in blocks]


class DividingTwice(Trainer):
    """The mistake: dividing the loss by N as a plain loop must, although Trainer already
    normalised it over the whole window (num_items_in_batch): the step gets 1/N of it."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss / self.args.gradient_accumulation_steps


def train(micro_batch_size: int, accum_steps: int, max_steps: int,
          trainer_class: type[Trainer] = Trainer, max_grad_norm: float = 1.0) -> None:
    torch.manual_seed(0)  # the same initial weights whatever the batch size
    # no dropout: its masks depend on the batch's shape, so the two runs would draw different ones
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=SEQ_LEN,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).double()  # float64: the twins agree to ~1e-15
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=micro_batch_size,
            gradient_accumulation_steps=accum_steps, max_steps=max_steps,
            learning_rate=1e-3, lr_scheduler_type="linear", seed=0,  # seed: the shuffle too
            max_grad_norm=max_grad_norm,  # Trainer's default: clips the window's gradient once
            use_cpu=True, dataloader_drop_last=True, dataloader_num_workers=0,
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
        trainer = trainer_class(model=model, args=args, train_dataset=dataset())
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics to stdout
        trainer.train()


def train_dividing_twice(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """The mistake: compute_loss divides by N too, so the window's gradient is 1/N of it
    before Trainer clips it (max_grad_norm=1.0 cuts the big batch's |g| ~ 1.7 to 1 and leaves
    the small one alone: the audit reads the 1/N off the losses, not the clipped norms)."""
    train(micro_batch_size, accum_steps, max_steps, trainer_class=DividingTwice)
