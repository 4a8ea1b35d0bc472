"""`hy-edge convert` / `hy-edge info` as a user meets them: one line per mistake, exit code 2, and no
file that looks finished after a failure or an interruption."""

from __future__ import annotations

import json
import subprocess
import sys

import checkpoints as ck
import onnx
import pytest
from hy_edge_convert import QuantPolicy, convert
from hy_edge_format import format as F


def hy_edge(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory):
    return ck.make_hunyuan(tmp_path_factory.mktemp("hy") / "ckpt")


def assert_user_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hy-edge: error: "), result.stderr
    for w in words:
        assert w in lines[0]


def test_convert_and_info(hunyuan, tmp_path):
    out = tmp_path / "m.onnx"
    r = hy_edge("convert", hunyuan, "-o", out, "--format", "auto", "--granularity", "block:16")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "worst FP8 relative error" in r.stdout and "peak RSS" in r.stdout
    r = hy_edge("info", out)
    assert r.returncode == 0, r.stderr
    assert "hunyuan_v1_dense" in r.stdout and "granularity block:16" in r.stdout
    assert "qk-norm after RoPE, q/k/v bias False" in r.stdout
    assert "budget allows a context of 256 tokens" in r.stdout  # the tiny model's own limit


def test_convert_with_calibrated_rounding(hunyuan, tmp_path):
    out = tmp_path / "m.onnx"
    r = hy_edge("convert", hunyuan, "-o", out, "--rounding", "gptq", "--scales", "search")
    assert r.returncode == 0, r.stderr
    quant = json.loads(F.metadata(onnx.load(str(out), load_external_data=False))[F.META_QUANT])
    assert (quant["rounding"], quant["scales"], quant["calibration"]["text"]) == ("gptq", "search", "text.txt")
    r = hy_edge("info", out)
    assert r.returncode == 0 and "rounding gptq, scales search" in r.stdout, r.stderr


def _bad_inputs(tmp_path, hunyuan):
    truncated = tmp_path / "truncated"
    truncated.mkdir(parents=True)
    (truncated / "config.json").write_text((hunyuan / "config.json").read_text())
    data = (hunyuan / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    gguf = ck.make_gguf_llama(tmp_path / "g" / "tiny.gguf", qtype="Q8_0")
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(gguf.read_bytes()[:5000])
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (unknown / "model.safetensors").write_bytes((hunyuan / "model.safetensors").read_bytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    return {
        "missing": (tmp_path / "nope", "nope"),
        "truncated safetensors": (truncated, "model.safetensors"),
        "truncated gguf": (bad_gguf, "bad.gguf"),
        "unknown architecture": (unknown, "gpt2"),
        "not a checkpoint": (empty, "config.json"),
        "invalid config": (bad_json, "config.json"),
    }


def test_bad_input_is_one_line_and_leaves_nothing(hunyuan, tmp_path):
    cases = _bad_inputs(tmp_path / "in", hunyuan)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, (src, word) in cases.items():
        r = hy_edge("convert", src, "-o", out_dir / "m.onnx")
        assert_user_error(r, word)
        assert list(out_dir.iterdir()) == [], name
    assert_user_error(hy_edge("convert", hunyuan, "-o", tmp_path / "missing-dir" / "m.onnx"), "missing-dir")
    assert_user_error(hy_edge("convert", hunyuan, "-o", out_dir / "m.onnx", "--granularity", "rows"), "rows")
    assert_user_error(hy_edge("convert", hunyuan, "-o", out_dir / "m.onnx", "--rounding", "best"), "best")
    assert_user_error(hy_edge("info", tmp_path / "nope.onnx"), "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 10)
    assert_user_error(hy_edge("info", junk), "junk.onnx")


def test_interrupted_conversion_leaves_no_finished_looking_file(hunyuan, tmp_path, monkeypatch):
    import hy_edge_convert.pipeline as pipeline

    out = tmp_path / "m.onnx"
    convert(hunyuan, out, QuantPolicy())  # an earlier, complete conversion
    before = out.read_bytes()
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = pipeline.quantize_weight
    monkeypatch.setattr(pipeline, "quantize_weight", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(hunyuan, out, QuantPolicy(format="e5m2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no partial left
    assert out.read_bytes() == before  # the earlier result is untouched
