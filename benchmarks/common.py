"""Timing helpers shared by ``run.py``, ``peers.py`` and ``hotpaths.py``."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MIN_REP_S = 0.05  # a repetition loops a fast callable until it lasts at least this long

# glibc's default malloc returns freed memory to the kernel by heuristics that depend on what
# ran before: a grad-mode ResNet-18 forward then pays ~5000 page faults (25 ms instead of 15)
# or none, run to run. In-process timings run with these fixed settings (both sides alike):
# blocks up to 32 MiB come from the heap, and the heap is not trimmed.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def steady_malloc_env() -> dict[str, str]:
    """``os.environ`` plus ``STEADY_MALLOC``, for a child that times things in process."""
    return {**os.environ, **STEADY_MALLOC}


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median over repetitions, and every repetition."""

    median: float
    reps: tuple[float, ...]

    attempts: int = 1
    others: float = 0.0  # CPU cores other processes used meanwhile (average over the set)

    @property
    def spread(self) -> float:
        """Interquartile range / median (range / median under 4 repetitions): the noise."""
        if not self.median:
            return 0.0
        if len(self.reps) < 4:
            return (max(self.reps) - min(self.reps)) / self.median
        q1, _, q3 = statistics.quantiles(self.reps, n=4)
        return (q3 - q1) / self.median


def _calibrate(fn: Callable[[], object]) -> int:
    """Calls per repetition so that one repetition lasts about ``MIN_REP_S``."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, min(1000, int(MIN_REP_S / max(once, 1e-6))))


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    reps: int,
    warmup: int = 2,
    retries: int = 2,
    max_spread: float = 0.25,
) -> dict[str, Timing]:
    """Time each callable ``reps`` times, interleaved and in rotating order, after a warm-up.

    Interleaving means a slow moment of the machine (the other core busy) hits every
    contender alike, so the ratios of medians are fair even when the medians drift. A set
    whose noisiest contender spreads more than ``max_spread`` is measured again (up to
    ``retries`` times) and the quietest attempt is kept; ``Timing.attempts`` says how many.
    """
    best: dict[str, Timing] | None = None
    for attempt in range(1, retries + 2):
        wait_quiet()
        before = cpu_sample()
        timings = _interleaved_once(fns, reps, warmup if attempt == 1 else 0)
        others = others_cores(before, cpu_sample())
        timings = {k: Timing(t.median, t.reps, attempt, others) for k, t in timings.items()}
        if best is None or _badness(timings) < _badness(best):
            best = timings
        if _badness(timings) <= max_spread:
            break
    assert best is not None
    return best


def _badness(timings: Mapping[str, Timing]) -> float:
    """The worst relative spread, or the other processes' load if that is worse."""
    return max(max(t.spread for t in timings.values()), next(iter(timings.values())).others)


def cpu_sample() -> tuple[int, int, int]:
    """(busy jiffies of all CPUs, all jiffies, this process's and its waited children's)."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    with open("/proc/self/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    own = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return sum(values) - values[3] - values[4], sum(values), own


def others_cores(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Average number of cores other processes kept busy between two samples."""
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    wall = total / max(os.cpu_count() or 1, 1)
    return max(0.0, (busy - own) / wall) if wall else 0.0


def wait_quiet(limit: float = 0.25, max_wait: float = 10.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes use under ``limit`` cores; their load."""
    deadline = time.monotonic() + max_wait
    while True:
        before = cpu_sample()
        time.sleep(0.3)
        load = others_cores(before, cpu_sample())
        if load < limit or time.monotonic() > deadline:
            return load


def _interleaved_once(
    fns: Mapping[str, Callable[[], object]], reps: int, warmup: int
) -> dict[str, Timing]:
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    inner = {name: _calibrate(fns[name]) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            gc.collect()
            fn, n = fns[name], inner[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: Timing(statistics.median(s), tuple(s)) for name, s in samples.items()}


def vm_hwm_kb() -> int:
    """Peak resident set size of this process (``VmHWM``), in kB."""
    return _proc_field("/proc/self/status", "VmHWM:")


def rchar() -> int:
    """Bytes this process read through read() calls so far (``/proc/self/io``)."""
    return _proc_field("/proc/self/io", "rchar:")


def _proc_field(path: str, key: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def fmt_s(seconds: float) -> str:
    """``12.3 ms`` / ``1.23 s`` / ``45 us``."""
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"
