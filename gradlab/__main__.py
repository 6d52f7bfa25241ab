"""python -m gradlab: what torchrun runs (torchrun --nproc-per-node W -m gradlab run ddp)."""

from gradlab.cli import script

script()
