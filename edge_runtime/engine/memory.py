"""Memory budget and peak-RSS measurement.

The budget bounds the process: weights (the file bytes the forward pass touches, memory-mapped: they
count once resident) + KV cache / conv state (grows with the context length) + fixed buffers + the
runtime itself (interpreter, numba or onnxruntime, tokenizer). The budget is checked before anything
is allocated, and tells the largest context that fits.
"""

from __future__ import annotations

import ctypes
import mmap
import re
import resource
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hy_edge_format.errors import BudgetError, HyEdgeError
from hy_edge_format.sizes import MB, fmt_bytes

BUDGET_FRACTION = 0.75  # of the memory available; the rest stays with the OS, other services and the page cache
FALLBACK_BUDGET = 8 * 1024**3  # where the machine's memory cannot be read (no /proc/meminfo)
DEFAULT_CONTEXT = 4096  # when neither the user nor the budget asks for less
# Resident memory of the runtime itself (the interpreter, numpy, click, the tokenizer, numba's kernels or
# onnxruntime's session machinery), measured with a warm kernel cache on x86-64 Linux, Python 3.11, and
# rounded up for other platforms:
# - numba while a session loads its kernels (LLVM resident, before any weight is touched): peak RSS of
#   `hy-edge run` on a 0.2 MB model 165 MB;
# - numba once they are loaded (memory.release_library_pages) and generating: SmolLM2-135M steady at
#   229 MB = 129 MB of matrices read through the map + 100 MB (its 2 MB tokenizer, buffers, KV included);
# - onnxruntime: 85 MB on the 0.2 MB model (its weights are planned by ort_session.ort_memory_plan).
# A first run that compiles the kernels (an empty JIT cache) holds LLVM's compiler too: ~390 MB, once.
RUNTIME_OVERHEAD = {"numba": 110 * MB, "onnxruntime": 90 * MB}
WARMUP_OVERHEAD = {"numba": 180 * MB, "onnxruntime": 0}

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": MB,
    "mb": MB,
    "mib": MB,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}


def default_budget(proc: Path = Path("/proc"), cgroup_fs: Path = Path("/sys/fs/cgroup")) -> int:
    """The budget when none is given: BUDGET_FRACTION of MemAvailable, capped by the memory limit of
    this process's cgroup and its ancestors (v2 `memory.max`, e.g. systemd's MemoryMax=; v1
    `memory.limit_in_bytes`) where one is set. Pi 5 boards ship with 2 to 16 GB: no fixed figure fits."""
    try:
        meminfo = (proc / "meminfo").read_text()
    except OSError:
        return FALLBACK_BUDGET
    m = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)
    if m is None:
        return FALLBACK_BUDGET
    limits = [int(m.group(1)) * 1024]
    try:
        cgroups = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        cgroups = []
    for line in cgroups:  # "0::/system.slice/x.service" (v2), "4:memory:/docker/abc" (v1)
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base, name = cgroup_fs, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = cgroup_fs / "memory", "memory.limit_in_bytes"
        else:
            continue
        group = base / path.lstrip("/")
        for d in (group, *group.parents):
            try:
                value = (d / name).read_text().strip()
            except OSError:
                value = "max"
            if value.isdigit():
                limits.append(int(value))  # v1's "no limit" is a huge number: min() passes over it
            if d == base:
                break
    return int(BUDGET_FRACTION * min(limits))


DEFAULT_BUDGET = default_budget()  # read once, when the runtime is imported


def parse_size(text: str | int) -> int:
    """'8GB', '512MB', '1.5g', '1048576' -> bytes (binary units: 1 GB = 2**30)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise HyEdgeError(f"memory size should be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise HyEdgeError(f"memory size '{text}' is not understood (examples: 8GB, 512MB)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise HyEdgeError(f"memory size '{text}' should be positive")
    return value


class ContextLimited(UserWarning):
    """The budget allows less context than the model (or the default) would have: said once."""


@dataclass(frozen=True)
class MemoryPlan:
    """What a session's process will hold; all in bytes."""

    weights: int  # weight bytes the forward pass makes resident (mapped file pages, or folded copies)
    fixed: int  # activations, logits, RoPE tables, scratch, conv states: independent of the context
    per_token: int  # KV cache (+ anything else sized by the context) per context position
    runtime: int = RUNTIME_OVERHEAD["numba"]  # the process before any of the above (runtime_overhead)

    def total(self, context: int) -> int:
        return self.runtime + self.weights + self.fixed + self.per_token * context

    def max_context(self, budget: int) -> int:
        free = budget - self.runtime - self.weights - self.fixed
        return max(0, free // self.per_token) if self.per_token else (1 << 62 if free >= 0 else 0)

    def describe(self, context: int) -> str:
        """'needs 512 MB: weights 157 MB, buffers 3 MB, KV cache 45 MB per 1k tokens (4096: 180 MB), runtime ~110 MB'"""
        return (
            f"needs {fmt_bytes(self.total(context))}: weights {fmt_bytes(self.weights)}, buffers "
            f"{fmt_bytes(self.fixed)}, KV cache {fmt_bytes(self.per_token * 1024)} per 1k tokens ({context} tokens: "
            f"{fmt_bytes(self.per_token * context)}), runtime ~{fmt_bytes(self.runtime)}"
        )


def runtime_overhead(backend: str, weights: int) -> int:
    """The runtime's share of a plan with `weights` bytes of resident weights. The numba process peaks
    twice: while a session loads its kernels (LLVM resident, no weight touched yet: WARMUP_OVERHEAD) and
    while it generates (the weights resident, LLVM's pages released: RUNTIME_OVERHEAD + weights); the
    plan's runtime is whichever makes the larger total."""
    return max(RUNTIME_OVERHEAD[backend], WARMUP_OVERHEAD[backend] - weights)


def plan_context(plan: MemoryPlan, budget: int, requested: int | None, model_limit: int, quiet: bool = False) -> int:
    """The context length to allocate: `requested` (default min(model limit, DEFAULT_CONTEXT)),
    checked against the model's limit and the budget. BudgetError (one line, with the numbers) when it
    does not fit; a ContextLimited warning when the budget shortens the default context (unless quiet:
    a check made before loading, the session says it later)."""
    allowed = min(plan.max_context(budget), model_limit)
    if requested is None:
        wanted = min(model_limit, DEFAULT_CONTEXT)
        context = min(wanted, allowed)
        if 0 < context < wanted and not quiet:
            warnings.warn(
                ContextLimited(
                    f"the memory budget {fmt_bytes(budget)} allows a context of {context} tokens "
                    f"(the model's is {model_limit}); raise --max-memory for more"
                ),
                stacklevel=2,
            )
    else:
        if requested <= 0:
            raise HyEdgeError(f"context length should be positive, got {requested}")
        if requested > model_limit:
            raise BudgetError(f"context length {requested} exceeds the model's limit of {model_limit} tokens")
        context = requested
    if context < 1 or plan.total(context) > budget:
        raise BudgetError(
            f"memory budget {fmt_bytes(budget)} is too small: the process {plan.describe(max(context, 1))} "
            f"(the budget allows a context of {allowed} tokens)"
        )
    return context


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


_MADV_DONTNEED, _MADV_NOHUGEPAGE = 4, 15  # linux/mman.h; the same values on x86-64 and aarch64
_madvise = None  # libc's madvise, looked up on first use (False where there is none)
_SHARED_OBJECT = re.compile(r"\.so(\.[0-9.]+)?$")  # libfoo.so, libfoo.so.6.0.30, ext.cpython-311-x86_64-linux-gnu.so


def release_library_pages(smaps: Path = Path("/proc/self/smaps")) -> int:
    """Unmap the resident pages of the shared libraries' code and constants; the bytes released.

    Once a session has loaded its kernels (the warm-up), decoding runs compiled code and a little of the
    interpreter and numpy: most library pages made resident while loading stay so unused, above all the
    JIT compiler's (LLVM: ~70 MB of the ~830 MB a Hunyuan-0.5B session held), then the tokenizer's
    parser and the other libraries', ~20 MB more. Only mappings that are not writable and hold no private
    (copy-on-write) page are dropped: for those the file is the only content, so MADV_DONTNEED just
    removes them from this process's page tables. The pages stay in the page cache; what is used again
    (the interpreter's loop, a later compile) maps back in on first touch (minor faults, once).
    Returns 0 where /proc or madvise is not available."""
    try:
        text = smaps.read_text()
    except OSError:
        return 0
    ranges, head, rss, anon = [], None, 0, 0

    def close() -> None:
        if head is not None and rss and not anon:
            ranges.append((*head, rss * 1024))

    for line in text.splitlines():
        field = line.split(maxsplit=2)
        if not field:
            continue
        if field[0].endswith(":"):
            if field[0] == "Rss:":
                rss = int(field[1])
            elif field[0] == "Anonymous:":
                anon = int(field[1])
            continue
        close()  # a new mapping begins: "start-end perms offset dev inode path"
        parts = line.split()
        mine = len(parts) >= 6 and "w" not in parts[1] and _SHARED_OBJECT.search(parts[5]) is not None
        head = tuple(int(a, 16) for a in parts[0].split("-")) if mine else None
        rss, anon = 0, 0
    close()
    return sum(resident for start, end, resident in ranges if drop_pages(start, end))


def drop_pages(start: int, end: int) -> bool:
    """madvise(MADV_DONTNEED) on the page-aligned address range [start, end) of a file mapping that
    holds no private page: its resident pages leave this process (they stay in the page cache and map
    back in when touched). False where madvise is not available or refuses."""
    return _advise(start, end, _MADV_DONTNEED)


def refuse_huge_pages(start: int, end: int) -> bool:
    """madvise(MADV_NOHUGEPAGE) on the page-aligned range [start, end) of a file mapping: a page cache
    of 2 MB folios (ext4 and xfs on recent kernels, after a cold read) is then mapped page by page, not
    2 MB at a time, so the padding and the tensors read by pread beside the matrices stay out of RSS
    (SmolLM2-135M's data mapping: 148 -> 128 MB resident after a generation). False where madvise is
    not available or refuses (and off Linux, where the value means something else)."""
    return sys.platform.startswith("linux") and _advise(start, end, _MADV_NOHUGEPAGE)


def _advise(start: int, end: int, advice: int) -> bool:
    global _madvise
    if _madvise is None:
        try:
            _madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            _madvise = False
        else:
            _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return bool(_madvise) and end > start and _madvise(start, end - start, advice) == 0


def lazy_zeros(shape: tuple, dtype, huge_pages: bool = False) -> np.ndarray:
    """A zero-filled array on a private anonymous mapping: its pages become resident only when written
    (reads map the kernel's zero page, which no RSS counts); the array keeps the mapping alive.
    huge_pages=False refuses 2 MB pages, for arrays written piecewise (numpy asks for them on large
    arrays, so the first KV entry written into each 2 MB of the cache made all of it resident: +194 MB on
    a 128-token prompt); True asks for them, for arrays only read (a read fault then maps the 2 MB zero
    page: 0.1 s less of faults per 500 MB read)."""
    count = int(np.prod(shape))
    mm = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        try:
            mm.madvise(advice)
        except OSError:  # transparent huge pages not built in: 4 KiB pages either way
            pass
    return np.frombuffer(mm, dtype, count=count).reshape(shape)
