"""Whether the machine was busy while something was timed: the runnable processes against the cores.

``runnable()`` is the kernel's count of threads running or ready to run (``procs_running`` of ``/proc/stat``),
this one included. A timing that needs ``threads`` cores had them to itself when the others (the count less
this one) plus ``threads`` fit in the cores this process may use. ``LoadWatch`` samples the count before a
timing, between its rounds (``sample()``) and after it; the timing counts as loaded when the median sample did
not fit. On a loaded machine a figure is printed with a note instead of a conclusion (``secateurs bench``, the
demo) and recorded with its samples (tell's unit costs).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def runnable() -> int | None:
    """Threads running or ready to run now, this one included; None where ``/proc/stat`` is missing."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class LoadWatch:
    """Samples of ``runnable()`` around a timing that uses ``threads`` cores (module docstring)."""

    threads: int = 1
    samples: list = field(default_factory=list)

    def sample(self) -> None:
        n = runnable()
        if n is not None:
            self.samples.append(n)

    def __enter__(self) -> "LoadWatch":
        self.sample()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()

    @property
    def loaded(self) -> bool | None:
        """None when nothing could be sampled."""
        if not self.samples:
            return None
        return statistics.median(self.samples) - 1 + self.threads > cores()

    def record(self) -> dict:
        return {"runnable": self.samples, "cores": cores(), "threads": self.threads, "loadavg_1min": loadavg(),
                "loaded": self.loaded}


def load_note(record: dict | None) -> str | None:
    """One line for a figure timed on a loaded machine; None when it was not (or could not be told)."""
    if not record or not record.get("loaded"):
        return None
    others = statistics.median(record["runnable"]) - 1
    return (f"note: the machine was busy while this was timed ({others:g} other runnable processes on "
            f"{record['cores']} cores, {record['threads']} needed): the speed figures may be off; rerun on a quiet "
            "machine before drawing a conclusion from them")


def busy_now(threads: int = 1, samples: int = 5, interval: float = 0.05) -> bool | None:
    """Whether a timing on ``threads`` threads would be loaded now (``samples`` samples ``interval`` seconds
    apart); None where the load cannot be read."""
    watch = LoadWatch(threads)
    for k in range(samples):
        if k:
            time.sleep(interval)
        watch.sample()
    return watch.loaded


@contextlib.contextmanager
def busy_machine(extra: int = 1):
    """An artificial CPU load for the load checks (tests, benchmarks/tell_steady.py): a busy-loop process per core
    this process may use and ``extra`` more, started here and ended, by their own ids, when the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores() + extra)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
