"""FP8 NaN codes: the fused kernels decode without a NaN path, so the converter never writes NaN/inf
weights and the loader refuses a file whose FP8 bytes hold a NaN code."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import zlib

import numpy as np
import onnx
import onnx_edit
import pytest
from hy_edge_format import format as F
from hy_edge_format.errors import HyEdgeError, ModelFileError
from runtime_helpers import converted

import edge_runtime


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
    length = int({e.key: e.value for e in init.external_data}["length"])
    with open(str(path) + ".data", "r+b") as f:
        f.seek(offset + 17)
        f.write(b"\x7f")  # E4M3 NaN
        f.seek(offset)
        crc = zlib.crc32(f.read(length))
    # a file whose checksums cover the NaN code (a writer other than our converter): the code scan refuses it
    meta = {e.key: e.value for e in proto.metadata_props}
    sums = json.loads(meta[F.META_CHECKSUMS])
    sums["tensors"][init.name] = crc
    onnx.helper.set_model_props(proto, {**meta, F.META_CHECKSUMS: json.dumps(sums)})
    onnx_edit.save(proto, path)
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


DAZ_CHILD = """
import ctypes, ctypes.util, sys
import numba
import edge_runtime
from hy_edge_format.errors import HyEdgeError
from hy_edge_ops.linear import subnormals_work
numba.set_num_threads(1)  # the kernels run on this thread, whose flags are set below
assert subnormals_work()
libm = ctypes.CDLL(ctypes.util.find_library("m"))
env = (ctypes.c_uint32 * 8)()  # glibc's x86-64 fenv_t: the x87 environment, then MXCSR
assert libm.fegetenv(env) == 0
env[7] |= 0x8040  # DAZ and FTZ, as a library built with -ffast-math sets them at load
assert libm.fesetenv(env) == 0
assert not subnormals_work()
try:
    edge_runtime.load(sys.argv[1], threads=1).session()
except HyEdgeError as e:
    print(e)
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="sets the x86 MXCSR DAZ/FTZ flags")
def test_a_process_flushing_subnormals_is_refused(hy_fp8):
    # FP8 subnormal codes decode to float32 subnormals: with DAZ on they would read as 0, silently
    r = subprocess.run([sys.executable, "-c", DAZ_CHILD, str(hy_fp8)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "flushes float32 subnormals to zero" in r.stdout
