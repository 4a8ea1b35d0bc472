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
from hy_edge_format.errors import CheckpointError
from hy_edge_format.families import BY_GGUF_ARCH, family
from hy_edge_format.safe_json import is_int, is_number, show
from hy_edge_format.spec import LIMITS

from .safetensors_reader import bf16_to_f32

SUPPORTED_TYPES = {
    GGMLQuantizationType.F32: "f32",
    GGMLQuantizationType.F16: "f16",
    GGMLQuantizationType.BF16: "bf16",
    # block-quantized types are dequantized to float32 on load (gguf's dequantizers); the integer ones
    # but Q2_K / Q3_K can also be kept as they are (BLOCK_TYPES, read_blocks)
    **{
        getattr(GGMLQuantizationType, t): "f32"
        for t in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
    },
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
MAX_DIMS = 4  # GGML_MAX_DIMS
# the integer block types kept exactly (hy_edge_convert.quantize.carry_blocks) unless a format is asked for
BLOCK_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
DEQUANT_ROWS = 1024  # rows dequantized at a time (gguf's dequantizer makes several float copies of its input)


class _Truncated(Exception):
    pass


class _Malformed(Exception):
    """A header value the format does not allow (the message names it)."""


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

    def value(self, vtype: int, nested: bool = False):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if nested:  # llama.cpp reads no array of arrays either; each level would recurse once
                raise _Malformed("is an array of arrays, which is not supported")
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                if count * dt.itemsize > self.size - self.pos:
                    raise _Truncated
                arr = np.frombuffer(self.buf, dt, count, self.pos).copy()
                self.pos += count * dt.itemsize
                return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
            if etype == _STRING and count * 8 > self.size - self.pos:  # each string is >= 8 bytes
                raise _Truncated
            return [self.value(etype, nested=True) for _ in range(count)]
        raise _Malformed(f"has value type {vtype}, which GGUF does not have")


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
        if n_kv * 12 > size or n_tensors * 24 > size:  # the smallest entries: 12 and 24 bytes
            raise _Truncated
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = c.string()
            if key in self.metadata:
                raise CheckpointError(f"{self.path}: GGUF metadata key '{key}' appears twice")
            try:
                self.metadata[key] = c.value(c.take("<I"))
            except _Malformed as e:
                raise CheckpointError(f"{self.path}: GGUF metadata '{key}' {e}") from None
        raw_infos = {}
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.take("<I")
            if not 0 < n_dims <= MAX_DIMS:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' has {n_dims} dimensions (GGUF allows 1..{MAX_DIMS})"
                )
            dims = [c.take("<Q") for _ in range(n_dims)]
            if name in raw_infos:
                raise CheckpointError(f"{self.path}: tensor '{name}' appears twice in the GGUF tensor table")
            raw_infos[name] = (dims, c.take("<I"), c.take("<Q"))
        align = self.metadata.get("general.alignment", 32)
        if not is_int(align) or not 0 < align <= 1 << 30 or align & (align - 1):
            raise CheckpointError(
                f"{self.path}: GGUF metadata 'general.alignment' should be a power of two, got {show(align)}"
            )
        data_start = -(-c.pos // align) * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, (dims, type_id, offset) in raw_infos.items():
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
        """The tensor as float32 (numpy order), dequantized if block-quantized; its pages of the file are
        dropped afterwards (reading a GGUF tensor by tensor never holds the whole file resident)."""
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
            rows = raw.reshape(-1, raw.size // max(1, math.prod(shape[:-1])))  # (rows, bytes per row)
            out = np.empty((rows.shape[0], shape[-1]), np.float32)
            with np.errstate(all="ignore"):  # corrupt block scales make inf / NaN: the pipeline names them
                for r in range(0, rows.shape[0], DEQUANT_ROWS):  # the dequantizer's temporaries stay small
                    out[r : r + DEQUANT_ROWS] = dequantize(rows[r : r + DEQUANT_ROWS], qt)
            return out.reshape(shape)
        finally:
            del raw
            start = info.offset - info.offset % mmap.PAGESIZE
            if info.nbytes:
                self._mm.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def read_blocks(self, name: str) -> np.ndarray:
        """A block-quantized tensor's bytes as they are, one row per output row: uint8 (rows, bytes per
        row), a copy (the file's pages are dropped afterwards, as by `read`)."""
        info = self.tensors[name]
        if self._mm is None:
            raise CheckpointError(f"{self.path}: read after close")
        raw = np.frombuffer(self._mm, np.uint8, info.nbytes, info.offset)
        try:
            return raw.reshape(math.prod(info.shape[:-1]), -1).copy()
        finally:
            del raw
            start = info.offset - info.offset % mmap.PAGESIZE
            if info.nbytes:
                self._mm.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def close(self) -> None:
        if getattr(self, "_mm", None) is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None


# -- GGUF names, metadata and layout -> Hugging Face ----------------------------------------------

# general.architecture -> the family (hy_edge_format.families: the Hugging Face model_type and class its metadata
# becomes, whether llama.cpp permuted its q/k rows -- llama's only: it rotates their pairs GPT-J style, Qwen's
# NeoX style as HF does -- or stored its norms as 1 + w, its block names)
GGUF_ARCHS = BY_GGUF_ARCH

ROPE_FREQS = "rope_freqs.weight"  # Llama 3's RoPE scaling as a divisor per frequency (llama.cpp)
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
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str, model_type: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = {**_BLOCK_NAMES, **family(model_type).gguf_block_names}
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
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


# HF config key -> the GGUF key it is read from, after the architecture's prefix (named in errors)
GGUF_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "context_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
}


class _Meta:
    """Typed reads of GGUF metadata; CheckpointError naming the file, the key and the value."""

    def __init__(self, meta: dict, path: Path):
        self.meta, self.path = meta, path

    def get(self, key: str, kind: str, default=..., limit: int | None = None):
        value = self.meta.get(key)
        if value is None:
            if default is ...:
                raise CheckpointError(f"{self.path}: GGUF metadata lacks '{key}'")
            return default
        if kind == "size":  # a positive integer, bounded before anything is sized by it
            ok, what = is_int(value) and 0 < value <= (limit or 1 << 62), f"an integer in 1..{limit or 1 << 62}"
        elif kind == "id":
            ok, what = is_int(value) and value >= 0, "a token id"
        elif kind == "number":
            ok, what = is_number(value) and math.isfinite(value), "a finite number"
        else:
            ok, what = isinstance(value, str), "a string"
        if not ok:
            raise CheckpointError(f"{self.path}: GGUF metadata '{key}' should be {what}, got {show(value)}")
        return value


def gguf_config(meta: dict, tensors: dict[str, GGUFTensorInfo], path: Path) -> dict:
    """A Hugging Face config dict (config.json key names) from the GGUF metadata of one of GGUF_ARCHS,
    every value typed and the structural sizes bounded (spec.LIMITS) here, where the GGUF key can be
    named."""
    m = _Meta(meta, path)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise CheckpointError(
            f"{path}: GGUF metadata 'general.architecture' = {show(arch)} is not supported "
            f"(supported: {', '.join(GGUF_ARCHS)})"
        )
    model_type, architecture = GGUF_ARCHS[arch].model_type, GGUF_ARCHS[arch].architecture

    def key(hf: str) -> str:
        return f"{arch}.{GGUF_KEYS[hf]}"

    def size(hf: str, default=...):
        return m.get(key(hf), "size", default, LIMITS[hf])

    for hf in ("num_attention_heads", "num_key_value_heads"):
        if isinstance(meta.get(key(hf)), list):
            raise CheckpointError(f"{path}: GGUF metadata '{key(hf)}' is per layer, which is not supported")
    hidden, heads = size("hidden_size"), size("num_attention_heads")
    kv_heads = size("num_key_value_heads", heads)
    head_dim = (
        m.get(key("head_dim"), "size", None, LIMITS["head_dim"])
        or m.get(f"{arch}.rope.dimension_count", "size", None, LIMITS["head_dim"])
        or hidden // heads
    )
    vocab = size("vocab_size", None)
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if isinstance(tokens, list) and tokens else None
    if vocab is None and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    ids = {k: m.get(f"tokenizer.ggml.{k}", "id", None) for k in ("bos_token_id", "eos_token_id", "padding_token_id")}
    cfg = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": size("intermediate_size"),
        "num_hidden_layers": size("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(m.get(key("rms_norm_eps"), "number", GGUF_ARCHS[arch].gguf_rms_norm_eps)),
        "rope_theta": float(m.get(key("rope_theta"), "number", 10000.0)),
        "max_position_embeddings": size("max_position_embeddings", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["padding_token_id"],
    }
    scaling = m.get(f"{arch}.rope.scaling.type", "str", None)
    if scaling not in (None, "none"):
        # Carried over so that spec_from_hf_config refuses what it cannot compute.
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": meta.get(f"{arch}.rope.scaling.factor")}
    if arch == "gemma3":  # what llama.cpp's gemma3 model takes as fixed (llama-model.cpp)
        cfg.pop("hidden_act")
        cfg.update(
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=m.get(f"{arch}.attention.sliding_window", "size", None, LIMITS["max_position_embeddings"]),
            sliding_window_pattern=6,  # every 6th layer global
            rope_local_base_freq=10000.0,  # the sliding layers' RoPE base
            # softmax scale head_dim ** -0.5, but hidden / heads for the 27B model (62 layers)
            query_pre_attn_scalar=hidden // heads if cfg["num_hidden_layers"] == 62 else head_dim,
        )
        if cfg["sliding_window"] is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks '{arch}.attention.sliding_window'")
    return cfg


def gguf_tensors(gguf: GGUFFile, cfg: dict) -> dict[str, tuple[GGUFTensorInfo, int | None]]:
    """HF name -> (GGUF tensor, n_head to un-permute with, or None)."""
    out = {}
    permuted = family(cfg["model_type"]).gguf_permuted_qk
    for name, info in gguf.tensors.items():
        if name == ROPE_FREQS:  # read into the config (rope_freq_factors), not a weight
            continue
        hf = hf_name(name, cfg["model_type"])
        if hf is None:
            raise CheckpointError(f"{gguf.path}: tensor '{name}' is not supported")
        n_head = None
        if permuted and hf.endswith("self_attn.q_proj.weight"):
            n_head = cfg["num_attention_heads"]
        elif permuted and hf.endswith("self_attn.k_proj.weight"):
            n_head = cfg["num_key_value_heads"]
        if n_head is not None and (len(info.shape) != 2 or info.shape[0] % (2 * n_head)):
            raise CheckpointError(
                f"{gguf.path}: tensor '{name}' of shape {list(info.shape)} does not split into {n_head} heads"
            )
        out[hf] = (info, n_head)
    return out


def rope_freq_factors(gguf: GGUFFile, head_dim: int) -> list[float]:
    """The `rope_freqs` tensor (D/2,) of a Llama 3.x GGUF: llama.cpp's divisor per RoPE frequency."""
    info = gguf.tensors[ROPE_FREQS]
    if tuple(info.shape) != (head_dim // 2,):
        raise CheckpointError(
            f"{gguf.path}: tensor '{ROPE_FREQS}' has shape {list(info.shape)}, expected [{head_dim // 2}]"
        )
    f = gguf.read(ROPE_FREQS).astype(np.float64)
    if not (np.isfinite(f).all() and (f > 0).all()):
        raise CheckpointError(f"{gguf.path}: tensor '{ROPE_FREQS}' should hold positive numbers")
    return f.tolist()
