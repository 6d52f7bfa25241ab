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


def where(err: BaseException, skip: tuple[str, ...] = ()) -> tuple[str, int] | None:
    """(file, line) of the innermost frame of ``err``'s traceback outside the files and
    folders in ``skip`` (and Python's frozen import machinery): where the code that failed
    was, for a one-line message. None when there is no such frame."""
    frames = [f for f in _frames(err) if not f.filename.startswith("<frozen")
              and not any(f.filename == s or f.filename.startswith(s.rstrip("/") + "/")
                          for s in skip)]
    return (frames[-1].filename, frames[-1].lineno) if frames else None


def _frames(err: BaseException) -> list:
    import traceback  # only when something failed

    return traceback.extract_tb(err.__traceback__)
