"""FP8 NaN codes: the fused kernels decode without a NaN path, so the converter never writes NaN/inf
weights and the loader refuses a file whose FP8 bytes hold a NaN code."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from runtime_helpers import converted

import edge_runtime
from edge_runtime import format as F
from edge_runtime.errors import HyEdgeError, ModelFileError


@pytest.fixture(scope="module")
def hy_fp8(hunyuan_f32_dir):
    return converted(hunyuan_f32_dir, "e4m3")


def test_nan_codes_are_refused_at_load(hy_fp8, tmp_path):
    path = tmp_path / hy_fp8.name  # the graph names its data file
    shutil.copy(hy_fp8, path)
    shutil.copy(str(hy_fp8) + ".data", str(path) + ".data")
    proto = onnx.load(str(path), load_external_data=False)
    init = next(t for t in proto.graph.initializer if t.name.endswith("down_proj.weight" + F.QWEIGHT))
    offset = int({e.key: e.value for e in init.external_data}["offset"])
    with open(str(path) + ".data", "r+b") as f:
        f.seek(offset + 17)
        f.write(b"\x7f")  # E4M3 NaN
    with pytest.raises(ModelFileError, match="NaN"):
        edge_runtime.load(path).session()


def test_converter_refuses_nan_weights(hunyuan_f32_dir, tmp_path):
    from hy_edge_convert import QuantPolicy, convert
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "ckpt"
    shutil.copytree(hunyuan_f32_dir, src)
    tensors = load_file(src / "model.safetensors")
    name = next(n for n in tensors if n.endswith("mlp.up_proj.weight"))
    tensors[name][3, 5] = np.nan
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    with pytest.raises(HyEdgeError, match=name):
        convert(src, out, QuantPolicy(format="e4m3"))
    assert not list(out.parent.iterdir())  # nothing half-written
    assert json.loads((src / "config.json").read_text())  # the source is untouched
