"""python -m gradlab.cli: what the `gradlab` script runs."""

from gradlab.cli import script

script()
