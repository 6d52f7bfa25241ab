"""Users' own setups whose loss couples the batch (--set setup=contrastive_setups:NAME)."""

import torch
import torch.nn.functional as F

from gradlab.setup import Setup
from gradlab.zoo.contrastive import info_nce


def pairs(n: int = 32, width: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """n pairs of noisy views of n random points."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, width, generator=g, dtype=torch.float64)
    return x + 0.1 * torch.randn(n, width, generator=g, dtype=torch.float64), \
        x + 0.1 * torch.randn(n, width, generator=g, dtype=torch.float64)


def encoder(dropout: float = 0.0) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(8, 4)).double()


def embed_pairs(model, batch):
    a, b = batch
    return F.normalize(model(a), dim=1), F.normalize(model(b), dim=1)


def embed_first(model, batch):  # one tensor, not a tuple
    return model(batch[0])


def spread(embeddings):
    """A loss that couples the batch without pairs: each embedding's squared distance
    from the batch's mean embedding."""
    return (embeddings - embeddings.mean(0)).pow(2).sum(), len(embeddings)


def in_batch(settings):
    return Setup(encoder(), pairs(), embed=embed_pairs,
                 coupled_loss=lambda z: info_nce(z, temperature=0.5))


def with_dropout(settings):
    return Setup(encoder(dropout=0.5), pairs(), embed=embed_pairs,
                 coupled_loss=lambda z: info_nce(z, temperature=0.5))


def one_tensor(settings):
    return Setup(encoder(), pairs(), embed=embed_first, coupled_loss=spread)


def embed_only(settings):  # no coupled_loss to go with embed
    return Setup(encoder(), pairs(), embed=embed_pairs)


def both_losses(settings):  # a per-example loss and a coupled one
    return Setup(encoder(), pairs(), loss=lambda m, b: (m(b[0]).sum(), len(b[0])),
                 embed=embed_pairs, coupled_loss=spread)


def short_embeddings(settings):  # one embedding for the whole micro-batch
    return Setup(encoder(), pairs(), embed=lambda m, b: m(b[0]).mean(0, keepdim=True),
                 coupled_loss=spread)


def per_example(settings):  # an ordinary loss: nothing for gradcache to do
    return Setup(encoder(), pairs(), loss=lambda m, b: (m(b[0]).pow(2).sum(), len(b[0])))
