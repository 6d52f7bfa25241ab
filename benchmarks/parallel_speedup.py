"""Wall and CPU time of `gradlab run` against --jobs, and whether the CSVs stay the same bytes.

Not a test: run it on an idle machine and paste its output into benchmarks/RESULTS.md
(it prints the whole section, machine named):

    python benchmarks/parallel_speedup.py                      # the default run, --jobs 1 and 2
    python benchmarks/parallel_speedup.py --busy 2             # with 2 busy loops beside it
    python benchmarks/parallel_speedup.py --jobs 1,2,4 -- toy --set seed=0,1,2,3

Each run is one `gradlab run ... --jobs K` in a fresh process; --repeats rounds run every
K once each, interleaved, and a row is the median of its K's runs. CPU time is user + system
time of every process of the run (the gradlab process, its fork server and its worker
processes), read from /proc every 0.5 s (Linux only): at most 0.5 s per process is
missed. `--busy N` starts N processes that spin on their own core for the whole
measurement, as other work on a shared machine would.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import machine, publish

TICKS = os.sysconf("SC_CLK_TCK")


def session_cpu_seconds(session: int) -> dict[int, float]:
    """user + system seconds of every live process in a session, by pid."""
    seconds = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        # after the command name: state ppid pgrp session ... utime(12) stime(13)
        if int(fields[3]) == session:
            seconds[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS
    return seconds


def timed_run(command: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of all its processes, exit code) of one command."""
    start = time.perf_counter()
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    seen: dict[int, float] = {}
    while process.poll() is None:
        seen.update(session_cpu_seconds(process.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    seen.update(session_cpu_seconds(process.pid))  # the fork server may still be exiting
    return wall, sum(seen.values()), process.returncode


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.csv"))
    return names == sorted(p.name for p in b.glob("*.csv")) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="1,2")
    parser.add_argument("--busy", type=int, default=0, help="busy loops to run beside it")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds, each running every --jobs value once; a row is the "
                             "median of its runs")
    parser.add_argument("--write", action="store_true",
                        help="also replace this section of benchmarks/RESULTS.md")
    parser.add_argument("gradlab_args", nargs="*", help="after --: what to run (default: "
                                                        "the default experiment)")
    args = parser.parse_args()
    gradlab = str(Path(sys.executable).with_name("gradlab"))
    started_on = machine()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    jobs_values = list(map(int, args.jobs.split(",")))
    runs: dict[int, list[tuple[float, float, int, str]]] = {j: [] for j in jobs_values}
    try:
        with tempfile.TemporaryDirectory() as folder:
            first_dir = None
            for round_ in range(args.repeats):  # interleaved: a change in load hits every K
                for jobs in jobs_values:
                    out = Path(folder, f"jobs-{jobs}-{round_}")
                    command = [gradlab, "run", *args.gradlab_args, "--jobs", str(jobs),
                               "--out", str(out)]
                    wall, cpu, code = timed_run(command)
                    (run_dir,) = out.iterdir() if out.exists() else (None,)
                    first_dir = first_dir or run_dir
                    same = "-" if run_dir is None else \
                        ("yes" if same_files(first_dir, run_dir) else "NO")
                    runs[jobs].append((wall, cpu, code, same))
    finally:
        for process in busy:
            process.kill()
    rows = []
    first_wall = statistics.median(wall for wall, *_ in runs[jobs_values[0]])
    for jobs, done in runs.items():
        wall = statistics.median(w for w, *_ in done)
        cpu = statistics.median(c for _, c, *_ in done)
        same = "yes" if all(s == "yes" for *_, s in done) else \
            ", ".join(s for *_, s in done)
        codes = ", ".join(sorted({str(code) for _, _, code, _ in done}))
        each = ", ".join(f"{w:.1f}" for w, *_ in done)
        rows.append(f"| {jobs} | {wall:.1f} | {each} | {cpu:.1f} | {wall / first_wall:.2f} | "
                    f"{same} | {codes} |")
    what = " ".join(["gradlab run", *args.gradlab_args]) if args.gradlab_args else \
        "gradlab run (the default experiment)"
    command = " ".join(["python benchmarks/parallel_speedup.py", f"--jobs {args.jobs}",
                        *([f"--busy {args.busy}"] if args.busy else []),
                        *([f"--repeats {args.repeats}"] if args.repeats != 3 else []),
                        "--write",
                        *(["--", *args.gradlab_args] if args.gradlab_args else [])])
    busy = f", {args.busy} busy loops beside it" if args.busy else ", idle"
    publish("\n".join([
        f"## Trials in parallel: `{what}` against --jobs{busy}", "",
        f"Machine: {started_on}.", "", f"Command: `{command}`: {args.repeats} rounds, "
        f"each running every --jobs value once; medians.", "",
        "| --jobs | wall s | each run's wall s | CPU s (all processes) | wall / first row's "
        "| CSVs identical to the first run's | exit code |",
        "| ---: | ---: | --- | ---: | ---: | --- | ---: |",
        *rows]) + "\n", args.write)


if __name__ == "__main__":
    main()
