"""Giving the C heap's free pages back to the OS: both the runtime (after parsing a tokenizer, after a
session's warm-up) and the converter (after each tensor's temporaries) call it. Not part of the file
contract; it lives here because it is the one process helper both sides share, and importing the
runtime's memory module from the converter would import the runtime (which configures numba at import)."""

import ctypes


def trim_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc's malloc_trim); True if any went back.

    Parsing a model's tokenizer (the Rust `tokenizers` builds and drops ~30 MB of temporaries) and a
    session's warm-up free more than glibc gives back on its own: the pages stay resident in the heap,
    unused. False where the C library has no malloc_trim (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = (ctypes.c_size_t,)
    return bool(trim(0))
