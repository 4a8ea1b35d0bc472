"""A converted .onnx file as the runtime reads it: its header (metadata and initializer headers, parsed by
hy_edge_format.onnx_header without importing onnx), checked against the header checksum the converter
stored, and its initializers: inline ones copied out of the header, external ones as views into one
read-only memory map per data file. Everything read from the file is checked before it is used (sizes,
shapes, offsets, the data file's extent); anything wrong is a ModelFileError naming the file and field.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hy_edge_format import format as F
from hy_edge_format import onnx_header
from hy_edge_format.errors import ModelFileError, SpecError
from hy_edge_format.safe_json import JSONInputError, show
from hy_edge_format.safe_json import loads as json_loads
from hy_edge_format.spec import ModelSpec

from ..integrity import external_entry, verify_header
from .memory import refuse_huge_pages

ACTIVATIONS = ("none", "e4m3", "e5m2", "static", "q8")  # the linear-input quantization a file may ask for
# fake-quantized by the session before each linear (the Python layer loop); "q8" is done inside the kernels
# of the linears it applies to (hy_edge_ops.blockq.INTEGER_INPUTS' storages), any layer loop
FAKE_QUANT = ("e4m3", "e5m2", "static")
# A hy-edge header holds the graph, the metadata (a tokenizer of a few MB) and tensors under 1 KB; the
# weights are in the data file. protobuf itself cannot encode a message over 2 GB.
MAX_HEADER_BYTES = 1 << 30
MAX_ELEMENTS = 1 << 40  # of one tensor: far beyond any weight (Hunyuan-0.5B's largest has 1.2e8)

# ONNX TensorProto.DataType -> (numpy dtype the runtime views the bytes as, storage name)
_DTYPES = {
    1: (np.float32, "fp32"),
    10: (np.uint16, "fp16"),  # raw IEEE half bits; kernels widen them (hy_edge_ops.half)
    17: (np.uint8, "e4m3"),  # FLOAT8E4M3FN
    19: (np.uint8, "e5m2"),  # FLOAT8E5M2
    3: (np.int8, "int8"),  # block codes (hy_edge_ops.blockq)
    21: (np.uint8, "uint4"),  # UINT4, two codes a byte: read as bytes, shape (..., K) -> (..., K / 2)
    2: (np.uint8, "uint8"),  # packed sub-byte FP codes: the metadata names the format (read_tensors)
    7: (np.int64, "int64"),
    6: (np.int32, "int32"),
    11: (np.float64, "fp64"),
}


@dataclass(frozen=True)
class Tensor:
    """One initializer as stored: `data` is a view (memory-mapped when external)."""

    name: str
    storage: str  # fp32 | fp16 | e4m3 | e5m2 | uint8 | int64 | int32 | fp64 | a block storage (format.BLOCK_STORAGES)
    data: np.ndarray
    source: tuple[Path, int] | None = None  # (data file, byte offset) of an external tensor


def read_onnx(path: Path) -> onnx_header.Model:
    """Metadata and initializer headers of an .onnx file, verified against its stored header checksum;
    ModelFileError (one line) for anything unreadable or corrupt."""
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_HEADER_BYTES:
            raise ModelFileError(
                f"{path}: {size:,} bytes is not a hy-edge model header (its weights belong in the .data file)"
            )
        data = path.read_bytes()
    except OSError as e:
        raise ModelFileError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        proto = onnx_header.parse(data)
    except onnx_header.HeaderError as e:
        raise ModelFileError(f"{path}: not a readable ONNX model ({e})") from None
    verify_header(data, proto, path)
    return proto


def metadata(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


@dataclass(frozen=True)
class Header:
    """What a converted file says about itself, read and checked: its format version, spec and
    quantization report; the tokenizer metadata stays text in `meta` until a model parses it."""

    proto: onnx_header.Model
    meta: dict[str, str]
    spec: ModelSpec
    quantization: dict


def read_header(path: Path) -> Header:
    """read_onnx, then the format version, the spec (every field typed and bounded) and the
    quantization report; ModelFileError naming the file and the field."""
    proto = read_onnx(path)
    meta = metadata(proto)
    version = meta.get(F.META_FORMAT)
    if version is None:
        raise ModelFileError(f"{path.name}: not a hy-edge model (no '{F.META_FORMAT}' metadata)")
    if version != str(F.FORMAT_VERSION):
        raise ModelFileError(
            f"{path.name}: format version {version[:40]} is not supported (this runtime reads "
            f"version {F.FORMAT_VERSION}); convert the model again"
        )
    if F.META_SPEC not in meta:
        raise ModelFileError(f"{path.name}: metadata '{F.META_SPEC}' is missing")
    try:
        spec = ModelSpec.from_json(meta[F.META_SPEC], source=f"{path.name}: metadata '{F.META_SPEC}'")
    except SpecError as e:
        raise ModelFileError(str(e)) from None
    quant = parse_json_meta(meta, F.META_QUANT, path, required=False) or {}
    if quant.get("activations", "none") not in ACTIVATIONS:
        raise ModelFileError(f"{path.name}: activation quantization {show(quant.get('activations'))} is not supported")
    if not isinstance(quant.get("tensors", {}), dict):
        raise ModelFileError(f"{path.name}: metadata '{F.META_QUANT}': field 'tensors' should be an object")
    return Header(proto, meta, spec, quant)


def parse_json_meta(meta: dict[str, str], key: str, path: Path, required: bool = True) -> dict | None:
    """A JSON-object metadata entry, bounded in nesting (safe_json); ModelFileError naming the key."""
    text = meta.get(key)
    if text is None:
        if required:
            raise ModelFileError(f"{path.name}: metadata '{key}' is missing (not a hy-edge model file?)")
        return None
    try:
        value = json_loads(text)
    except JSONInputError as e:
        raise ModelFileError(f"{path.name}: metadata '{key}' is {e}") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path.name}: metadata '{key}' should be a JSON object, got {show(value)}")
    return value


def read_tensors(proto, path: Path, quantization: dict | None = None) -> dict[str, Tensor]:
    """Every initializer of the graph, external ones as views into a read-only memmap (their extent
    checked against the data file's size first: integrity.check_data_size). `quantization`: the header's
    report, which names the format of packed sub-byte codes (uint8 `W.qweight`)."""
    maps: dict[str, np.memmap] = {}
    out: dict[str, Tensor] = {}
    for t in proto.graph.initializer:
        if t.data_type not in _DTYPES:
            continue  # not a type any weight uses; model_tensors() will report what is missing
        dtype, storage = _DTYPES[t.data_type]
        if storage in ("uint8", "uint4") and t.name.endswith(F.QWEIGHT):
            storage = _block_storage(quantization, t.name[: -len(F.QWEIGHT)], storage, path)
        shape = tuple(t.dims)
        if any(d < 0 for d in shape) or math.prod(shape) > MAX_ELEMENTS:
            raise ModelFileError(f"{path.name}: tensor '{t.name}' has shape {show(list(shape))}")
        count = math.prod(shape)
        if t.data_type == 21:  # UINT4, packed: two codes a byte along the last axis
            if not shape or shape[-1] % 2:
                raise ModelFileError(f"{path.name}: uint4 tensor '{t.name}' has shape {show(list(shape))}")
            shape, count = (*shape[:-1], shape[-1] // 2), count // 2
        source = None
        if t.data_location == onnx_header.EXTERNAL:
            data, source = _external(t, path, maps, np.dtype(dtype), count)
        else:
            data = _inline(t, np.dtype(dtype), count, path)
        out[t.name] = Tensor(t.name, storage, data.reshape(shape), source)
    return out


def _block_storage(quantization: dict | None, name: str, codes: str, path: Path) -> str:
    """The block storage of a UINT8 / UINT4 `W.qweight`, which the metadata names (uint4 when it does not,
    as files written before the K-quants were kept)."""
    entry = ((quantization or {}).get("tensors") or {}).get(name)
    storage = entry.get("storage") if isinstance(entry, dict) else None
    if codes == "uint4" and storage is None:
        return codes
    block = F.BLOCK_STORAGES.get(storage) if isinstance(storage, str) else None
    if block is None or block.codes != codes:
        raise ModelFileError(
            f"{path.name}: {codes} tensor '{name}{F.QWEIGHT}' has no block storage in metadata "
            f"'{F.META_QUANT}' (got {show(storage)})"
        )
    return storage


def _external(t, path: Path, maps: dict, dtype: np.dtype, count: int) -> tuple[np.ndarray, tuple[Path, int]]:
    location, offset, length = external_entry(t, path)
    data_path = path.parent / location
    if location not in maps:
        if not data_path.is_file():
            raise ModelFileError(f"{path.name}: external data file not found: {data_path}")
        if data_path.stat().st_size == 0:
            raise ModelFileError(f"{path.name}: external data file is empty: {data_path}")
        maps[location] = np.memmap(data_path, dtype=np.uint8, mode="r")
        start = maps[location].ctypes.data  # the mapping's first byte (offset 0: page-aligned)
        refuse_huge_pages(start, start + -(-maps[location].nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    mm = maps[location]
    length = count * dtype.itemsize if length is None else length
    if length != count * dtype.itemsize or offset + length > mm.shape[0]:
        raise ModelFileError(f"{path.name}: tensor '{t.name}' lies outside {location} (truncated or corrupt data file)")
    if offset % dtype.itemsize:
        raise ModelFileError(f"{path.name}: tensor '{t.name}' is misaligned in {location}")
    # .view(np.ndarray) drops the memmap subclass (numba types plain arrays); still no copy.
    return mm[offset : offset + length].view(np.ndarray).view(dtype), (data_path, offset)


def _inline(t, dtype: np.dtype, count: int, path: Path) -> np.ndarray:
    if t.raw_data:
        if len(t.raw_data) != count * dtype.itemsize:
            raise ModelFileError(
                f"{path.name}: tensor '{t.name}' holds {len(t.raw_data)} bytes, expected {count * dtype.itemsize}"
            )
        data = np.frombuffer(t.raw_data, dtype=dtype)
    elif dtype == np.float32 and len(t.float_data):
        data = np.asarray(t.float_data, np.float32)
    elif dtype == np.float64 and len(t.double_data):
        data = np.asarray(t.double_data, np.float64)
    elif dtype == np.int64 and len(t.int64_data):
        data = np.asarray(t.int64_data, np.int64)
    elif len(t.int32_data):  # int32, and FLOAT16 / FLOAT8 bits stored one per int32
        data = np.asarray(t.int32_data, np.int64).astype(dtype)
    else:
        data = np.zeros(0, dtype)
    if data.size != count:
        raise ModelFileError(f"{path.name}: tensor '{t.name}' holds {data.size} values, expected {count}")
    return data
