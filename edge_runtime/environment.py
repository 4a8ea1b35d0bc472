"""Environment variables that numba and OpenMP read when they start, checked when a command starts.

numba reads its variables when it is imported and OpenMP (libgomp, under numba's `omp` threading layer)
when it loads: a value they refuse ends in a traceback from deep inside them (NUMBA_NUM_THREADS=0,
NUMBA_THREADING_LAYER=bogus, or `tbb` where TBB is not installed), a multi-line warning
(NUMBA_NUM_THREADS=abc), or a warning and a silent default (OMP_NUM_THREADS=-3). Here each is one line
naming the variable. `check_environment` reads only the strings (numba is not imported);
`check_threading_layer` starts numba's thread pool, the one check that needs it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

from hy_edge_format.errors import HyEdgeError

LAYERS = ("default", "safe", "forksafe", "threadsafe", "tbb", "omp", "workqueue")  # numba's threading layers


def _positive_int(v: str) -> bool:
    return v.strip().isdigit() and len(v.strip()) <= 9 and int(v) > 0


def _int_in(low: int, high: int) -> Callable[[str], bool]:
    return lambda v: v.strip().isdigit() and low <= int(v.strip()[:10]) <= high


def _one_of(*words: str) -> Callable[[str], bool]:
    return lambda v: v.strip().lower() in words


_OMP_SCHEDULE = re.compile(r"((non)?monotonic:)?(static|dynamic|guided|auto)(,\s*[1-9][0-9]{0,8})?", re.I)
_OMP_SIZE = re.compile(r"[1-9][0-9]{0,11}\s*[bkmg]?", re.I)
_OMP_PLACES_BIND = ("true", "false", "master", "close", "spread", "primary")

# variable -> (check of its value, what it should be)
CHECKS: dict[str, tuple[Callable[[str], bool], str]] = {
    "NUMBA_NUM_THREADS": (_positive_int, "a positive integer"),
    "NUMBA_THREADING_LAYER": (_one_of(*LAYERS), f"one of {', '.join(LAYERS)}"),
    "NUMBA_THREADING_LAYER_PRIORITY": (
        lambda v: sorted(v.split()) == ["omp", "tbb", "workqueue"],
        "a permutation of 'tbb omp workqueue'",
    ),
    "NUMBA_OPT": (lambda v: v.strip().lower() == "max" or _int_in(0, 3)(v), "0, 1, 2, 3 or max"),
    "NUMBA_BOUNDSCHECK": (_int_in(0, 1), "0 or 1"),
    "NUMBA_DISABLE_JIT": (_int_in(0, 1), "0 or 1"),
    "OMP_NUM_THREADS": (lambda v: all(_positive_int(n) for n in v.split(",")), "positive integers (4, or 4,2)"),
    "OMP_THREAD_LIMIT": (_positive_int, "a positive integer"),
    "OMP_MAX_ACTIVE_LEVELS": (_int_in(0, 1 << 30), "a non-negative integer"),
    "OMP_DYNAMIC": (_one_of("true", "false"), "true or false"),
    "OMP_WAIT_POLICY": (_one_of("active", "passive"), "active or passive"),
    "OMP_PROC_BIND": (
        lambda v: all(p.strip().lower() in _OMP_PLACES_BIND for p in v.split(",")),
        "true, false, or a list of master, close, spread, primary",
    ),
    "OMP_STACKSIZE": (lambda v: _OMP_SIZE.fullmatch(v.strip()) is not None, "a size such as 4M"),
    "OMP_SCHEDULE": (lambda v: _OMP_SCHEDULE.fullmatch(v.strip()) is not None, "static, dynamic, guided or auto[,n]"),
}


def check_environment(env: Mapping[str, str] | None = None) -> None:
    """HyEdgeError (one line, naming the variable) for a value numba or OpenMP would refuse or ignore.
    Unset variables are not looked at; an empty one is as numba and libgomp take it: unset."""
    env = os.environ if env is None else env
    for name, (ok, what) in CHECKS.items():
        value = env.get(name)
        if value is not None and value.strip() and not ok(value):
            raise HyEdgeError(f"environment variable {name}={value[:40]!r}: should be {what}")


def check_threading_layer(env: Mapping[str, str] | None = None) -> None:
    """Start numba's thread pool now, so that a threading layer named in NUMBA_THREADING_LAYER that
    cannot load here (`tbb` without TBB installed) is one line at start-up, not a traceback at the first
    parallel kernel. Nothing to do for the default layer (numba falls back to its own `workqueue`)."""
    env = os.environ if env is None else env
    layer = env.get("NUMBA_THREADING_LAYER", "").strip().lower()
    if layer in ("", "default"):
        return
    from numba.np.ufunc import parallel

    try:
        parallel._launch_threads()  # what numba calls at the first parallel kernel; once per process
    except ValueError as e:
        why = " ".join(str(e).split())
        raise HyEdgeError(f"environment variable NUMBA_THREADING_LAYER={layer!r}: {why[:160]}") from None
