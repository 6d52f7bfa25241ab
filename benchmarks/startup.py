"""How long the commands that do not compute take to answer: `gradlab --help`, `--version`,
`list`, `run --help`, `show NAME --no-estimate`.

Not a test: run it on an idle machine; it prints its section of benchmarks/RESULTS.md
(machine named), and with --write puts it there:

    python benchmarks/startup.py               # 9 runs of each command, medians
    python benchmarks/startup.py --busy 2      # with 2 busy loops beside it

Each run is the installed `gradlab` script in a fresh process, its output thrown away;
the time is the wall clock from starting it to its exit, as `time` reports it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results import machine, publish

COMMANDS = [["--version"], ["--help"], ["list"], ["run", "--help"],
            ["show", "equivalence", "--no-estimate"]]


def wall_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--busy", type=int, default=0, help="busy loops to run beside it")
    parser.add_argument("--write", action="store_true",
                        help="also replace this section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    gradlab = str(Path(sys.executable).with_name("gradlab"))
    started_on = machine()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    times: dict[str, list[float]] = {" ".join(c): [] for c in COMMANDS}
    try:
        wall_seconds([gradlab, "--version"])  # the first start reads the files from disk
        for _ in range(args.repeats):  # interleaved: a change in load hits every command
            for command in COMMANDS:
                times[" ".join(command)].append(wall_seconds([gradlab, *command]))
    finally:
        for process in busy:
            process.kill()
    options = "".join(f" --{k} {v}" for k, v in (("repeats", args.repeats), ("busy", args.busy))
                      if v != parser.get_default(k))
    where = f", {args.busy} busy loops beside it" if args.busy else ", idle"
    lines = [f"## Start-up: the commands that do not compute{where}", "",
             f"Machine: {started_on}.", "",
             f"Command: `python benchmarks/startup.py{options} --write`: wall seconds from "
             f"start to exit, {args.repeats} runs of each command interleaved.", "",
             "| command | median s | fastest s | slowest s |", "| --- | ---: | ---: | ---: |"]
    for name, seconds in times.items():
        lines.append(f"| `gradlab {name}` | {statistics.median(seconds):.2f} | "
                     f"{min(seconds):.2f} | {max(seconds):.2f} |")
    publish("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
