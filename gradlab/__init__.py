"""gradlab: paired experiments on gradient accumulation in PyTorch.

The library API (the command line adapts it): ``gradlab.run(spec_or_name, overrides)``,
``gradlab.audit("pkg.module:train", accum_steps=N)``, ``gradlab.load_run(path)``. See
gradlab/api.py.
"""

__version__ = "0.1.0"

from gradlab.api import RunResult, audit, load_run, run  # noqa: E402  (after the version)
from gradlab.errors import GradlabError  # noqa: E402
from gradlab.lab.experiment import RunEnded  # noqa: E402

__all__ = ["GradlabError", "RunEnded", "RunResult", "__version__", "audit", "load_run", "run"]
