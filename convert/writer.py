"""Writing the model: initializers stream into the external data file as they are produced (aligned so
the runtime can memory-map them), the small graph goes last, and both appear under their final names
only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

# Each external tensor starts on a page boundary of every common kernel: 4 KB (x86), 16 KB (Raspberry Pi 5's
# default kernel, Apple silicon), 64 KB (some arm64 server kernels). The file is mapped from offset 0, so
# a smaller alignment is still correct, but then tensors share pages and a view's first page is partial.
# The padding is a hole (seek, not written zeros): no disk cost where the file system supports them.
# Tensors smaller than that (scales, norms: read with read(2), never mapped) start on a cache line instead:
# 64 KB apiece would add 26 MB to SmolLM2's file of block weights, whose scales are 630 small tensors.
ALIGN = 64 * 1024
SMALL_ALIGN = 64
INLINE_LIMIT = 1024  # smaller tensors (scales, norms of tiny models) live inside the .onnx itself

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.uint8): TensorProto.UINT8,  # the K-quants' byte sub-scales
    np.dtype(np.int8): TensorProto.INT8,
}


class ExternalData:
    """Appends tensors to `<out>.data` inside a hidden work directory beside `out`; the files get their
    final names there (the .onnx refers to its data by name) and move out only when complete."""

    def __init__(self, out: Path):
        self.workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        self.final = out.with_name(out.name + ".data")
        self.path = self.workdir / self.final.name
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self.size = 0
        self.checksums: dict[str, int] = {}  # tensor name -> CRC-32 of its bytes in the data file

    def add(
        self, name: str, array: np.ndarray, data_type: int | None = None, dims: tuple[int, ...] | None = None
    ) -> TensorProto:
        """`array`'s bytes as initializer `name`; `dims` when they are not the array's shape (packed
        4-bit codes: two to a byte)."""
        array = np.ascontiguousarray(array)
        t = TensorProto()
        t.name = name
        t.dims.extend(array.shape if dims is None else dims)
        t.data_type = data_type if data_type is not None else NP_TO_ONNX[array.dtype]
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)  # no copy on a little-endian host
        raw = memoryview(little.reshape(-1)).cast("B")  # its bytes, not a copy of them
        if array.nbytes < INLINE_LIMIT:
            t.raw_data = raw.tobytes()
            return t
        pad = -self.size % (ALIGN if array.nbytes >= ALIGN else SMALL_ALIGN)
        self._f.seek(pad, os.SEEK_CUR)  # the tensor written next fills the file up to it
        offset = self.size + pad
        self._f.write(raw)
        self.checksums[name] = zlib.crc32(raw)
        self.size = offset + len(raw)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.final.name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def commit(model: onnx.ModelProto, out: Path, data: ExternalData) -> None:
    """Write and check the graph beside its data in the work directory, then move both out: the old
    .onnx goes first, so an interruption between the renames leaves no .onnx pointing at wrong data."""
    data.close()
    tmp = data.workdir / out.name
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    onnx.checker.check_model(str(tmp))  # by path: external data resolved beside it
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    os.replace(data.path, data.final)
    os.replace(tmp, out)
    shutil.rmtree(data.workdir, ignore_errors=True)
