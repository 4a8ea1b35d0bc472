"""GGUF files: metadata, tensor table, and lazy dequantization to Hugging Face-named float32 tensors.

The header is parsed here rather than by `gguf.GGUFReader`, which builds a numpy view per array
element and takes ~10 s on SmolLM2's 49k-token vocabulary; `gguf` still supplies the type table
and the dequantizers (`gguf.quants.dequantize`).

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF", u32 version, u64
tensor count, u64 key/value count, the key/values, the tensor infos (name, n_dims, dims with the
fastest-varying first, ggml type, offset), padding to `general.alignment`, then the data.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from edge_runtime.errors import CheckpointError

from .safetensors_reader import bf16_to_f32

SUPPORTED_TYPES = {
    GGMLQuantizationType.F32: "f32",
    GGMLQuantizationType.F16: "f16",
    GGMLQuantizationType.BF16: "bf16",
    # block-quantized types are dequantized to float32 on load
    GGMLQuantizationType.Q8_0: "f32",
    GGMLQuantizationType.Q4_0: "f32",
    GGMLQuantizationType.Q4_1: "f32",
}

# GGUF metadata value types -> struct format (scalars)
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # numpy order (rows, cols): the reverse of GGUF's dims
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > self.size:
            raise _Truncated
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                if self.pos + count * dt.itemsize > self.size:
                    raise _Truncated
                arr = np.frombuffer(self.buf, dt, count, self.pos).copy()
                self.pos += count * dt.itemsize
                return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


class GGUFFile:
    """Metadata and tensor table of a .gguf file; tensors are read from a memory map on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
            if size < 24:
                raise CheckpointError(f"{self.path}: truncated or not a GGUF file ({size} bytes)")
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        try:
            self._parse(size)
        except _Truncated:
            self.close()
            raise CheckpointError(f"{self.path}: truncated GGUF file (header runs past the end)") from None
        except (ValueError, UnicodeDecodeError) as e:
            self.close()
            raise CheckpointError(f"{self.path}: malformed GGUF header ({e})") from None
        except CheckpointError:
            self.close()
            raise

    def _parse(self, size: int) -> None:
        c = _Cursor(self._mm)
        if self._mm[:4] != b"GGUF":
            raise CheckpointError(f"{self.path}: not a GGUF file (bad magic {bytes(self._mm[:4])!r})")
        c.pos = 4
        version = c.take("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (2, 3)")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = c.string()
            self.metadata[key] = c.value(c.take("<I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.take("<I")
            if n_dims > 8:
                raise ValueError(f"tensor '{name}' has {n_dims} dimensions")
            dims = [c.take("<Q") for _ in range(n_dims)]
            raw_infos.append((name, dims, c.take("<I"), c.take("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-c.pos // align) * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, type_id, offset in raw_infos:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                qtype = None
            if qtype not in SUPPORTED_TYPES:
                type_name = qtype.name if qtype is not None else f"#{type_id}"
                supported = ", ".join(t.name for t in SUPPORTED_TYPES)
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' has type {type_name}, which is not supported ({supported})"
                )
            block, type_size = GGML_QUANT_SIZES[qtype]
            if dims and dims[0] % block:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' rows of {dims[0]} do not fill {qtype.name} blocks of {block}"
                )
            nbytes = math.prod(dims) // block * type_size
            start = data_start + offset
            if start + nbytes > size:
                raise CheckpointError(
                    f"{self.path}: truncated GGUF file: tensor '{name}' ends at byte {start + nbytes}, "
                    f"the file has {size}"
                )
            self.tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes)

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 (numpy order), dequantized if block-quantized."""
        info = self.tensors[name]
        if self._mm is None:
            raise CheckpointError(f"{self.path}: read after close")
        raw = np.frombuffer(self._mm, np.uint8, info.nbytes, info.offset)
        try:
            qt, shape = info.ggml_type, info.shape
            if qt == GGMLQuantizationType.F32:
                return raw.view("<f4").reshape(shape).copy()
            if qt == GGMLQuantizationType.F16:
                return raw.view("<f2").reshape(shape).astype(np.float32)
            if qt == GGMLQuantizationType.BF16:
                return bf16_to_f32(raw.view("<u2")).reshape(shape)
            rows = raw.reshape(*shape[:-1], -1)  # (..., bytes per row)
            return dequantize(rows, qt).astype(np.float32, copy=False).reshape(shape)
        finally:
            del raw

    def close(self) -> None:
        if getattr(self, "_mm", None) is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None


# -- Llama: GGUF names and layout -> Hugging Face ------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama GGUF tensor, or None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute(w, n_head, n_head_kv)` on q/k rows.

    llama.cpp rotates interleaved pairs (GPT-J style) where HF rotates halves (NeoX), so it stores
    each head's rows as (2, D/2) -> (D/2, 2): w.reshape(n_head, 2, D/2, K).swapaxes(1, 2).
    The inverse reads them as (D/2, 2) and swaps back. n_head is H for q and Hkv for k.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permute (HF -> GGUF), for writing test fixtures."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_config(meta: dict, tensors: dict[str, GGUFTensorInfo], path: Path) -> dict:
    """A Hugging Face LlamaConfig dict (config.json key names) from llama.* GGUF metadata."""

    def key(name: str, default=...):
        value = meta.get(f"llama.{name}", default)
        if value is ...:
            raise CheckpointError(f"{path}: GGUF metadata lacks 'llama.{name}'")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise CheckpointError(f"{path}: per-layer head counts are not supported")
    head_dim = int(meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count") or hidden // heads)
    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    if not vocab and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        # Carried over so that spec_from_hf_config refuses what it cannot compute.
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": meta.get("llama.rope.scaling.factor")}
    return cfg


def llama_tensors(gguf: GGUFFile, cfg: dict) -> dict[str, tuple[GGUFTensorInfo, int | None]]:
    """HF name -> (GGUF tensor, n_head to un-permute with, or None)."""
    out = {}
    for name, info in gguf.tensors.items():
        hf = hf_name(name)
        if hf is None:
            why = " (llama3 RoPE frequency factors)" if name == "rope_freqs.weight" else ""
            raise CheckpointError(f"{gguf.path}: tensor '{name}'{why} is not supported")
        n_head = None
        if hf.endswith("self_attn.q_proj.weight"):
            n_head = cfg["num_attention_heads"]
        elif hf.endswith("self_attn.k_proj.weight"):
            n_head = cfg["num_key_value_heads"]
        if n_head is not None and (len(info.shape) != 2 or info.shape[0] % (2 * n_head)):
            raise CheckpointError(
                f"{gguf.path}: tensor '{name}' of shape {list(info.shape)} does not split into {n_head} heads"
            )
        out[hf] = (info, n_head)
    return out
