"""Shared by the benchmarks: the machine in one line, and their sections of RESULTS.md.

A benchmark prints its section (a "## " heading, the machine, the command, a table);
with --write it also replaces that section in benchmarks/RESULTS.md (or appends it), so
one command regenerates its table.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        load = "load average {:.1f}, {:.1f}, {:.1f}".format(*os.getloadavg())
    except OSError:
        load = "load unknown"
    return (f"{cpu}, {cores} usable cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()} ({load} when it started)")


def publish(section: str, write: bool) -> None:
    """Print a section; with ``write``, put it in RESULTS.md in place of the one with the
    same heading (everything up to the next "## " heading), or at the end."""
    print(section)
    if not write:
        return
    heading = section.splitlines()[0]
    lines = RESULTS.read_text(encoding="utf-8").splitlines() if RESULTS.exists() else []
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        lines[start:end] = [*section.rstrip("\n").splitlines(), ""]
    else:
        lines += ["", *section.rstrip("\n").splitlines()]
    RESULTS.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    print(f"(written into {RESULTS})")
