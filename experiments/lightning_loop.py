"""The tutorial's problem written the way PyTorch Lightning's docs write a model, trained by
Lightning's own loop with ``Trainer(accumulate_grad_batches=N)``.

    pip install pytorch-lightning     # or: pip install -e ".[lightning]"
    gradlab audit experiments.lightning_loop:train --accum-steps 4
    gradlab audit experiments.lightning_loop:train_with_validation --accum-steps 4
    gradlab audit experiments.lightning_loop:train_dividing_twice --accum-steps 4

Under automatic optimization Lightning divides each micro-batch's loss by
accumulate_grad_batches and calls ``optimizer.step(closure)``: the window's last
micro-batch runs its forward and backward *inside* the step, in the closure, so what
the optimizer applies exists only once the closure has run. Nothing in this file knows
about gradlab.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from experiments.tutorial_loop import setup


class Classifier(pl.LightningModule):
    def __init__(self, model: nn.Module, optimizer_factory, scheduler_factory, loss_fn,
                 divide_by: int = 1):
        super().__init__()
        self.model, self.loss_fn, self.divide_by = model, loss_fn, divide_by
        self.optimizer_factory, self.scheduler_factory = optimizer_factory, scheduler_factory

    def training_step(self, batch, batch_idx):
        x, y = batch
        # Lightning divides the loss by accumulate_grad_batches itself; divide_by > 1 is the
        # mistake of dividing it once more, as a plain loop must
        return self.loss_fn(self.model(x), y) / self.divide_by

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss_fn(self.model(x), y))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.model.parameters())
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "step"}}


def train(micro_batch_size: int, accum_steps: int, max_steps: int,
          validate: bool = False, divide_twice: bool = False) -> None:
    loader, model, optimizer, scheduler, loss_fn = setup(micro_batch_size, max_steps)
    # the tutorial's optimizer and schedule, built again on the module's parameters
    lr, momentum = optimizer.defaults["lr"], optimizer.defaults["momentum"]
    module = Classifier(
        model, lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum),
        lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1,
                                                      total_iters=max_steps),
        loss_fn, divide_by=accum_steps if divide_twice else 1)
    x, y = loader.dataset.tensors
    held_out = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="64-true",
                         accumulate_grad_batches=accum_steps, max_steps=max_steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1 if validate else 0,
                         val_check_interval=accum_steps if validate else None)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=held_out if validate else None)


def train_with_validation(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """The same, with a validation loop every window (its forwards must not count)."""
    train(micro_batch_size, accum_steps, max_steps, validate=True)


def train_dividing_twice(micro_batch_size: int, accum_steps: int, max_steps: int) -> None:
    """The mistake: training_step divides by N too, so the window's gradient is 1/N of it."""
    train(micro_batch_size, accum_steps, max_steps, divide_twice=True)
