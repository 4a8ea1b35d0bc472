"""Thread count: default the number of physical cores the process may use (SMT siblings share the memory
bandwidth a bandwidth-bound decode needs, so they add nothing), within its affinity and its cgroup's CPU
quota (a container given 1.5 CPUs of a 4-core Pi: threads beyond the quota are throttled for the rest of
each period, and every parallel region waits for them at its barrier)."""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

from hy_edge_format.errors import HyEdgeError


def physical_cores() -> int:
    """Physical cores available to this process (/proc/cpuinfo core ids; the affinity count otherwise)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    try:
        cores, cpu, phys = set(), None, "0"
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cpu in allowed:
                    cores.add((phys, value))
        if cores:
            return max(1, min(len(cores), len(allowed)))
    except (OSError, ValueError):
        pass
    return max(1, len(allowed))


def cpu_quota(root: Path = Path("/sys/fs/cgroup"), proc_self: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs this process's cgroups allow (quota / period, the smallest along the hierarchy), or None when
    no quota is set or it cannot be read. cgroup v2 (`cpu.max`: "max 100000" or "150000 100000") and v1
    (`cpu.cfs_quota_us` / `cpu.cfs_period_us`, -1 for none)."""
    try:
        lines = proc_self.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: the unified hierarchy
            base, files = root, ("cpu.max",)
        elif "cpu" in controllers.split(","):
            base = next((root / d for d in (controllers, "cpu", "cpu,cpuacct") if (root / d).is_dir()), None)
            if base is None:
                continue
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        rel = Path(path.lstrip("/"))
        for d in (rel, *rel.parents):  # the cgroup and its ancestors: the smallest limit binds
            try:
                values = [(base / d / f).read_text().split() for f in files]
            except OSError:
                continue
            try:
                if len(files) == 1:
                    quota, period = values[0][0], values[0][1]
                else:
                    quota, period = values[0][0], values[1][0]
                if quota not in ("max", "-1") and int(period) > 0 and int(quota) > 0:
                    limits.append(int(quota) / int(period))
            except (IndexError, ValueError):
                continue
    return min(limits) if limits else None


def available_cores() -> int:
    """Physical cores, capped by the cgroup's CPU quota (rounded down, at least one)."""
    cores = physical_cores()
    quota = cpu_quota()
    return cores if quota is None else max(1, min(cores, math.floor(quota + 1e-9)))


def max_threads() -> int:
    """CPUs this process may run on: more threads than that only queue behind each other (numba's
    pool is sized to the CPU count when it starts)."""
    return max(1, len(_allowed_cpus()))


def _allowed_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:
        return set(range(os.cpu_count() or 1))


def resolve_threads(threads: int | None) -> int:
    if threads is None:
        return available_cores()
    if not isinstance(threads, int) or threads < 1:
        raise HyEdgeError(f"threads should be a positive integer, got {threads!r}")
    return threads


def set_threads(threads: int | None) -> int:
    """Set numba's thread count (capped at the pool size numba started with); returns it."""
    import numba

    n = min(resolve_threads(threads), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    return n


class ThreadsBusy(UserWarning):
    """More threads were asked for than the CPUs other busy processes leave free (shown once)."""


_checked = False


def warn_if_busy(threads: int, window: float = 0.2) -> None:
    """Once per process, for a thread count the caller chose: measure for `window` seconds the cores
    other processes keep busy, and warn (ThreadsBusy) when `threads` exceeds the CPUs they leave. Every
    parallel region waits at its barrier for a thread pushed off its core (`make bench` measures decode
    beside one competing busy process, pinned threads against the default count, which gives way)."""
    global _checked
    if _checked or threads < 2:
        return
    _checked = True
    allowed = _allowed_cpus()  # only these: on a big host, processes on other CPUs take none of ours
    before, own0 = _busy_seconds_on(allowed), _own_seconds()
    t0 = time.monotonic()
    time.sleep(window)
    after, own1 = _busy_seconds_on(allowed), _own_seconds()
    elapsed = time.monotonic() - t0
    if before is None or after is None or elapsed <= 0:
        return
    cpus = len(allowed)
    others = min(cpus, max(0.0, (after - before) - (own1 - own0)) / elapsed)  # their cores kept busy
    free = max(0, cpus - int(others + 0.5))
    if threads > free:
        warnings.warn(
            ThreadsBusy(
                f"{threads} threads asked for, but other processes keep {others:.1f} of the {cpus} CPUs busy "
                f"({free} free): every parallel step waits for a thread pushed off its core, so decoding may "
                "run several times slower; the default thread count (no --threads, threads=None) gives way "
                "to them"
            ),
            stacklevel=2,
        )


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _busy_seconds() -> float | None:
    """CPU seconds every CPU of the machine has spent busy since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    return _busy_ticks(fields) / os.sysconf("SC_CLK_TCK")


def _busy_seconds_on(cpus: set[int]) -> float | None:
    """CPU seconds the CPUs `cpus` have spent busy since boot (/proc/stat's `cpuN` lines), or None."""
    try:
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.startswith("cpu") and line[3:4].isdigit()]
    except OSError:
        return None
    mine = [fields for fields in rows if int(fields[0][3:]) in cpus]
    return sum(_busy_ticks(fields) for fields in mine) / os.sysconf("SC_CLK_TCK") if mine else None


def _busy_ticks(fields: list[str]) -> int:
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    # fields 0-7: user nice system idle iowait irq softirq steal (guest time is already in user)
    return sum(ticks[:8]) - idle


class ThreadGovernor:
    """Chooses how many of the session's threads to use from what the rest of the machine is doing.

    Every parallel region ends at a barrier; when another process keeps a core busy, one of our threads
    is descheduled and the others wait for it at every barrier (Hunyuan-0.5B decode with one competing
    busy process: 13 tok/s on 2 threads, 20 tok/s on 1). So every `interval` seconds the governor
    measures the CPU time other processes used (the machine's busy time minus this process's) and
    uses `threads - round(other cores busy)` threads, at least one. Cheap enough to call every step.
    """

    def __init__(self, threads: int, interval: float = 0.5):
        import time

        self.threads = threads
        self.interval = interval
        self._clock = time.monotonic
        self._last = self._sample()
        self.current = threads

    def _sample(self) -> tuple[float, float, float | None]:
        t = os.times()
        return self._clock(), t.user + t.system, _busy_seconds()

    def tick(self) -> int:
        """Re-chooses the thread count when `interval` has passed; returns the count in use."""
        now = self._clock()
        if now - self._last[0] < self.interval:
            return self.current
        sample = self._sample()
        (t0, own0, busy0), (t1, own1, busy1) = self._last, sample
        self._last = sample
        if busy0 is None or busy1 is None or t1 <= t0:
            return self.current
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)  # cores other processes kept busy
        n = max(1, min(self.threads, self.threads - int(others + 0.5)))
        if n != self.current:
            import numba

            numba.set_num_threads(n)
            self.current = n
        return n
