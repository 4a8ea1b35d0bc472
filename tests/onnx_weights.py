"""Read a converted file's weights back to fp32 with onnx + ml_dtypes only (independent of hy_edge_ops),
so a test can load exactly what the file stores into a transformers model or the numpy reference."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from hy_edge_format import format as F
from onnx import TensorProto, numpy_helper

_FP8 = {TensorProto.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E5M2: ml_dtypes.float8_e5m2}


def raw(t: onnx.TensorProto) -> np.ndarray:
    if t.data_type in _FP8:
        return np.frombuffer(t.raw_data, np.uint8).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


def initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))  # loads the external data too
    return {t.name: raw(t) for t in model.graph.initializer}, {t.name: t.data_type for t in model.graph.initializer}


_SUBBYTE = {"e2m1": ml_dtypes.float4_e2m1fn, "e3m2": ml_dtypes.float6_e3m2fn, "e2m3": ml_dtypes.float6_e2m3fn}


def dequantized(path: Path) -> dict[str, np.ndarray]:
    """HF name -> fp32 weight, as the file defines it (codes x scale, fp16 widened)."""
    arrays, types = initializers(path)
    formats = json.loads(F.metadata(onnx.load(str(path), load_external_data=False))[F.META_QUANT])["tensors"]
    out = {}
    for name, arr in arrays.items():
        storage = formats.get(name[: -len(F.QWEIGHT)], {}).get("storage") if name.endswith(F.QWEIGHT) else None
        if storage in _GGUF_INTEGER:  # GGUF's integer blocks beyond Q8_0 / Q4_x, named in the metadata
            base = name[: -len(F.QWEIGHT)]
            out[base] = _integer(arr, {s: a for s, a in arrays.items() if s.startswith(base + ".")}, base, storage)
        elif name.endswith(F.QWEIGHT) and types[name] == TensorProto.UINT8:  # sub-byte FP, named in the metadata
            base = name[: -len(F.QWEIGHT)]
            out[base] = _subbyte(arr, arrays[base + F.SCALE], formats[base]["storage"])
        elif name.endswith(F.QWEIGHT) and types[name] in (TensorProto.INT8, TensorProto.UINT4):
            base = name[: -len(F.QWEIGHT)]
            out[base] = _blocks(arr, arrays[base + F.SCALE], arrays.get(base + F.OFFSET))
        elif name.endswith(F.QWEIGHT):
            base = name[: -len(F.QWEIGHT)]
            w = arr.view(_FP8[types[name]]).astype(np.float32)
            s = arrays[base + F.SCALE].astype(np.float32)
            if s.ndim == 0:
                w = w * s
            elif s.ndim == 1:
                w = w * s[:, None]
            else:
                w = w * np.repeat(s, w.shape[1] // s.shape[1], axis=1)
            out[base] = w
        elif name.endswith((F.SCALE, F.OFFSET, F.SUB_SCALE, F.SUB_OFFSET, F.INPUT_SCALE)) or name.startswith("/"):
            continue
        else:
            out[name] = arr.astype(np.float32)
    return out


def _blocks(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """Blocks of 32 as the file defines them: int8 (N, K) codes, or uint4 (N, K) codes as onnx unpacks
    them (columns 2j and 2j + 1 of a block are its weights j and j + 16) x scale (+ offset)."""
    n_rows = codes.shape[0]
    q = codes.astype(np.float32).reshape(n_rows, -1, 32)
    if codes.dtype != np.int8:  # uint4
        q = q.reshape(n_rows, -1, 16, 2).transpose(0, 1, 3, 2).reshape(n_rows, -1, 32)
    w = q * scale.astype(np.float32)[:, :, None]
    if offset is not None:
        w = w + offset.astype(np.float32)[:, :, None]
    return w.reshape(n_rows, -1)


_GGUF_INTEGER = ("int5", "uint5", "q4k", "q5k", "q6k")


def _six_bit_codes(packed: np.ndarray) -> np.ndarray:
    """int64 (N, G, 32) 6-bit codes of FP6's packed layout (see _subbyte)."""
    b = packed.reshape(packed.shape[0], -1, 24).astype(np.int64)
    codes = np.zeros((packed.shape[0], b.shape[1], 32), np.int64)
    for j in range(16):
        codes[:, :, j] = b[:, :, j] & 15
        codes[:, :, j + 16] = b[:, :, j] >> 4
    for j in range(8):
        for i in range(4):
            codes[:, :, j + 8 * i] |= ((b[:, :, 16 + j] >> (2 * i)) & 3) << 4
    return codes


def _integer(codes: np.ndarray, arrays: dict, base: str, storage: str) -> np.ndarray:
    """format.py's int5 / uint5 (5-bit codes: 16 bytes of nibbles, byte j holding weights j and j + 16, then
    4 bytes whose bit i, little-endian, is weight i's fifth bit; int5 minus 16; a half scale (and offset)
    per 32) and K-quants (q4k: uint4 codes as onnx unpacks them; q5k: 5-bit codes; q6k: 6-bit two's
    complement in FP6's layout; a half d (and dmin) per 256, byte sc (and m) per 32, or int8 sc per 16 for
    q6k): weight = code * d * sc - dmin * m, each product in float32 as the file's numbers give it."""
    n_rows = codes.shape[0]
    if storage == "q4k":
        q = codes.astype(np.int64).reshape(n_rows, -1, 16, 2).transpose(0, 1, 3, 2).reshape(n_rows, -1, 32)
    elif storage == "q6k":
        q = _six_bit_codes(codes)
        q = np.where(q >= 32, q - 64, q)
    else:
        b = codes.reshape(n_rows, -1, 20).astype(np.int64)
        q = np.concatenate([b[:, :, :16] & 15, b[:, :, :16] >> 4], axis=2)
        word = b[:, :, 16] | b[:, :, 17] << 8 | b[:, :, 18] << 16 | b[:, :, 19] << 24
        q = q | ((word[:, :, None] >> np.arange(32)) & 1) << 4
        if storage == "int5":
            q = q - 16
    d = arrays[base + F.SCALE].astype(np.float32)
    q = q.astype(np.float32)
    if storage in ("int5", "uint5"):
        w = q * d[:, :, None]
        if storage == "uint5":
            w = w + arrays[base + F.OFFSET].astype(np.float32)[:, :, None]
        return w.reshape(n_rows, -1)
    sc = arrays[base + F.SUB_SCALE].astype(np.float32)
    d_sub = np.repeat(d, sc.shape[1] // d.shape[1], axis=1) * sc
    w = q.reshape(n_rows, sc.shape[1], -1) * d_sub[:, :, None]
    if storage != "q6k":
        dmin = np.repeat(arrays[base + F.OFFSET].astype(np.float32), sc.shape[1] // d.shape[1], axis=1)
        w = w - (dmin * arrays[base + F.SUB_OFFSET].astype(np.float32))[:, :, None]
    return w.reshape(n_rows, -1)


def _subbyte(packed: np.ndarray, scale: np.ndarray, fmt: str) -> np.ndarray:
    """Packed sub-byte FP blocks (format.py): per block of 32, 16 bytes of nibbles (byte j: code j low, code
    j + 16 high), and for FP6 8 bytes of top bits (byte 16 + j: codes j, j + 8, j + 16, j + 24, 2 bits each,
    lowest first); values decoded by ml_dtypes, times the block's half scale."""
    n_rows = packed.shape[0]
    b = packed.reshape(n_rows, -1, 16 if fmt == "e2m1" else 24).astype(np.int64)
    codes = np.zeros((n_rows, b.shape[1], 32), np.int64)
    for j in range(16):
        codes[:, :, j] = b[:, :, j] & 15
        codes[:, :, j + 16] = b[:, :, j] >> 4
    if fmt != "e2m1":
        for j in range(8):
            for i in range(4):
                codes[:, :, j + 8 * i] |= ((b[:, :, 16 + j] >> (2 * i)) & 3) << 4
    values = codes.astype(np.uint8).view(_SUBBYTE[fmt]).astype(np.float32)
    return (values * scale.astype(np.float32)[:, :, None]).reshape(n_rows, -1)
