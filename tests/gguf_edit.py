"""Rewrite a GGUF file's metadata at the byte level (the gguf package's writer refuses the malformed
values the hardening tests need): parse it into key/values, tensor infos and data, change, re-emit."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class GGUF:
    version: int
    kv: dict[str, tuple[int, object]]  # key -> (value type, value); arrays: (ARRAY, (element type, [values]))
    tensors: list[tuple[str, list[int], int, int]] = field(default_factory=list)  # name, dims, type, offset
    data: bytes = b""
    alignment: int = 32


def _string(b: bytes, i: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", b, i)
    return b[i + 8 : i + 8 + n].decode("utf-8"), i + 8 + n


def _value(b: bytes, i: int, t: int):
    if t in SCALARS:
        return struct.unpack_from(SCALARS[t], b, i)[0], i + struct.calcsize(SCALARS[t])
    if t == STRING:
        return _string(b, i)
    et, n = struct.unpack_from("<IQ", b, i)
    i += 12
    out = []
    for _ in range(n):
        v, i = _value(b, i, et)
        out.append(v)
    return (et, out), i


def parse(b: bytes) -> GGUF:
    assert b[:4] == b"GGUF"
    version, n_t, n_kv = struct.unpack_from("<IQQ", b, 4)
    i, kv = 24, {}
    for _ in range(n_kv):
        key, i = _string(b, i)
        (t,) = struct.unpack_from("<I", b, i)
        kv[key], i = (t, None), i + 4
        v, i = _value(b, i, t)
        kv[key] = (t, v)
    tensors = []
    for _ in range(n_t):
        name, i = _string(b, i)
        (nd,) = struct.unpack_from("<I", b, i)
        dims = list(struct.unpack_from(f"<{nd}Q", b, i + 4))
        i += 4 + 8 * nd
        ty, off = struct.unpack_from("<IQ", b, i)
        i += 12
        tensors.append((name, dims, ty, off))
    align = kv.get("general.alignment", (4, 32))[1]
    start = -(-i // align) * align
    return GGUF(version, kv, tensors, b[start:], align)


def enc_string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def enc_value(t: int, v) -> bytes:
    if t in SCALARS:
        return struct.pack(SCALARS[t], v)
    if t == STRING:
        return enc_string(v)
    et, items = v
    return struct.pack("<IQ", et, len(items)) + b"".join(enc_value(et, x) for x in items)


def emit(g: GGUF, alignment: int | None = None) -> bytes:
    """The file's bytes; `alignment` pads the header to it (default: the file's own, else 32)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", g.version, len(g.tensors), len(g.kv)))
    for key, (t, v) in g.kv.items():
        out += enc_string(key) + struct.pack("<I", t) + enc_value(t, v)
    for name, dims, ty, off in g.tensors:
        out += enc_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ty, off)
    align = alignment or g.alignment
    out += b"\0" * (-len(out) % align)
    return bytes(out) + g.data
