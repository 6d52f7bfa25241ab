"""Built-in datasets. Nothing is downloaded: digits ship with scikit-learn."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradlab.config import catalog


@dataclass(frozen=True)
class Data:
    """What a dataset factory returns: inputs and targets, or a dict of tensors (targets in it).

    ``loss`` names how predictions are scored: "mse" (targets shaped like the
    predictions), "cross_entropy" (class ids), or "next-token" (a dict batch with
    input_ids, attention_mask and labels, -100 at padding; see zoo/text.py).
    """
    x_train: torch.Tensor | dict[str, torch.Tensor]
    y_train: torch.Tensor | None = None
    x_test: torch.Tensor | dict[str, torch.Tensor] | None = None
    y_test: torch.Tensor | None = None
    loss: str = "mse"
    shuffle: bool = True  # False keeps the examples in the order given (the toy)

    @property
    def train(self):
        return self.x_train if self.y_train is None else (self.x_train, self.y_train)

    @property
    def test(self):
        if self.x_test is None:
            return None
        return self.x_test if self.y_test is None else (self.x_test, self.y_test)

    @property
    def n_outputs(self) -> int:
        if self.loss == "cross_entropy":
            return int(self.y_train.max()) + 1
        return self.y_train.shape[1] if self.y_train.dim() > 1 else 1

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def toy_pairs(settings) -> Data:
    """The StackOverflow toy: two examples, x=4 then x=2, target 2x, in that order."""
    x = torch.tensor([[4.0], [2.0]], dtype=torch.float64)
    return Data(x, 2 * x, loss="mse", shuffle=False)


def regression(settings) -> Data:
    """Synthetic linear regression with noise: 1024 train and 256 test examples, 10 features."""
    g = torch.Generator().manual_seed(1234)  # fixed data; the trial seed varies init and order
    x = torch.randn(1280, 10, generator=g, dtype=torch.float64)
    w = torch.randn(10, 1, generator=g, dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(1280, 1, generator=g, dtype=torch.float64)
    return Data(x[:1024], y[:1024], x[1024:], y[1024:], loss="mse")


def digits(settings) -> Data:
    """scikit-learn's 1797 8x8 digit images, scaled to [0, 1]; a fixed 20 % held out."""
    pixels, labels = digits_table()
    x = torch.tensor(pixels, dtype=torch.float64).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    n_test = len(x) // 5
    return Data(x[n_test:], y[n_test:], x[:n_test], y[:n_test], loss="cross_entropy")


def digits_table():
    """The digits' pixels (1797 x 64, values 0..16) and labels, as sklearn.datasets.load_digits
    returns them, read from the file scikit-learn ships. Importing scikit-learn takes about
    1 s, paid again by every worker process, so the file is found without importing it (and
    load_digits is the fallback should its place in the package ever change)."""
    import gzip
    import importlib.util
    from pathlib import Path

    import numpy as np

    found = importlib.util.find_spec("sklearn")  # locates the package, runs none of it
    table = Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz" if found else None
    if table is None or not table.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data, bunch.target
    with gzip.open(table, mode="rt", encoding="utf-8") as text:
        rows = np.loadtxt(text, delimiter=",")
    return rows[:, :-1], rows[:, -1].astype(int)


def docstrings(settings) -> Data:
    """Byte-level next-token prediction on standard-library docstrings: 1024 train and 256
    held-out sequences, lengths uniform in [min_len, max_len], right-padded."""
    from gradlab.zoo.text import token_examples

    examples = token_examples(1280, settings.min_len, settings.max_len, seed=1234)
    train = {k: v[:1024] for k, v in examples.items()}
    test = {k: v[1024:] for k, v in examples.items()}
    return Data(train, x_test=test, loss="next-token")


def two_tasks(settings) -> Data:
    """Two regression tasks on the same 10 features, each with its own weights; task 1 is rare
    (1 example in 8). The last input column holds the task (0 or 1)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1280, 10, generator=g, dtype=torch.float64)
    task = (torch.rand(1280, generator=g) < 1 / 8).to(torch.float64)
    w = torch.randn(2, 10, generator=g, dtype=torch.float64)
    y = (x * w[task.long()]).sum(1, keepdim=True) \
        + 0.1 * torch.randn(1280, 1, generator=g, dtype=torch.float64)
    x = torch.cat([x, task[:, None]], dim=1)
    return Data(x[:1024], y[:1024], x[1024:], y[1024:], loss="mse")


DATASETS = {name: (factory, catalog.DATASETS[name]) for name, factory in {
    "toy-pairs": toy_pairs,
    "regression": regression,
    "digits": digits,
    "docstrings": docstrings,
    "two-tasks": two_tasks,
}.items()}
