"""Built-in models and datasets, and the import-path hook for your own.

A dataset factory takes the arm's ``Settings`` and returns ``Data``; a model
factory takes ``(settings, data)`` and returns a ``torch.nn.Module`` whose
forward maps a batch of ``data.x_train`` to predictions for ``data.loss``.
Your own: ``--set model=mypkg.models:make_net`` (or ``dataset=...``), where
``make_net(settings, data)`` has that same signature.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable

from gradlab import setup
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
    module_name, colon, attr = name.partition(":")
    if not colon or not module_name or not attr:
        choices = f"choose one of {', '.join(table)} or give" if table else "give"
        raise GradlabError(f"unknown {kind} '{name}'; {choices} your own as "
                           f"'pkg.module:factory'")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr, None)
    except (Exception, SystemExit) as err:  # the user's module runs as it loads: anything goes
        missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
        if missing and (module_name + ".").startswith(missing + "."):  # not found itself
            raise GradlabError(f"{kind} '{name}': cannot import module '{module_name}' ({err}); "
                               f"check the name and that it is on PYTHONPATH") from None
        raise GradlabError(f"{kind} '{name}': importing module '{module_name}' failed: "
                           f"{_failure(err)}; fix the module, or import it yourself to see "
                           f"the whole traceback") from None
    if not callable(factory):
        raise GradlabError(f"{kind} '{name}': module '{module_name}' has no callable "
                           f"'{attr}'; give 'pkg.module:factory'")
    return factory


def _failure(err: BaseException) -> str:
    """'Kind: message in FILE, line N' for an exception raised while a module loads."""
    if isinstance(err, SyntaxError):  # the error is in the file, not where it was raised
        return f"{type(err).__name__}: {err.msg} in {err.filename}, line {err.lineno}"
    if isinstance(err, SystemExit):
        what = f"it called sys.exit({err.code!r})"
    else:
        first = str(err).strip().splitlines()
        what = f"{type(err).__name__}: {first[0]}" if first else type(err).__name__
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith("<frozen") and f.filename != __file__]
    return f"{what} in {frames[-1].filename}, line {frames[-1].lineno}" if frames else what
