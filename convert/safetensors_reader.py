"""A small safetensors reader over a memory map: one tensor is read (and copied) at a time.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length n, n bytes
of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
data; offsets are relative to the first byte after the header.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path

import numpy as np
from hy_edge_format import safe_json
from hy_edge_format.errors import CheckpointError

# safetensors dtype -> (our dtype name, numpy storage dtype)
DTYPES = {
    "F32": ("f32", np.dtype("<f4")),
    "F16": ("f16", np.dtype("<f2")),
    "BF16": ("bf16", np.dtype("<u2")),
    "F8_E4M3": ("f8_e4m3", np.dtype("u1")),  # raw float8_e4m3fn codes
}

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_DIMS = 8


class SafetensorsFile:
    """The tensor table of one .safetensors file; `read(name)` maps and copies one tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: truncated or not a safetensors file (header of {n} bytes, file of {size})"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        try:
            header = safe_json.loads(raw, max_depth=3)  # {name: {"shape": [...]}}: three levels
        except safe_json.JSONInputError as e:
            raise CheckpointError(f"{self.path}: safetensors header is {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: safetensors header should be a JSON object")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise CheckpointError(f"{self.path}: safetensors __metadata__ should map names to strings")
        self._data_start = 8 + n
        data_size = size - self._data_start
        # name -> (dtype name, shape, numpy storage dtype, byte offset in file)
        self.entries: dict[str, tuple[str, tuple[int, ...], np.dtype, int]] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, data_size)

    def _entry(self, name: str, info, data_size: int):
        if not isinstance(info, dict):
            raise CheckpointError(f"{self.path}: header entry of tensor '{name}' should be an object")
        try:
            dtype = safe_json.field(info, "dtype", "str", where=f"{name}.")
            shape = tuple(safe_json.field(info, "shape", "int-list", where=f"{name}."))
            offsets = safe_json.field(info, "data_offsets", "int-list", where=f"{name}.")
        except safe_json.JSONInputError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
            raise CheckpointError(f"{self.path}: tensor '{name}' has shape {list(shape)}")
        if len(offsets) != 2:
            raise CheckpointError(f"{self.path}: tensor '{name}' data_offsets should be [begin, end], got {offsets}")
        begin, end = offsets
        if dtype not in DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' has dtype {safe_json.show(dtype)}, which is not supported "
                f"(supported: {', '.join(DTYPES)})"
            )
        kind, np_dtype = DTYPES[dtype]
        if end - begin != math.prod(shape) * np_dtype.itemsize or begin < 0:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' data_offsets [{begin}, {end}] do not fit its shape {list(shape)}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor '{name}' ends at byte {self._data_start + end}, "
                f"the file has {self._data_start + data_size}"
            )
        return kind, shape, np_dtype, self._data_start + begin

    def read(self, name: str, convert=None) -> np.ndarray:
        """The tensor as stored — float32/float16, uint16 bf16 bits, or uint8 fp8 codes — copied out of
        the map, or `convert(view)` of it; the file's pages are then dropped, so reading a 1 GB
        checkpoint tensor by tensor never holds more than one tensor's pages."""
        kind, shape, np_dtype, offset = self.entries[name]
        count = math.prod(shape)
        if count == 0:
            return np.zeros(shape, np_dtype)
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = np.frombuffer(self._mm, dtype=np_dtype, count=count, offset=offset).reshape(shape)
        out = view.copy() if convert is None else convert(view)
        del view  # release the buffer export so close() can unmap
        start = offset - offset % mmap.PAGESIZE
        self._mm.madvise(mmap.MADV_DONTNEED, start, offset + count * np_dtype.itemsize - start)
        return out

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the map goes with it
                pass
            self._mm = None


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: bf16 is the top half of an f32."""
    out = np.empty(bits.shape, np.uint32)
    np.left_shift(bits, 16, out=out, dtype=np.uint32)  # one f32-sized result, no temporaries
    return out.view(np.float32)
