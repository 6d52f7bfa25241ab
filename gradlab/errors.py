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


def out_of_memory(err: BaseException) -> str | None:
    """'out of memory (an allocation of 512 MiB failed)' when ``err``, or an error it caused
    or was raised while handling, is the allocator giving up (CPU or CUDA); else None. A
    failed allocation can leave tensors half-made, so the error that surfaces is often a
    later one (a gradient of the wrong dtype): the chain is searched."""
    import re

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or \
                "can't allocate memory" in text or "out of memory" in text.lower():
            tried = re.search(r"allocate (\d+) bytes", text) or \
                re.search(r"allocate ([\d.]+ [KMGT]iB)", text)
            if tried is None:
                return "out of memory"
            size = tried.group(1)
            if size.isdigit():
                size = f"{int(size) / 2**20:.0f} MiB"
            return f"out of memory (an allocation of {size} failed)"
        err = err.__cause__ or err.__context__
    return None
