"""Converter options shown to do what they say (issue 9, test honesty): `--format auto` chooses E5M2
where E5M2 wins, `--keep-fp16` keeps the matching weights in FP16, and options that cannot be applied
(block:N not dividing K, --format/--granularity on a carried FP8 checkpoint) say so in the report and on
stderr."""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from hy_edge_convert import QuantPolicy, convert
from hy_edge_convert.quantize import quantize_weight
from hy_edge_format import format as F

import edge_runtime
from edge_runtime.cli import main


def quant_report(path) -> dict:
    return json.loads(F.metadata(onnx.load(str(path), load_external_data=False))[F.META_QUANT])


def test_auto_chooses_e5m2_for_a_heavy_tailed_weight():
    rng = np.random.default_rng(0)
    # a range of 2**20 within each row: one outlier per row and everything else 2**-20 of it. Scaled to
    # the row's amax, the small values are normal E5M2 numbers but fall below E4M3's smallest subnormal
    # (2**-9 of 448): E5M2's exponent range wins over E4M3's extra mantissa bit. (On a norm-based error
    # E5M2 wins only where E4M3 loses values to underflow: E5M2's grid is a subset of E4M3's otherwise.)
    heavy = (np.sign(rng.standard_normal((64, 64))) * 2.0**-20).astype(np.float32)
    heavy[:, 0] = 1.0
    q = quantize_weight("model.layers.0.mlp.up_proj.weight", heavy, QuantPolicy(format="auto"))
    e4 = quantize_weight("model.layers.0.mlp.up_proj.weight", heavy, QuantPolicy(format="e4m3"))
    assert q.storage == "e5m2" and q.rel_error < e4.rel_error
    gaussian = rng.standard_normal((64, 64)).astype(np.float32)
    assert quantize_weight("x.up_proj.weight", gaussian, QuantPolicy(format="auto")).storage == "e4m3"


def test_keep_fp16_keeps_the_matching_weights(hunyuan_f32_dir, tmp_path):
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["convert", str(hunyuan_f32_dir), "-o", str(out), "--keep-fp16", "*.mlp.down_proj.*"])
    assert r.exit_code == 0, r.output
    tensors = quant_report(out)["tensors"]
    kept = {n for n, t in tensors.items() if t["storage"] == "fp16"}
    assert kept == {F.EMBED} | {n for n in tensors if ".mlp.down_proj." in n}
    assert all(t["storage"] == "e4m3" for n, t in tensors.items() if n.endswith("_proj.weight") and n not in kept)
    assert edge_runtime.load(out).generate("Hi", max_tokens=2).completion_tokens >= 1


def test_block_fallback_is_reported(hunyuan_f32_dir, tmp_path):
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["convert", str(hunyuan_f32_dir), "-o", str(out), "--granularity", "block:7"])
    assert r.exit_code == 0, r.output
    assert "hy-edge: note: block:7 does not divide" in r.stderr  # before: silently per channel
    tensors = quant_report(out)["tensors"]
    assert any("block:7" in t.get("note", "") and t["granularity"] == "channel" for t in tensors.values())


def test_options_ignored_for_a_carried_fp8_checkpoint_are_reported(fp8_dir, tmp_path):
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["convert", str(fp8_dir), "-o", str(out), "--format", "e5m2"])
    assert r.exit_code == 0, r.output
    assert "carried over" in r.stderr  # before: --format e5m2 silently not applied
    notes = [t.get("note", "") for t in quant_report(out)["tensors"].values() if t.get("carried")]
    assert notes and all("carried over" in n for n in notes)
    out2 = tmp_path / "m2.onnx"
    convert(fp8_dir, out2, QuantPolicy())  # the defaults ask nothing that is not done: no note
    assert not any("note" in t for t in quant_report(out2)["tensors"].values())
