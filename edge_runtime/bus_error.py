"""A bus error while a model runs, as one line.

The weights are a memory map of the model's data file. A data file truncated before the start is caught
before it is mapped (integrity.check_data_size); one truncated while it is in use (`cp` of another file
over it while `hy-edge serve` runs, a copy still being written) turns the next read of a page past its
new end into SIGBUS, and the process died with "Bus error", exit 135, no message. The front doors
install a native handler that writes one line and exits with code 2. It must be native: a Python-level
handler only sets a flag and returns, into the faulting load, forever. write(2) and _exit(2) are
async-signal-safe.
"""

from __future__ import annotations

import ctypes
import signal

import numpy as np
from numba import cfunc, types

from .cache_dirs import configure_jit_cache

_MESSAGE = np.frombuffer(
    b"hy-edge: error: bus error reading the model's memory-mapped data: its data file was truncated or "
    b"replaced in place while in use (a copy over a running model?); start again once it is complete\n",
    np.uint8,
).copy()

# libc's functions by symbol (resolved when the compiled handler is loaded): cacheable, unlike ctypes pointers
_write = types.ExternalFunction("write", types.intp(types.int32, types.voidptr, types.uintp))
_exit = types.ExternalFunction("_exit", types.void(types.int32))
_getpid = types.ExternalFunction("getpid", types.int32())
_gettid = types.ExternalFunction("gettid", types.int32())
_tgkill = types.ExternalFunction("tgkill", types.int32(types.int32, types.int32, types.int32))
_pause = types.ExternalFunction("pause", types.int32())


@cfunc(types.void(types.int32), cache=configure_jit_cache() is not None)  # None: no writable cache
def _on_sigbus(signum):
    # the kernels' threads fault together: a worker hands the signal to the main thread (whose id is the
    # process id) and waits for the exit, so that the line is written once
    pid = _getpid()
    if _gettid() != pid:
        _tgkill(pid, pid, signum)
        while True:
            _pause()
    _write(2, _MESSAGE.ctypes.data, _MESSAGE.size)  # the array is a constant of the compiled code
    _exit(2)


_installed = False


def install() -> None:
    """SIGBUS -> one line on stderr and exit 2, for the rest of the process (idempotent)."""
    global _installed
    if _installed or not hasattr(signal, "SIGBUS"):
        return
    set_handler = ctypes.CDLL(None).signal
    set_handler.argtypes = (ctypes.c_int, ctypes.c_void_p)
    set_handler.restype = ctypes.c_void_p
    set_handler(signal.SIGBUS, _on_sigbus.address)
    _installed = True
