"""A contrastive setup built in: two augmented views of each digit, one shared encoder,
InfoNCE with in-batch negatives (the loss SimCLR, CLIP and sentence-transformers'
MultipleNegativesRanking share).

Each pair (view a, view b) of a digit is a positive; every other pair of the batch
the loss sees gives the negatives. So the loss of a batch is not a sum of
per-example terms: it couples the batch, and this setup says so by giving
``embed`` and ``coupled_loss`` instead of ``loss`` (see gradlab/setup.py). It is
built exactly as your own contrastive setup would be.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.setup import Examples, Setup

EMBEDDING = 32  # width of the embeddings the loss compares
SIDE = 8  # the digits are 8x8
PAIRS = 8  # pairs of views made of each training image


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view of each (n, 8, 8) image in [0, 1], flattened: shifted by up to a
    pixel each way (zeros shifted in), contrast scaled by 0.8..1.2, Gaussian noise 0.05."""
    n = len(images)
    padded = F.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(SIDE))[:, :, None]
    cols = (dx[:, None] + torch.arange(SIDE))[:, None, :]
    shifted = padded[torch.arange(n)[:, None, None], rows, cols]
    contrast = 0.8 + 0.4 * torch.rand(n, 1, 1, generator=g, dtype=images.dtype)
    noise = 0.05 * torch.randn(images.shape, generator=g, dtype=images.dtype)
    return (shifted * contrast + noise).flatten(1)


def digit_views(settings) -> Setup:
    """scikit-learn's 1797 digits: a fixed 20 % (359) held out with one pair of views each,
    the other 1438 with PAIRS pairs each; the views fixed, standardised pixel by pixel."""
    from sklearn.datasets import load_digits

    g = torch.Generator().manual_seed(1234)  # fixed data: the trial seed varies init and order
    images = torch.tensor(load_digits().data, dtype=torch.float64).reshape(-1, SIDE, SIDE) / 16
    images = images[torch.randperm(len(images), generator=g)]
    n_test = len(images) // 5
    test_images, train_images = images[:n_test], images[n_test:].repeat(PAIRS, 1, 1)
    test = (augment(test_images, g), augment(test_images, g))
    train = (augment(train_images, g), augment(train_images, g))
    mean, std = train[0].mean(0), train[0].std()  # standardised: embeddings start apart
    train, test = (tuple((v - mean) / std for v in views) for views in (train, test))
    loss = functools.partial(info_nce, temperature=settings.temperature)
    return Setup(encoder(settings), train, test=test, accuracy=retrieval_accuracy,
                 embed=embed_views, coupled_loss=loss)


def encoder(settings) -> nn.Module:
    """Linear-ReLU x depth, then a linear map to the embedding: shared by both views."""
    layers: list[nn.Module] = []
    width = SIDE * SIDE
    for _ in range(settings.depth):
        layers += [nn.Linear(width, settings.hidden), nn.ReLU()]
        width = settings.hidden
    return nn.Sequential(*layers, nn.Linear(width, EMBEDDING))


def embed_views(model: nn.Module, batch: Examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-length embeddings of both views: one row per pair in each."""
    a, b = batch
    return F.normalize(model(a), dim=1), F.normalize(model(b), dim=1)


def info_nce(embeddings: tuple[torch.Tensor, torch.Tensor], temperature: float
             ) -> tuple[torch.Tensor, int]:
    """Symmetric InfoNCE over the batch's pairs: pair i's view a must pick its own view b
    among all the batch's b views (and b its a), from cosine similarity / temperature.
    Returns the summed loss (the mean of the two directions, per pair) and the pairs."""
    za, zb = embeddings
    logits = za @ zb.T / temperature
    own = torch.arange(len(za), device=za.device)
    loss = (F.cross_entropy(logits, own, reduction="sum")
            + F.cross_entropy(logits.T, own, reduction="sum")) / 2
    return loss, len(za)


def retrieval_accuracy(model: nn.Module, batch: Examples) -> tuple[torch.Tensor, int]:
    """How many view a's nearest view b (cosine) among all the batch's is their own."""
    za, zb = embed_views(model, batch)
    nearest = (za @ zb.T).argmax(1)
    return (nearest == torch.arange(len(za), device=za.device)).sum(), len(za)
