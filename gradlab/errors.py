"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit code 2; everything else
is a bug or a failed run and is reported as such.
"""

from typing import NoReturn


class GradlabError(Exception):
    """Bad input: the message names what is wrong and how to fix it."""


def unhandled(value: object) -> NoReturn:
    """A policy value that no case handles: a bug in gradlab, never a silent default."""
    raise AssertionError(f"unhandled policy value {value!r}")
