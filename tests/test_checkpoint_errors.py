"""Every kind of bad input is a CheckpointError with a one-line message naming the file."""

from __future__ import annotations

import json
import shutil
import struct

import checkpoints as ck
import numpy as np
import pytest
from hy_edge_convert.checkpoint import open_checkpoint
from hy_edge_format.errors import CheckpointError


def _fails(path, *needles):
    with pytest.raises(CheckpointError) as e:
        with open_checkpoint(path) as ckpt:
            for t in ckpt.tensors.values():
                t.load()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.fixture
def llama_copy(tmp_path, llama_dir):
    d = tmp_path / "llama"
    shutil.copytree(llama_dir, d)
    return d


def test_missing_path(tmp_path):
    _fails(tmp_path / "nope", "nope", "no such file")


def test_directory_without_config(tmp_path):
    _fails(tmp_path, "config.json", "missing")


def test_invalid_config_json(llama_copy):
    (llama_copy / "config.json").write_text("{not json")
    _fails(llama_copy, "config.json", "not valid JSON")


def test_config_not_an_object(llama_copy):
    (llama_copy / "config.json").write_text("[1, 2]")
    _fails(llama_copy, "config.json")


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _fails(tmp_path, "no weights", "model.safetensors")


def test_truncated_safetensors(llama_copy):
    f = llama_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    _fails(llama_copy, "model.safetensors", "truncated")


@pytest.mark.parametrize("cut", [0, 5, 20])
def test_truncated_safetensors_header(llama_copy, cut):
    f = llama_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:cut])
    _fails(llama_copy, "model.safetensors")


def test_safetensors_header_not_json(llama_copy):
    f = llama_copy / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 8) + b"{garbage" + b"\0" * 16)
    _fails(llama_copy, "model.safetensors", "not valid JSON")


def test_safetensors_unsupported_dtype(tmp_path):
    torch = ck.need_torch()
    from safetensors.torch import save_file

    save_file({"ids": torch.arange(4)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    _fails(tmp_path, "model.safetensors", "'ids'", "I64")


def test_sharded_index_names_a_missing_shard(tmp_path, llama_sharded_dir):
    d = tmp_path / "sharded"
    shutil.copytree(llama_sharded_dir, d)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    _fails(d, shard.name, "missing")


def test_sharded_index_invalid_json(tmp_path, llama_sharded_dir):
    d = tmp_path / "sharded"
    shutil.copytree(llama_sharded_dir, d)
    (d / "model.safetensors.index.json").write_text("{")
    _fails(d, "model.safetensors.index.json")


def test_unsupported_quantization(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    _fails(llama_copy, "config.json", "gptq")


def test_invalid_tokenizer_config(llama_copy):
    (llama_copy / "tokenizer_config.json").write_text("{oops")
    _fails(llama_copy, "tokenizer_config.json", "not valid JSON")


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    _fails(f, "model.gguf", "not a GGUF")


@pytest.mark.parametrize("keep", [0.5, 0.02, 30])
def test_truncated_gguf(tmp_path, gguf_llama, keep):
    data = gguf_llama["Q8_0"].read_bytes()
    f = tmp_path / "cut.gguf"
    f.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    _fails(f, "cut.gguf")


def test_unsupported_gguf_tensor_type(tmp_path):
    f = ck.make_gguf_llama(tmp_path / "mxfp4.gguf", "MXFP4", num_hidden_layers=1)
    _fails(f, "mxfp4.gguf", "MXFP4", "not supported")


def test_unsupported_gguf_architecture(tmp_path):
    f = ck.make_gguf_llama(tmp_path / "other.gguf", "F16", num_hidden_layers=1, arch="gemma3")
    _fails(f, "other.gguf", "gemma3")


def test_unsupported_gguf_pre_tokenizer(tmp_path):
    f = ck.make_gguf_llama(tmp_path / "pre.gguf", "F16", num_hidden_layers=1, pre="mystery")
    _fails(f, "pre.gguf", "mystery")


@pytest.mark.parametrize(
    "name,value,why",
    [
        ("blk.0.attn_mystery.weight", np.ones(8, np.float32), "is not supported"),
        ("rope_freqs.weight", np.ones(5, np.float32), "expected [8]"),  # head_dim 16: 8 frequencies
        ("rope_freqs.weight", -np.ones(8, np.float32), "positive numbers"),
    ],
)
def test_unknown_or_bad_gguf_tensor(tmp_path, name, value, why):
    import gguf

    f = tmp_path / "extra.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    for k, v in (
        ("embedding_length", 64),
        ("block_count", 1),
        ("feed_forward_length", 96),
        ("attention.head_count", 4),
        ("context_length", 64),
    ):
        w.add_uint32(f"llama.{k}", v)
    w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _fails(f, "extra.gguf", name, why)
