"""The operator cases of issue 27, each as it was reproduced: hostile GGUF and safetensors metadata, a chat
template that fails as it runs, corrupt scales and flipped weights in a file given with --model, Inf and
huge weights, a 1e9-layer config, data files truncated before and during a run, numba's environment
variables, a subnormal temperature. Each ends in exit 0 or in one line naming the file and the field,
exit 2, no traceback; a mutated file never runs silently."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib

import gguf_edit as ge
import numpy as np
import onnx
import onnx_edit
import pytest
from click.testing import CliRunner
from hy_edge_format import format as F
from runtime_helpers import converted

from edge_runtime.cli import main
from edge_runtime.integrity import extent

U32, U64, STR, ARR = 4, 10, ge.STRING, ge.ARRAY


def one_line(r, *words: str) -> str:
    """The command failed with exit 2 and one error line (after notices, if any) holding `words`."""
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith(("hy-edge: note:", "converting"))]
    assert len(lines) == 1 and lines[0].startswith("hy-edge: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def hy_edge(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture
def prompt(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("Hello")
    return p


def gguf_with(src, tmp_path, **kv) -> str:
    g = ge.parse(src.read_bytes())
    for key, value in kv.items():
        g.kv[key.replace("__", ".")] = value
    path = tmp_path / "bad.gguf"
    path.write_bytes(ge.emit(g))
    return path


# -- GGUF metadata ---------------------------------------------------------------------------------------

GGUF_CASES = {
    "zero alignment": ("general.alignment", (U32, 0)),
    "list alignment": ("general.alignment", (ARR, (U32, [32]))),
    "zero heads": ("llama.attention.head_count", (U32, 0)),
    "string eps": ("llama.attention.layer_norm_rms_epsilon", (STR, "1e-5")),
    "string heads": ("llama.attention.head_count", (STR, "4")),
    "string embedding length": ("llama.embedding_length", (STR, "64")),
    "huge block count": ("llama.block_count", (U64, 10**9)),
    "nested arrays": ("llama.attention.head_count", (ARR, (ARR, [(U32, [4])]))),
    "integer token list": ("tokenizer.ggml.tokens", (ARR, (U32, list(range(320))))),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_bad_gguf_metadata_is_one_line_naming_the_key(case, gguf_llama, tmp_path):
    key, value = GGUF_CASES[case]
    bad = gguf_with(gguf_llama["Q8_0"], tmp_path, **{key.replace(".", "__"): value})
    r = hy_edge("convert", bad, "-o", tmp_path / "m.onnx")
    one_line(r, str(bad), key)  # before: ZeroDivisionError, ValueError, TypeError, the OOM killer
    assert not list(tmp_path.glob("m.onnx*")) and not list(tmp_path.glob(".*partial"))


def test_bad_gguf_given_to_serve_is_refused_at_start(gguf_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HY_EDGE_CACHE", str(tmp_path / "cache"))
    bad = gguf_with(gguf_llama["Q8_0"], tmp_path, llama__attention__head_count=(U32, 0))
    one_line(hy_edge("serve", "--model", bad, "--port", "0"), "llama.attention.head_count")


def test_a_failing_chat_template_is_one_line_and_serve_refuses_it(gguf_llama, tmp_path, prompt, monkeypatch):
    monkeypatch.setenv("HY_EDGE_CACHE", str(tmp_path / "cache"))
    loop = "{% for i in range(10**12) %}x{% endfor %}"
    bad = gguf_with(gguf_llama["Q8_0"], tmp_path, tokenizer__chat_template=(STR, loop))
    r = hy_edge("run", prompt, "--model", bad, "--max-tokens", "2")
    one_line(r, "the model's chat template failed", "range")  # before: the sandbox's OverflowError
    assert hy_edge("run", prompt, "--model", bad, "--max-tokens", "2", "--raw").exit_code == 0
    one_line(hy_edge("serve", "--model", bad, "--port", "0"), "the model's chat template failed")
    huge = gguf_with(gguf_llama["Q8_0"], tmp_path, tokenizer__chat_template=(STR, "{{ 'a' * 10**9 }}"))
    one_line(hy_edge("run", prompt, "--model", huge, "--max-tokens", "2"), "chat template failed")  # before: OOM


# -- safetensors checkpoints ----------------------------------------------------------------------------------


@pytest.fixture
def ckpt(hunyuan_f32_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(hunyuan_f32_dir, d)
    return d


def test_deep_json_is_one_line(ckpt, tmp_path):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    header = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    header += b" " * (-len(header) % 8)
    f.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n :])
    one_line(hy_edge("convert", ckpt, "-o", tmp_path / "m.onnx"), "model.safetensors", "nested")  # RecursionError
    f.write_bytes(raw)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(cfg)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    one_line(hy_edge("convert", ckpt, "-o", tmp_path / "m.onnx"), "config.json", "nested")
    (ckpt / "config.json").write_text(json.dumps(cfg)[:-1] + ', "x": ' + "[" * 100 + "]" * 100 + "}")
    one_line(hy_edge("convert", ckpt, "-o", tmp_path / "m.onnx"), "config.json", "field 'x'", "nested")


def test_index_naming_a_shard_by_a_number_is_one_line(ckpt, tmp_path):
    (ckpt / "model.safetensors").rename(ckpt / "model-00001.safetensors")
    raw = (ckpt / "model-00001.safetensors").read_bytes()
    names = [k for k in json.loads(raw[8 : 8 + struct.unpack_from("<Q", raw)[0]]) if k != "__metadata__"]
    weight_map = {name: "model-00001.safetensors" for name in names} | {names[0]: 12}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    one_line(hy_edge("convert", ckpt, "-o", tmp_path / "m.onnx"), "index.json", names[0], "12")  # a TypeError


def test_a_billion_layers_is_refused_before_anything_is_sized(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 10**9}))
    one_line(hy_edge("convert", ckpt, "-o", tmp_path / "m.onnx"), "config.json", "num_hidden_layers", "1000000000")


def _set_weight(d, name: str, index: tuple, value: float) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    tensors[name][index] = value
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("model.layers.0.mlp.up_proj.weight", np.inf, ["holds inf at [3, 5]", "corrupt"]),  # converted silently
        ("model.layers.0.mlp.up_proj.weight", 3e38, ["FP8 scale", "beyond what the format holds"]),  # failed at run
        ("model.embed_tokens.weight", -3e38, ["FP16"]),
    ],
)
def test_weights_the_format_cannot_hold_are_refused_at_conversion(ckpt, tmp_path, name, value, words):
    _set_weight(ckpt, name, (3, 5), value)
    one_line(hy_edge("convert", ckpt, "-o", tmp_path / "m.onnx"), name, *words)
    assert not list(tmp_path.glob("m.onnx*"))


def test_inf_in_a_gguf_is_refused(gguf_llama, tmp_path):
    g = ge.parse(gguf_llama["F32"].read_bytes())
    name, dims, _, offset = next(t for t in g.tensors if t[0] == "blk.1.ffn_norm.weight")
    data = bytearray(g.data)
    data[offset : offset + 4] = struct.pack("<f", float("-inf"))
    g.data = bytes(data)
    bad = tmp_path / "inf.gguf"
    bad.write_bytes(ge.emit(g))
    one_line(hy_edge("convert", bad, "-o", tmp_path / "m.onnx"), "post_attention_layernorm", "-inf")


# -- a converted file given with --model ------------------------------------------------------------------


@pytest.fixture
def model(hunyuan_f32_dir, tmp_path):
    src = converted(hunyuan_f32_dir, "e4m3")
    d = tmp_path / "model"
    d.mkdir()
    for f in (src, src.with_name(src.name + ".data")):
        shutil.copy(f, d / f.name)
    return d / src.name


def _edit_scale(model, value, keep_checksums: bool) -> None:
    proto = onnx.load(str(model), load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.name == "model.layers.0.mlp.up_proj.weight" + F.SCALE)
    scales = np.frombuffer(t.raw_data, np.float32).copy()
    scales[3] = value
    t.raw_data = scales.tobytes()
    if not keep_checksums:  # as a file converted before checksums existed
        meta = F.metadata(proto)
        del meta[F.META_CHECKSUMS]
        onnx.helper.set_model_props(proto, meta)
    model.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("value", [np.nan, 1e30])
def test_corrupt_scales_are_one_line_on_both_backends_and_in_serve(model, prompt, tmp_path, monkeypatch, value):
    monkeypatch.setenv("HY_EDGE_CACHE", str(tmp_path / "cache"))
    _edit_scale(model, value, keep_checksums=True)
    for backend in ("numba", "onnxruntime"):  # before: garbage text and exit 0, or a ValueError traceback
        one_line(hy_edge("run", prompt, "--model", model, "--backend", backend), "checksum mismatch in its header")
    _edit_scale(model, value, keep_checksums=False)
    for backend in ("numba", "onnxruntime"):
        r = hy_edge("run", prompt, "--model", model, "--backend", backend)
        one_line(r, model.name, "up_proj.weight.scale", "holds the scale")
    one_line(hy_edge("serve", "--model", model, "--port", "0"), "holds the scale")


def test_flipped_weights_are_found_on_first_use_and_the_check_is_remembered(model, prompt, tmp_path, monkeypatch):
    from edge_runtime import integrity

    monkeypatch.setenv("HY_EDGE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = integrity.verify_checksums
    monkeypatch.setattr(integrity, "verify_checksums", lambda *a: calls.append(1) or real(*a))
    for _ in range(2):
        assert hy_edge("run", prompt, "--model", model, "--max-tokens", "2").exit_code == 0
    assert len(calls) == 1  # verified once: the second start finds the record (device, inode, size, mtime)
    name = "model.layers.1.mlp.down_proj.weight" + F.QWEIGHT
    _, offset, length = extent(onnx.load(str(model), load_external_data=False)).tensors[name]
    data = model.with_name(model.name + ".data")
    raw = bytearray(data.read_bytes())
    raw[offset : offset + min(4096, length)] = bytes(b ^ 0xFF for b in raw[offset : offset + min(4096, length)])
    data.write_bytes(bytes(raw))
    r = hy_edge("run", prompt, "--model", model, "--max-tokens", "2")  # before: ran, exit 0
    one_line(r, model.name, f"checksum mismatch in tensor '{name}'")


def test_a_flipped_bit_in_the_metadata_fails_verify(model):
    proto = onnx.load(str(model), load_external_data=False)
    entry = next(p for p in proto.metadata_props if p.key == F.META_SPEC)
    spec = json.loads(entry.value)
    spec["rope_theta"] = float(np.float64(spec["rope_theta"]).view(np.int64) ^ 1 << 40)  # one bit of it
    entry.value = json.dumps(spec, sort_keys=True)
    model.write_bytes(proto.SerializeToString())
    one_line(hy_edge("info", "--verify", model), model.name, "header")  # before: passed, changed the output
    onnx_edit.save(proto, model)  # as a converter writing that value would have: then it is what the file says
    assert hy_edge("info", "--verify", model).exit_code == 0


def test_a_truncated_data_file_is_refused_before_it_is_mapped(model, prompt):
    data = model.with_name(model.name + ".data")
    data.write_bytes(data.read_bytes()[:70_000])  # cp of a shorter file over it
    one_line(hy_edge("run", prompt, "--model", model), "truncated")


_TRUNCATE_WHILE_RUNNING = """
import os, sys, numpy as np
from edge_runtime import bus_error, load
m = load(sys.argv[1]); s = m.session(); bus_error.install()
os.truncate(sys.argv[1] + ".data", 70_000)
s.forward(np.array([1, 2, 3]))
"""


def test_a_data_file_truncated_while_mapped_is_one_line(model):
    r = subprocess.run([sys.executable, "-c", _TRUNCATE_WHILE_RUNNING, str(model)], capture_output=True, text=True)
    assert r.returncode == 2, (r.returncode, r.stderr)  # before: "Bus error", exit 135
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "truncated or replaced" in r.stderr


# -- the environment and the options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("NUMBA_NUM_THREADS", "0"),
        ("NUMBA_NUM_THREADS", "abc"),
        ("NUMBA_THREADING_LAYER", "bogus"),
        ("OMP_NUM_THREADS", "-3"),
    ],
)
def test_bad_environment_is_one_line_naming_the_variable(model, prompt, name, value):
    one_line(hy_edge("run", prompt, "--model", model, env={name: value}), name, repr(value))


def test_a_threading_layer_that_cannot_load_is_one_line(model, prompt):
    env = dict(__import__("os").environ, NUMBA_THREADING_LAYER="tbb")
    r = subprocess.run(
        [sys.executable, "-m", "edge_runtime", "run", str(prompt), "--model", str(model), "--max-tokens", "2"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "Traceback" not in r.stderr
    if r.returncode != 0:  # TBB is not installed here (it is not a dependency): one line, before any work
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "NUMBA_THREADING_LAYER" in r.stderr


@pytest.mark.parametrize(
    "option, value", [("--temperature", "1e-39"), ("--temperature", "nan"), ("--repetition-penalty", "1e-300")]
)
def test_sampling_values_out_of_range_are_one_line(model, prompt, option, value):
    one_line(hy_edge("run", prompt, "--model", model, option, value), option.strip("-").replace("-", " "))


def test_checksum_of_a_header_is_that_of_its_bytes_without_the_entry(model):
    """The header CRC (integrity.header_crc) against zlib over the file with the entry's bytes cut out,
    found here with onnx's own serializer."""
    proto = onnx.load(str(model), load_external_data=False)
    stored = json.loads(F.metadata(proto)[F.META_CHECKSUMS])["header"]
    meta = F.metadata(proto)
    del meta[F.META_CHECKSUMS]
    onnx.helper.set_model_props(proto, meta)
    assert stored == zlib.crc32(proto.SerializeToString())
