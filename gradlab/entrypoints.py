"""'pkg.module:name': how a user points gradlab at their own code (a model, dataset or setup
factory for `gradlab run`, the train function for `gradlab audit`), parsed, found and imported
in one place. Torch-free: the audit's parent checks an entrypoint without importing torch or
the user's module.

The callers phrase the messages (a factory and a train function are explained differently);
this module says what went wrong: no such module, or the module raised while it loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from gradlab.errors import GradlabError, where


class ImportPath(NamedTuple):
    module: str
    name: str


class NotFound(Exception):
    """The module itself does not exist (not: something it imports is missing)."""


class LoadFailed(Exception):
    """The module's top level raised as it loaded; ``error`` is what it raised."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def parse(text: str) -> ImportPath | None:
    """'pkg.module:name' split in two; None when either half is missing."""
    module, colon, name = text.partition(":")
    return ImportPath(module, name) if colon and module and name else None


def search_here() -> None:
    """Put the working folder on sys.path: `gradlab audit mymodule:train` is run from the
    folder that holds mymodule.py, as `python -c 'import mymodule'` would find it."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def subprocess_path() -> str:
    """PYTHONPATH for a gradlab process this one starts (an audit's worker, a rank): the
    working folder and this process's sys.path, so the child imports the user's modules
    from where this process could, and the folder holding the gradlab package this process
    imported. That last one keeps a folder named gradlab in the working folder (a clone's
    root, run from its parent) from standing in for the package: an editable install is
    found by a finder, not on sys.path, and a folder on sys.path without __init__.py would
    be taken for a namespace package, while a real package anywhere on the path wins."""
    import gradlab

    package_home = str(Path(gradlab.__file__).resolve().parent.parent)
    paths = [os.getcwd(), *(p for p in sys.path if p and Path(p).is_dir()),
             *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), package_home]
    return os.pathsep.join(dict.fromkeys(paths))


def exists(module: str) -> bool:
    """Whether the module can be found, without running it (its parent packages do run)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # its parent package is missing or broken
        return False


def load(path: ImportPath) -> tuple[ModuleType, Any]:
    """The module imported, and its attribute ``path.name`` (None when it has none).

    NotFound when the module does not exist; LoadFailed when importing it raised anything,
    SystemExit included: the user's module runs as it loads, and anything goes there.
    """
    try:
        module = importlib.import_module(path.module)
        return module, getattr(module, path.name, None)
    except (Exception, SystemExit) as err:
        missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
        if missing and (path.module + ".").startswith(missing + "."):  # not found itself
            raise NotFound(str(err)) from None
        raise LoadFailed(err) from None


def failure(err: BaseException) -> str:
    """'Kind: message in FILE, line N' for an exception raised while a module loads."""
    if isinstance(err, SyntaxError):  # the error is in the file, not where it was raised
        return f"{type(err).__name__}: {err.msg} in {err.filename}, line {err.lineno}"
    if isinstance(err, SystemExit):
        what = f"it called sys.exit({err.code!r})"
    else:
        first = str(err).strip().splitlines()
        what = f"{type(err).__name__}: {first[0]}" if first else type(err).__name__
    found = where(err, skip=(__file__,))
    return f"{what} in {found[0]}, line {found[1]}" if found else what


def import_path_of(fn: Callable, what: str = "function") -> str:
    """'module:name' of a function that a fresh process can import by that name: a top-level
    function of an importable module; else a GradlabError that says what to pass instead."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    shown = name or repr(fn)
    if not module or not name or module == "__main__" or \
            getattr(sys.modules.get(module), name, None) is not fn:
        where_from = " (defined in __main__, which another process cannot import)" \
            if module == "__main__" else ""
        raise GradlabError(f"{what} {shown}{where_from} cannot be imported by its name; pass a "
                           f"module-level {what} of an importable module, or its "
                           f"'pkg.module:{what}' text")
    return f"{module}:{name}"
