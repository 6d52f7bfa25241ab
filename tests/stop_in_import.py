"""A factory module that receives a stop signal while Python imports it, and (as some libraries'
guarded imports do: ``try: import x`` / ``except: ...``) swallows whatever that signal raised
there. A stop raised inside an import is lost this way and leaves modules half-loaded, so gradlab
must hold the stop until the import is done and act on it then.

Reached with --set model=stop_in_import:tiny_net (tests/ on PYTHONPATH); the signal is
$GRADLAB_TEST_SIGNAL (a number; SIGTERM by default)."""

import os
import signal
import time
from pathlib import Path

import torch

try:
    os.kill(os.getpid(), int(os.environ.get("GRADLAB_TEST_SIGNAL", signal.SIGTERM)))
    time.sleep(0.5)  # the handler has run by now, inside this module's import
    said = "imported whole"
except BaseException as raised:  # noqa: BLE001  (what such a library does)
    said = f"{type(raised).__name__} raised inside the import"
if "GRADLAB_TEST_MARKER" in os.environ:
    Path(os.environ["GRADLAB_TEST_MARKER"]).write_text(said)


def tiny_net(settings, data):
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
