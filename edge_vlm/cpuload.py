"""How many CPU threads llama.cpp should use right now, from the cores other programs leave
free (pure Python: no llama_cpp here).

llama.cpp splits every graph node over its threads and waits for all of them at a barrier.
When another program keeps a core busy, one of two threads runs only part of the time and
every barrier waits for it: on a 2-core laptop decoding fell from ~120 to ~30 tokens/s with
two threads, while one thread kept ~100. So the thread count follows the free cores:

- *others* = CPU time every process used (``/proc/stat``, or psutil elsewhere) minus this
  process's own, over the last second or so (after an idle spell: since the last reading,
  taken during the previous request), in cores; when a request starts, the run queue
  (runnable threads that are not ours) is also read a few times, and the larger of the two
  counts, so a busy loop that started a moment ago is seen;
- threads = the free cores (``n_cpus - others``) rounded down, with a little slack, between
  1 and the configured maximum. The cost is asymmetric (one thread too many: several times
  slower; one too few: ~1.2x slower), so the rounding leans towards fewer, fewer threads
  are taken at once and more only after the cores have stayed free for a few seconds.

The sources are small objects with a ``sample()`` method so that tests can script the load
(:class:`ScriptedLoad` in the tests is such a fake).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SLACK = 0.3
"""Free-core fraction that still counts as a core (``floor(free + SLACK)``): 1.7 free cores
give two threads, 1.6 give one."""
WINDOW_S = 1.0
"""The load is averaged over about this long."""
MIN_WINDOW_S = 0.2
"""A shorter span between two samples says too little: the run queue decides alone."""
RAISE_AFTER_S = 3.0
"""More threads only after the cores have been free this long."""


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU counters at one moment.

    Attributes:
        t: Monotonic time, seconds.
        busy_s: CPU-seconds all CPUs have spent busy (any process) since boot.
        own_s: CPU-seconds this process has used (all its threads).
        runnable_others: Threads of other processes runnable right now (None: unknown).
    """

    t: float
    busy_s: float
    own_s: float
    runnable_others: int | None = None


class LoadSource(Protocol):
    """Where CPU counters come from (the machine, or a scripted fake in tests)."""

    n_cpus: int

    def sample(self) -> CpuSample | None:
        """The counters now, or None when this platform cannot tell."""
        ...


class ProcStatLoad:
    """Linux: ``/proc/stat`` (busy time, runnable threads) and ``/proc/self`` (ours)."""

    def __init__(self) -> None:
        try:
            self.n_cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.n_cpus = os.cpu_count() or 1
        self._tick = float(os.sysconf("SC_CLK_TCK"))

    def sample(self) -> CpuSample | None:
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        fields = [float(x) for x in lines[0].split()[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice: inside user]
        busy = sum(fields[:8]) - fields[3] - fields[4]
        running = next((int(line.split()[1]) for line in lines
                        if line.startswith("procs_running")), None)
        t = os.times()
        others = None if running is None else max(0, running - _own_running())
        return CpuSample(time.monotonic(), busy / self._tick, t.user + t.system, others)


def _own_running() -> int:
    """Threads of this process that are runnable now (the caller is one of them)."""
    n = 0
    try:
        for task in os.scandir("/proc/self/task"):
            try:
                stat = Path(task.path, "stat").read_text()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2] == "R":
                n += 1
    except OSError:
        return 1
    return max(1, n)


class PsutilLoad:
    """Other platforms: psutil's system-wide and per-process CPU times."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self.n_cpus = psutil.cpu_count() or 1

    def sample(self) -> CpuSample | None:
        try:
            cpu = self._psutil.cpu_times()
            own = self._proc.cpu_times()
        except Exception:  # psutil raises its own errors for a platform it cannot read
            return None
        busy = sum(cpu) - cpu.idle - getattr(cpu, "iowait", 0.0)
        return CpuSample(time.monotonic(), busy, own.user + own.system)


def machine_load() -> LoadSource | None:
    """The best source for this platform, or None (then the maximum is always used)."""
    if sys.platform.startswith("linux") and Path("/proc/stat").exists():
        return ProcStatLoad()
    try:
        return PsutilLoad()
    except Exception:  # psutil missing
        return None


class ThreadAdvisor:
    """Chooses llama.cpp's thread count from the cores other programs leave free.

    Args:
        max_threads: Never more than this (``runtime.threads``' default: physical cores).
        source: The CPU counters (None: always ``max_threads``).
        probes: Run-queue readings when a request starts (their median counts).
        probe_gap_s: Time between those readings.
        sleep: Waits between probes (tests pass a fake clock's).
    """

    def __init__(self, max_threads: int, source: LoadSource | None, *, probes: int = 4,
                 probe_gap_s: float = 0.003,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        self.max_threads = max_threads
        self.source = source
        self.probes = probes
        self.probe_gap_s = probe_gap_s
        self._sleep = sleep
        self._history: deque[CpuSample] = deque(maxlen=64)
        self._lock = threading.Lock()
        self.last_others: float | None = None
        """Cores other programs used at the last decision (None: unknown)."""
        self.observe()

    def observe(self) -> CpuSample | None:
        """Record the counters now (every decision records one too)."""
        if self.source is None:
            return None
        s = self.source.sample()
        if s is not None:
            with self._lock:
                self._history.append(s)
        return s

    def _windowed(self, now: CpuSample) -> float | None:
        """Cores others used between the newest sample at least ``WINDOW_S`` old (else
        the oldest one) and ``now``."""
        with self._lock:
            past = [s for s in self._history if now.t - s.t >= MIN_WINDOW_S]
        if not past:
            return None
        old = [s for s in past if now.t - s.t >= WINDOW_S]
        base = old[-1] if old else past[0]
        dt = now.t - base.t
        others = (now.busy_s - base.busy_s) - (now.own_s - base.own_s)
        return max(0.0, others / dt)

    def others(self, *, probe: bool) -> float | None:
        """Cores other processes use now (None: unknown). ``probe`` also reads the run
        queue a few times (when a request starts: a load that began a moment ago)."""
        if self.source is None:
            return None
        readings: list[int] = []
        now: CpuSample | None = None
        for i in range(self.probes if probe else 1):
            if i:
                self._sleep(self.probe_gap_s)
            now = self.source.sample()
            if now is not None and now.runnable_others is not None:
                readings.append(now.runnable_others)
        if now is None:
            return None
        windowed = self._windowed(now)
        with self._lock:
            self._history.append(now)
        counts = [x for x in (windowed, statistics.median(readings) if probe and readings
                              else None) if x is not None]
        return max(counts) if counts else None

    def threads(self, *, probe: bool = True, current: int | None = None) -> int:
        """The thread count for the next piece of work.

        Args:
            probe: Also read the run queue (at the start of a request).
            current: The count in use: more threads than that only when the cores have
                been free for :data:`RAISE_AFTER_S` (one thread too many costs far more
                than one too few), fewer at once.
        """
        others = self.others(probe=probe)
        self.last_others = others
        if others is None or self.source is None:
            return self.max_threads
        n = self._fit(others)
        if current is not None and n > current:
            n = max(current, min(n, self._fit(self._busiest_recent())))
        return n

    def _fit(self, others: float) -> int:
        assert self.source is not None
        free = self.source.n_cpus - others
        return max(1, min(self.max_threads, math.floor(free + SLACK)))

    def _busiest_recent(self) -> float:
        """The most cores others used between any two recorded samples of the last
        :data:`RAISE_AFTER_S` (0 when there is no such pair)."""
        with self._lock:
            hist = list(self._history)
        if not hist:
            return 0.0
        newest = hist[-1].t
        recent = [s for s in hist if newest - s.t <= RAISE_AFTER_S]
        # The span reaching back to the first sample older than the horizon counts too.
        older = [s for s in hist if newest - s.t > RAISE_AFTER_S]
        if older:
            recent.insert(0, older[-1])
        worst = 0.0
        base = recent[0]
        for s in recent[1:]:
            if s.t - base.t >= MIN_WINDOW_S:
                worst = max(worst, ((s.busy_s - base.busy_s) - (s.own_s - base.own_s))
                            / (s.t - base.t))
                base = s
        return worst
