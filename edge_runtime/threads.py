"""Thread count: default the number of physical cores (SMT siblings share the memory bandwidth a
bandwidth-bound decode needs, so they add nothing)."""

from __future__ import annotations

import os

from .errors import HyEdgeError


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


def max_threads() -> int:
    """CPUs this process may run on: more threads than that only queue behind each other (numba's
    pool is sized to the CPU count when it starts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def resolve_threads(threads: int | None) -> int:
    if threads is None:
        return physical_cores()
    if not isinstance(threads, int) or threads < 1:
        raise HyEdgeError(f"threads should be a positive integer, got {threads!r}")
    return threads


def set_threads(threads: int | None) -> int:
    """Set numba's thread count (capped at the pool size numba started with); returns it."""
    import numba

    n = min(resolve_threads(threads), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    return n
