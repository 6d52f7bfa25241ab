"""gradlab: paired experiments on gradient accumulation in PyTorch.

The library API (the command line adapts it): ``gradlab.run(spec_or_name, overrides)``,
``gradlab.audit("pkg.module:train", accum_steps=N)``, ``gradlab.load_run(path)``. See
gradlab/api.py.
"""

__version__ = "0.1.0"

import os as _os  # noqa: E402

if _os.environ.pop("GRADLAB_FORK_SERVER", None):  # (lab/parallel.py: FORK_SERVER)
    # this process is the fork server of a run's workers, importing torch for seconds before
    # multiprocessing makes it ignore Ctrl-C: ignore it from here on (the run handles it)
    import signal as _signal

    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)

from gradlab.api import RunResult, audit, load_run, run  # noqa: E402  (after the version)
from gradlab.errors import GradlabError  # noqa: E402
from gradlab.lab.experiment import RunEnded  # noqa: E402

__all__ = ["GradlabError", "RunEnded", "RunResult", "__version__", "audit", "load_run", "run"]
