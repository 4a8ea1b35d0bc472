"""A prompt cache that survives restarts (llama-server's `--slot-save-path`): when the server stops, the
reusable prefix of each serving slot -- its tokens and the KV rows a prompt's prefill computed
(engine.py's `_Slot.exact`) -- is written to one file; at the next start a file made for this very model
file, spec, KV cache type and shapes is read back into the slots, so a request sharing a saved prefix
prefills only the rest, and its answer is the one it gets without the cache.

The file (little-endian):
    MAGIC, u32 header length, the JSON header {"version", "key": cache_key(...), "slots": [{"tokens": n,
    "crc32": c}, ...]}, then per slot: its n token ids (int64); for each attention layer and kv head, the
    keys' n rows; the same for the values (the KV cache's own dtype and row length); for each dwconv layer,
    its n conv inputs (f32).
Nothing in it can run (no pickle). Every length is checked against the header and the file's size before a
byte of KV is read, each slot's bytes against its CRC-32; rows are read straight into the session's KV
arrays (no second copy). A file that does not match is ignored with one line saying why; it is never an
error. The file holds the token ids of recent prompts: it is written readable by its owner only.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hy_edge_format.errors import HyEdgeError
from hy_edge_format.safe_json import JSONInputError, is_int
from hy_edge_format.safe_json import loads as json_loads
from hy_edge_format.sizes import fmt_bytes

FILE_NAME = "prompt-cache.bin"
FORMAT_VERSION = 1
MAGIC = b"hy-edge prompt cache\n"
MAX_HEADER_BYTES = 1 << 20  # a header lists a few slots: far below this
# what a shutdown writes at most (the most recently used slots first, the last one cut to fit): a slow SD card
# (10 MB/s) writes it in ~25 s, within the 45 s the unit's TimeoutStopSec leaves beyond the drain (systemd.py);
# 256 MB hold ~11,000 tokens of
# SmolLM2's FP16 KV cache, ~2,700 of Hunyuan-0.5B's
MAX_SAVE_BYTES = 256 << 20
_SKIP_CHUNK = 1 << 20  # rows beyond this session's context are read (for the CRC) through a buffer this size


class PromptCacheError(HyEdgeError):
    """A saved prompt cache that cannot be used here (one line: why)."""


def cache_key(model_digest: str, session) -> dict:
    """What a saved cache must match to be loaded: the model file's content (integrity.content_digest), its
    spec, the linear-input quantization and the KV cache's type and shapes (the values a prefill writes)."""
    b = session.buf
    return {
        "model": model_digest,
        "spec": session.spec.to_json(),
        "activations": session.activations,
        "kv_cache": session.kv_cache,
        "kv_dtype": b.k_cache.dtype.str,
        "kv_shape": [b.k_cache.shape[0], b.k_cache.shape[2], b.k_cache.shape[4]],  # (La, Hkv, row)
        "conv_shape": [b.conv_hist.shape[0], b.conv_hist.shape[3]],  # (Lc, C)
    }


# what a mismatch of each key field means, in the order they are compared
_MISMATCH = {
    "model": "it was saved for another model file",
    "spec": "it was saved for another model spec",
    "activations": "it was saved with another activation quantization",
    "kv_cache": "it was saved with another KV cache type",
    "kv_dtype": "it was saved with another KV cache type",
    "kv_shape": "its KV shapes differ from this session's",
    "conv_shape": "its conv-state shapes differ from this session's",
}


def _rows(session, slot: int) -> Iterator[np.ndarray]:
    """The arrays a slot's rows are stored in, in file order: (S, row) per attention layer and kv head for
    keys then values, (S, C) per dwconv layer."""
    b = session.buf
    for cache in (b.k_cache, b.v_cache):  # (La, B, Hkv, S, row)
        for a in range(cache.shape[0]):
            for h in range(cache.shape[2]):
                yield cache[a, slot, h]
    for c in range(b.conv_hist.shape[0]):  # (Lc, B, S, C)
        yield b.conv_hist[c, slot]


def _row_bytes(session) -> int:
    """Bytes one position of one slot takes in the file: its token id, its key, value and conv rows."""
    return 8 + sum(a[0].nbytes for a in _rows(session, 0))


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a).cast("B")  # a C-contiguous view: no copy


@dataclass(frozen=True)
class PromptCache:
    """The file at `path`, for a session whose `cache_key` is `key`. `log` takes the one-line notes."""

    path: Path
    key: dict
    log: Callable[[str], None] = lambda message: None
    max_bytes: int = MAX_SAVE_BYTES

    # -- saving -------------------------------------------------------------------------------------
    def save(self, session, prefixes: Sequence[tuple[int, Sequence[int]]]) -> bool:
        """Write, for each (slot, tokens) in order, the slot's first len(tokens) positions (the tokens it holds,
        as far as its KV is reusable), atomically; True if written. A failure (disk full, read-only) is one
        line, never an exception: the server is stopping. Nothing to save leaves the file as it is. At most
        `max_bytes` of rows are written: the first prefixes as they come, a prefix that does not fit is cut
        (its first positions are as reusable)."""
        row, room, kept = _row_bytes(session), self.max_bytes, []
        for i, tokens in prefixes:
            n = min(len(tokens), room // row)
            if n:
                kept.append((i, list(tokens[:n])))
                room -= n * row
        if not kept:  # a file saved earlier (say, by a server started with another --kv-cache) stays
            self.log(f"hy-edge: prompt cache: no prompt to save to {self.path}")
            return False
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            slots = []
            for i, tokens in kept:
                ids = np.asarray(tokens, np.int64)
                crc = zlib.crc32(_bytes(ids))
                for rows in _rows(session, i):
                    crc = zlib.crc32(_bytes(rows[: len(tokens)]), crc)
                slots.append({"tokens": len(tokens), "crc32": crc})
            header = json.dumps({"version": FORMAT_VERSION, "key": self.key, "slots": slots}).encode()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # recent prompts: the owner's only
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(header)) + header)
                for i, tokens in kept:
                    f.write(_bytes(np.asarray(tokens, np.int64)))
                    for rows in _rows(session, i):
                        f.write(_bytes(rows[: len(tokens)]))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.log(f"hy-edge: prompt cache not saved to {self.path}: {e.strerror or e}")
            return False
        n = sum(len(t) for _, t in kept)
        size = fmt_bytes(self.path.stat().st_size)
        self.log(f"hy-edge: prompt cache: saved {_count(len(kept), 'slot')} ({n} tokens, {size}) to {self.path}")
        return True

    # -- loading ------------------------------------------------------------------------------------
    def load(self, session) -> list[list[int]]:
        """Read the saved prefixes into the session's slots 0, 1, ... (as many as it has, each bounded by
        its context) and return their tokens; [] (and one line saying why) when the file is missing or
        does not match. The session's slots hold what the file holds, nothing else (all empty on a failure)."""
        session.reset()
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # a save cut short (SIGKILL, power)
            with contextlib.suppress(OSError):
                stale.unlink()
        try:
            prefixes = self._read(session)
        except PromptCacheError as e:
            session.reset()
            self.log(f"hy-edge: prompt cache {self.path} not loaded: {e}")
            return []
        n = sum(len(p) for p in prefixes)
        self.log(f"hy-edge: prompt cache: loaded {_count(len(prefixes), 'slot')} ({n} tokens) from {self.path}")
        return prefixes

    def _read(self, session) -> list[list[int]]:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            raise PromptCacheError("no such file (it is written when the server stops)") from None
        except OSError as e:
            raise PromptCacheError(f"cannot be read ({e.strerror or e})") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            slots, start = self._header(f, size)
            row = _row_bytes(session)
            need = start + sum(n * row for n, _ in slots)
            if size != need:
                cut = " (truncated)" if size < need else ""
                raise PromptCacheError(f"it holds {size:,} bytes, its header describes {need:,}{cut}")
            try:
                return self._slots(f, session, slots)
            except OSError as e:
                raise PromptCacheError(f"cannot be read ({e.strerror or e})") from None

    def _header(self, f, size: int) -> tuple[list[tuple[int, int]], int]:
        """(token count, CRC-32) of each saved slot and where their data begins, once the header matches."""
        lead = f.read(len(MAGIC) + 4)
        if len(lead) < len(MAGIC) + 4 or not lead.startswith(MAGIC):
            raise PromptCacheError("not a hy-edge prompt cache")
        (length,) = struct.unpack("<I", lead[len(MAGIC) :])
        if length > size - len(lead):
            raise PromptCacheError(f"its header length {length:,} is beyond the end of the file (truncated)")
        if length > MAX_HEADER_BYTES:
            raise PromptCacheError(f"its header length {length:,} is beyond {MAX_HEADER_BYTES:,} bytes")
        try:
            header = json_loads(f.read(length), max_depth=4)
        except JSONInputError as e:
            raise PromptCacheError(f"its header is {e}") from None
        if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION:
            version = header.get("version") if isinstance(header, dict) else None
            raise PromptCacheError(f"format version {str(version)[:20]}, this runtime reads {FORMAT_VERSION}")
        key = header.get("key")
        if not isinstance(key, dict):
            raise PromptCacheError("its header has no key")
        for field, why in _MISMATCH.items():
            if key.get(field) != self.key[field]:
                raise PromptCacheError(why)
        slots = header.get("slots")
        if not isinstance(slots, list) or not all(
            isinstance(s, dict) and is_int(s.get("tokens")) and s["tokens"] > 0 and is_int(s.get("crc32"))
            for s in slots
        ):
            raise PromptCacheError("its header's slot list is malformed")
        return [(s["tokens"], s["crc32"]) for s in slots], len(lead) + length

    def _slots(self, f, session, slots: list[tuple[int, int]]) -> list[list[int]]:
        """Each saved slot's rows into session slot i (those beyond its slots are not read); positions past
        the session's context are checked, not kept."""
        out = []
        V, S = session.spec.vocab_size, session.max_context
        for i, (n, crc) in enumerate(slots[: session.slots]):
            keep = min(n, S)
            ids = np.empty(n, np.int64)
            got = _read_into(f, _bytes(ids), 0)
            for rows in _rows(session, i):  # (S, row): the first `keep` positions, the rest through a buffer
                got = _read_into(f, _bytes(rows[:keep]), got)
                got = _skip(f, (n - keep) * rows[0].nbytes, got)
            if got != crc:
                raise PromptCacheError(f"slot {i}'s data does not match its checksum (corrupt)")
            if ids.min() < 0 or ids.max() >= V:
                raise PromptCacheError(f"slot {i} holds a token id outside 0..{V - 1}")
            session.positions[i] = keep
            session.truncate(keep, slot=i)  # rebuilds the slot's conv state from its conv inputs
            out.append(ids[:keep].tolist())
        return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _read_into(f, view: memoryview, crc: int) -> int:
    """Fill `view` from f, return the CRC-32 continued over it; PromptCacheError if the file ends first."""
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise PromptCacheError("it ended early (truncated)")
        done += n
    return zlib.crc32(view, crc)


def _skip(f, nbytes: int, crc: int) -> int:
    buf = memoryview(bytearray(min(nbytes, _SKIP_CHUNK)))
    while nbytes > 0:
        chunk = buf[: min(nbytes, len(buf))]
        crc = _read_into(f, chunk, crc)
        nbytes -= len(chunk)
    return crc
