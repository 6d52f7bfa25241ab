"""Built-in models and datasets, and the import-path hook for your own.

A dataset factory takes the arm's ``Settings`` and returns ``Data``; a model
factory takes ``(settings, data)`` and returns a ``torch.nn.Module`` whose
forward maps a batch of ``data.x_train`` to predictions for ``data.loss``.
Your own: ``--set model=mypkg.models:make_net`` (or ``dataset=...``), where
``make_net(settings, data)`` has that same signature.
"""

from __future__ import annotations

from collections.abc import Callable

from gradlab import entrypoints, setup
from gradlab.config import catalog
from gradlab.errors import GradlabError
from gradlab.zoo import contrastive, text
from gradlab.zoo.data import DATASETS, Data
from gradlab.zoo.models import MODELS

__all__ = ["Data", "DATASETS", "LOSSES", "MODELS", "SETUPS", "resolve"]

# whole training setups (model, examples, loss) built in: --set setup=NAME
SETUPS = {name: (factory, catalog.SETUPS[name]) for name, factory in {
    "digit-views": contrastive.digit_views,
}.items()}

# Data.loss -> (loss, units, accuracy) of the Setup built from a model and a dataset
LOSSES = {
    "mse": (setup.mse_loss, None, None),
    "cross_entropy": (setup.cross_entropy_loss, None, setup.class_accuracy),
    "next-token": (text.lm_loss, text.count_tokens, text.next_token_accuracy),
}


def resolve(kind: str, name: str) -> Callable:
    """A built-in factory by name, or the user's own from 'pkg.module:callable'."""
    table = {"model": MODELS, "dataset": DATASETS, "setup": SETUPS}[kind]
    if name in table:
        return table[name][0]
    path = entrypoints.parse(name)
    if path is None:
        choices = f"choose one of {', '.join(table)} or give" if table else "give"
        raise GradlabError(f"unknown {kind} '{name}'; {choices} your own as "
                           f"'pkg.module:factory'")
    try:
        _, factory = entrypoints.load(path)
    except entrypoints.NotFound as err:
        raise GradlabError(f"{kind} '{name}': cannot import module '{path.module}' ({err}); "
                           f"check the name and that it is on PYTHONPATH") from None
    except entrypoints.LoadFailed as err:
        raise GradlabError(f"{kind} '{name}': importing module '{path.module}' failed: "
                           f"{entrypoints.failure(err.error)}; fix the module, or import it "
                           f"yourself to see the whole traceback") from None
    if not callable(factory):
        raise GradlabError(f"{kind} '{name}': module '{path.module}' has no callable "
                           f"'{path.name}'; give 'pkg.module:factory'")
    return factory
