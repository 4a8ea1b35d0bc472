"""The part of an .onnx file the numba runtime reads — metadata and the initializers' headers — parsed
from protobuf's wire format without importing onnx.

Why not `onnx.load(path, load_external_data=False)`: importing onnx (its C++ checker, helpers and
generated classes) costs ~45 ms and ~5 MB of heap that stay for the process's life, and a run reads
nothing of the file but the fields below; the graph's nodes are onnxruntime's business (its backend
still uses onnx). The objects have onnx's field names, so code written against a ModelProto reads
them unchanged, and tests/test_onnx_header.py holds every field equal to onnx's own parse.

Read, of onnx.proto (proto2; repeated numbers accepted packed or not, as protobuf's own parsers do):
  ModelProto   graph = 7, metadata_props = 14
  GraphProto   initializer = 5
  TensorProto  dims = 1, data_type = 2, float_data = 4, int32_data = 5, int64_data = 7, name = 8,
               raw_data = 9, double_data = 10, external_data = 13, data_location = 14
  StringStringEntryProto  key = 1, value = 2
Every other field is skipped by its wire type. Anything that is not well-formed protobuf (a length past
the end, a varint of more than 10 bytes, a group, a text field that is not UTF-8) raises HeaderError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class HeaderError(ValueError):
    """The bytes are not a well-formed ONNX protobuf message."""


@dataclass
class Entry:
    key: str = ""
    value: str = ""
    span: tuple[int, int] = field(default=(0, 0), compare=False, repr=False)  # its bytes in the file, tag included


@dataclass
class Tensor:
    name: str = ""
    data_type: int = 0
    dims: list[int] = field(default_factory=list)
    data_location: int = 0
    external_data: list[Entry] = field(default_factory=list)
    raw_data: bytes = b""
    float_data: list[float] = field(default_factory=list)
    double_data: list[float] = field(default_factory=list)
    int32_data: list[int] = field(default_factory=list)
    int64_data: list[int] = field(default_factory=list)


@dataclass
class Graph:
    initializer: list[Tensor] = field(default_factory=list)


@dataclass
class Model:
    graph: Graph = field(default_factory=Graph)
    metadata_props: list[Entry] = field(default_factory=list)


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    # (value, index after it) of the base-128 varint at i
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise HeaderError("truncated or overlong varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _signed(v: int, bits: int = 64) -> int:
    # int32 and int64 are sent as two's complement in 64 bits
    v &= (1 << 64) - 1
    v = v - (1 << 64) if v >= 1 << 63 else v
    if bits == 32 and not -(1 << 31) <= v < 1 << 31:
        raise HeaderError("int32 field out of range")
    return v


def _fields(buf: memoryview, start: int, end: int):
    # (field number, wire type, value, first byte) of each field of the message in buf[start:end]: an int
    # for a varint, a (start, end) span for the others
    i = start
    while i < end:
        first = i
        tag, i = _varint(buf, i, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise HeaderError("field number 0")
        if wire == _VARINT:
            value, i = _varint(buf, i, end)
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            value = (i, i + size)
            i += size
        elif wire == _LEN:
            size, i = _varint(buf, i, end)
            value = (i, i + size)
            i += size
        elif wire in (3, 4):
            raise HeaderError(f"wire type {wire}, a group (ONNX has none)")
        else:
            raise HeaderError(f"wire type {wire}, which protobuf does not have")
        if i > end:
            raise HeaderError("a field runs past the end of its message")
        yield number, wire, value, first


def _need(wire: int, want: int, what: str) -> None:
    if wire != want:
        raise HeaderError(f"{what} has wire type {wire}, expected {want}")


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    try:
        return str(buf[span[0] : span[1]], "utf-8")
    except UnicodeDecodeError:
        raise HeaderError("a text field is not UTF-8") from None


def _entry(buf: memoryview, span: tuple[int, int]) -> Entry:
    e = Entry()
    for number, wire, value, _ in _fields(buf, *span):
        if number in (1, 2):
            _need(wire, _LEN, "StringStringEntryProto key/value")
            setattr(e, "key" if number == 1 else "value", _text(buf, value))
    return e


def _numbers(buf, wire, value, out: list, fixed: str | None, bits: int = 64) -> None:
    # one repeated number field, packed (a span of them) or not (one of them)
    if fixed is not None:  # float / double
        size = np.dtype(fixed).itemsize
        if wire == _LEN:
            a, b = value
            if (b - a) % size:
                raise HeaderError("a packed field's length is not a multiple of its element size")
            out.extend(np.frombuffer(buf[a:b], fixed).tolist())
        else:
            _need(wire, _I32 if size == 4 else _I64, "a float field")
            out.append(float(np.frombuffer(buf[value[0] : value[1]], fixed)[0]))
    elif wire == _LEN:
        i, end = value
        while i < end:
            v, i = _varint(buf, i, end)
            out.append(_signed(v, bits))
    else:
        _need(wire, _VARINT, "an integer field")
        out.append(_signed(value, bits))


def _tensor(buf: memoryview, span: tuple[int, int]) -> Tensor:
    t = Tensor()
    for number, wire, value, _ in _fields(buf, *span):
        if number == 1:
            _numbers(buf, wire, value, t.dims, None)
        elif number in (2, 14):
            _need(wire, _VARINT, "TensorProto data_type/data_location")
            setattr(t, "data_type" if number == 2 else "data_location", _signed(value, 32))
        elif number == 4:
            _numbers(buf, wire, value, t.float_data, "<f4")
        elif number == 5:
            _numbers(buf, wire, value, t.int32_data, None, 32)
        elif number == 7:
            _numbers(buf, wire, value, t.int64_data, None)
        elif number == 8:
            _need(wire, _LEN, "TensorProto name")
            t.name = _text(buf, value)
        elif number == 9:
            _need(wire, _LEN, "TensorProto raw_data")
            t.raw_data = bytes(buf[value[0] : value[1]])
        elif number == 10:
            _numbers(buf, wire, value, t.double_data, "<f8")
        elif number == 13:
            _need(wire, _LEN, "TensorProto external_data")
            t.external_data.append(_entry(buf, value))
    return t


def parse(data: bytes) -> Model:
    """A Model from the bytes of an .onnx file (HeaderError if they are not well-formed protobuf)."""
    buf = memoryview(data)
    model = Model()
    for number, wire, value, first in _fields(buf, 0, len(buf)):
        if number == 7:
            _need(wire, _LEN, "ModelProto graph")
            for g_number, g_wire, g_value, _ in _fields(buf, *value):
                if g_number == 5:
                    _need(g_wire, _LEN, "GraphProto initializer")
                    model.graph.initializer.append(_tensor(buf, g_value))
        elif number == 14:
            _need(wire, _LEN, "ModelProto metadata_props")
            entry = _entry(buf, value)
            entry.span = (first, value[1])
            model.metadata_props.append(entry)
    return model
