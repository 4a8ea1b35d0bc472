"""hy_edge_format.onnx_header reads what onnx's own parser reads: every field the runtime uses, on a
converted model and on hand-made tensors in each storage form; it refuses what is not protobuf; and a
run (`hy-edge run`, `edge_runtime.load`) never imports onnx."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from hy_edge_format import onnx_header
from hy_edge_format.errors import ModelFileError
from onnx import TensorProto, helper, numpy_helper
from runtime_helpers import converted

import edge_runtime


def _entries(entries) -> list[tuple[str, str]]:
    return [(e.key, e.value) for e in entries]


def _same(mine: onnx_header.Model, ref: onnx.ModelProto) -> None:
    assert _entries(mine.metadata_props) == _entries(ref.metadata_props)
    assert [t.name for t in mine.graph.initializer] == [t.name for t in ref.graph.initializer]
    for a, b in zip(mine.graph.initializer, ref.graph.initializer, strict=True):
        assert (a.data_type, a.dims, a.data_location) == (b.data_type, list(b.dims), b.data_location), b.name
        assert _entries(a.external_data) == _entries(b.external_data), b.name
        assert a.raw_data == b.raw_data, b.name
        for name in ("float_data", "double_data", "int32_data", "int64_data"):
            assert a.__getattribute__(name) == list(getattr(b, name)), (b.name, name)


@pytest.fixture(scope="module")
def hy_fp8(hunyuan_f32_dir):
    return converted(hunyuan_f32_dir, "e4m3")


def test_a_converted_model_reads_as_onnx_reads_it(hy_fp8):
    data = hy_fp8.read_bytes()
    mine = onnx_header.parse(data)
    _same(mine, onnx.load_from_string(data))
    assert any(t.data_location == onnx_header.EXTERNAL for t in mine.graph.initializer)
    assert any(t.raw_data for t in mine.graph.initializer)  # inline scales and norms
    assert len(mine.metadata_props) >= 3


def _tensors() -> list[TensorProto]:
    rng = np.random.default_rng(0)
    raw = numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "raw")
    floats = helper.make_tensor("floats", TensorProto.FLOAT, [2, 2], [1.5, -0.0, float("inf"), 3e-39])
    doubles = helper.make_tensor("doubles", TensorProto.DOUBLE, [3], [1e300, -2.5, 0.1])
    ints = helper.make_tensor("int32", TensorProto.INT32, [4], [0, -1, 2**31 - 1, -(2**31)])
    longs = helper.make_tensor("int64", TensorProto.INT64, [3], [-(2**63), 2**63 - 1, -7])
    halves = helper.make_tensor("half", TensorProto.FLOAT16, [3], np.array([1, -2, 0.5], np.float16).view(np.uint16))
    scalar = helper.make_tensor("scalar", TensorProto.FLOAT, [], [2.0])
    ext = TensorProto(name="ext", data_type=TensorProto.FLOAT8E4M3FN, dims=[1024, 7])
    ext.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "w.data"), ("offset", "65536"), ("length", "7168")):
        ext.external_data.add(key=k, value=v)
    named = numpy_helper.from_array(np.arange(4, dtype=np.uint8), "naïve ∑ name")
    return [raw, floats, doubles, ints, longs, halves, scalar, ext, named]


def _model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])
    graph = helper.make_graph([helper.make_node("Add", ["x", "raw"], ["y"])], "g", [x], [y], _tensors())
    model = helper.make_model(graph, producer_name="test")
    helper.set_model_props(model, {"hy_edge.format": "1", "empty": "", "text": "ünïcode ✓\n" * 50})
    return model


def test_every_storage_form_reads_as_onnx_reads_it():
    data = _model().SerializeToString()
    mine = onnx_header.parse(data)
    _same(mine, onnx.load_from_string(data))
    by_name = {t.name: t for t in mine.graph.initializer}
    assert by_name["int64"].int64_data == [-(2**63), 2**63 - 1, -7]  # signed 64-bit varints
    assert by_name["int32"].int32_data == [0, -1, 2**31 - 1, -(2**31)]
    assert by_name["ext"].dims == [1024, 7]


def test_repeated_numbers_read_packed_and_unpacked():
    # proto2 writes `dims` one varint per element; a packed encoding of the same field must read the same
    unpacked = TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[300, 2, 70000]).SerializeToString()
    body = b"".join(_varint(d) for d in (300, 2, 70000))
    packed = _field(1, body) + TensorProto(name="t", data_type=TensorProto.FLOAT).SerializeToString()
    assert packed != unpacked
    for tensor in (unpacked, packed):
        model = _field(7, _field(5, tensor))  # ModelProto.graph.initializer
        assert onnx_header.parse(model).graph.initializer[0].dims == [300, 2, 70000]
        assert list(onnx.load_from_string(model).graph.initializer[0].dims) == [300, 2, 70000]


def _field(number: int, payload: bytes) -> bytes:
    # a length-delimited field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append(v & 0x7F | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def test_truncated_files_fail_where_onnx_fails():
    # every prefix of a model: onnx's parser and this one agree on whether it is a message at all, and
    # on every field where it is (ASCII text only: a cut inside a UTF-8 character is refused here)
    model = _model()
    helper.set_model_props(model, {"hy_edge.format": "1", "text": "abc" * 40})
    model.graph.initializer.pop()  # the non-ASCII name
    data = model.SerializeToString()
    agree = failed = 0
    for n in range(len(data)):
        try:
            ref = onnx.load_from_string(data[:n])
        except Exception:
            ref = None
        try:
            mine = onnx_header.parse(data[:n])
        except onnx_header.HeaderError:
            mine = None
        assert (mine is None) == (ref is None), f"prefix of {n} bytes"
        if ref is not None:
            _same(mine, ref)
            agree += 1
        else:
            failed += 1
    assert agree > 5 and failed > len(data) // 2


@pytest.mark.parametrize(
    "data, why",
    [
        (b"\x3a\x05abc", "runs past"),  # graph, 5 bytes announced, 3 there
        (b"\x08" + b"\xff" * 11, "varint"),  # ir_version, an 11-byte varint
        (b"\x0b\x0c", "wire type 3"),  # a group
        (b"\x38\x01", "graph has wire type 0"),  # graph as a number
        (b"\x72\x04\x0a\x02\xc3\x28", "UTF-8"),  # a metadata key that is not UTF-8
    ],
)
def test_malformed_bytes_are_refused(data, why):
    with pytest.raises(onnx_header.HeaderError, match=why):
        onnx_header.parse(data)


def test_a_malformed_file_is_a_one_line_model_file_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x3a\x05abc")
    with pytest.raises(ModelFileError, match=r"not a readable ONNX model \(a field runs past"):
        edge_runtime.load(bad)
    cli = [sys.executable, "-m", "edge_runtime", "run", "--model", str(bad), "-"]
    out = subprocess.run(cli, input="hi", capture_output=True, text=True)
    assert out.returncode != 0
    assert "not a readable ONNX model" in out.stderr and "Traceback" not in out.stderr


def test_running_a_model_never_imports_onnx(hy_fp8):
    code = (
        "import sys, edge_runtime; m = edge_runtime.load(sys.argv[1]); s = m.session(); s.forward([1, 2, 3]);"
        "from edge_runtime.cli import model as cli_model; cli_model.is_complete(m.path);"
        "print('onnx' in sys.modules, 'onnx_header' in sys.modules.get('edge_runtime.engine.model_file').__dict__)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(hy_fp8)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    cli = [sys.executable, "-X", "importtime", "-m", "edge_runtime", "run", "--raw", "--max-tokens", "2"]
    out = subprocess.run([*cli, "--model", str(hy_fp8), "-"], input="hi", capture_output=True, text=True, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "hy_edge_format.onnx_header" in imported and "edge_runtime.cli.convert" in imported
    assert not {m for m in imported if m == "onnx" or m.startswith("onnx.")}
