"""Users' own setups for the tests (--set setup=user_setups:NAME): one good, the rest broken."""

import torch
import torch.nn.functional as F

from gradlab.setup import Setup


def regression(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, x.sum(1, keepdim=True)


def summed_mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y, reduction="sum"), len(x)


def good(settings):
    return Setup(torch.nn.Linear(3, 1), regression(), summed_mse)


def no_units(settings):  # the loss returns the loss alone
    return Setup(torch.nn.Linear(3, 1), regression(), lambda m, b: summed_mse(m, b)[0])


def zero_units(settings):
    """Sequences whose last examples are all padding: a micro-batch with nothing to score."""
    ids = torch.ones(64, 5, dtype=torch.long)
    labels = ids.clone()
    labels[32:] = -100

    def loss(model, batch):
        logits = model(batch["ids"])
        return (F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                ignore_index=-100, reduction="sum"),
                (batch["labels"] != -100).sum())

    return Setup(torch.nn.Embedding(3, 3), {"ids": ids, "labels": labels}, loss,
                 units=lambda b: (b["labels"] != -100).sum())


def ragged(settings):  # tensors of different lengths along dim 0
    x, y = regression()
    return Setup(torch.nn.Linear(3, 1), {"x": x, "y": y[:10]}, summed_mse)


def not_tensors(settings):
    x, y = regression()
    return Setup(torch.nn.Linear(3, 1), {"x": x, "y": y.tolist()}, summed_mse)


def wrong_output(settings):  # two outputs for one target: the loss cannot broadcast them
    def loss(model, batch):
        x, y = batch
        return F.mse_loss(model(x), y.expand(-1, 3), reduction="sum"), len(x)

    return Setup(torch.nn.Linear(3, 2), regression(), loss)


def raises(settings):
    raise RuntimeError("cannot find my tokenizer")


def not_a_setup(settings):
    return torch.nn.Linear(3, 1)


def miscounted(settings):  # units() counts examples, the loss counts elements
    def loss(model, batch):
        x, y = batch
        return F.mse_loss(model(x), y, reduction="sum"), y.numel() * 2

    return Setup(torch.nn.Linear(3, 1), regression(), loss)


def loud_regression(settings):
    """Targets 50 times larger than the inputs: under float16 autocast a GradScaler's first
    scales overflow the backward, so its first steps are skipped while the scale backs off."""
    x, y = regression()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
    return Setup(model, (x, 50 * y), summed_mse)


class BreaksForSeed1(torch.nn.Linear):
    """A Linear whose forward fails in the trial with seed 1: preflight, which builds each
    setup once whatever its seed, never meets it; a worker does, mid-run."""

    def __init__(self, seed: int):
        super().__init__(3, 1)
        self.seed = seed

    def forward(self, x):
        if self.seed == 1:
            raise FloatingPointError("overflow in the user's model")
        return super().forward(x)


def breaks_for_seed_1(settings):
    return Setup(BreaksForSeed1(settings.seed), regression(), summed_mse)


def refuses_seed_1(settings):  # bad input that only the trial with seed 1 meets
    if settings.seed == 1:
        raise ValueError("no data for seed 1")
    return good(settings)
# ----------------------------------------------------------------------------- ranks
# Setups for data-parallel runs (test_ddp.py): good until a data-parallel arm trains (the
# loss is given a DDP replica, not the model itself as in preflight and the baseline).

def fails_on_rank_1(settings):
    """Rank 1's loss raises; rank 0's sleeps meanwhile, outside any collective, as a long
    computation would, so that only the launcher's stop can end it."""
    import time

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    def loss(model, batch):
        if isinstance(model, DistributedDataParallel):
            if dist.get_rank() == 1:
                raise RuntimeError("boom on rank 1")
            time.sleep(600)
        return summed_mse(model, batch)

    return Setup(torch.nn.Linear(3, 1), regression(), loss)


def sleeps_once_parallel(settings):
    """Every rank's loss sleeps: a data-parallel run that only a stop ends."""
    import time

    from torch.nn.parallel import DistributedDataParallel

    def loss(model, batch):
        if isinstance(model, DistributedDataParallel):
            time.sleep(600)
        return summed_mse(model, batch)

    return Setup(torch.nn.Linear(3, 1), regression(), loss)


def exits_in_loss(settings, calls_before_exit: int = 0):
    """A loss that ends the process with sys.exit(4) at its call number calls_before_exit + 1
    (0: the first, which gradlab's check before the run makes)."""
    calls = []

    def loss(model, batch):
        calls.append(1)
        if len(calls) > calls_before_exit:
            raise SystemExit(4)
        return summed_mse(model, batch)

    return Setup(torch.nn.Linear(3, 1), regression(), loss)


def exits_while_training(settings):
    return exits_in_loss(settings, calls_before_exit=60)


ALLOCATOR_SAYS = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                  "allocate memory: you tried to allocate 268435456 bytes. Error code 12 "
                  "(Cannot allocate memory)")


def runs_out_of_memory_while_training(settings):
    """At its 61st call (inside a trial, after gradlab's checks) the loss meets the CPU
    allocator's failure, and what surfaces is a later error raised while handling it, as a
    half-made gradient gives (torch's "grad_dtype" complaint)."""
    calls = []

    def loss(model, batch):
        calls.append(1)
        if len(calls) > 60:
            try:
                raise RuntimeError(ALLOCATOR_SAYS)
            except RuntimeError:
                raise TypeError("attempting to assign a gradient with dtype 'float' to a "
                                "tensor with grad_dtype 'Double'") from None
        return summed_mse(model, batch)

    return Setup(torch.nn.Linear(3, 1), regression(), loss)
