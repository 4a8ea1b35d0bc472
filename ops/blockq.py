"""Block weights: GGUF's Q8_0, Q4_0 and Q4_1 kept as they are, and the OCP microscaling element formats
FP4 / FP6 with a half scale per block, decoded inside the kernels.

A row of K weights is K / 32 blocks of 32; block g of row n holds codes q and an IEEE half scale d (and,
for 4-bit integer codes, a half offset m): weight = value(q) * d (+ m), computed in float32, where
value(q) * d is exact (a half has 11 significant bits, a code at most 8, and its exponent range fits) and
the offset is added with one rounding -- the value `gguf`'s dequantizer and onnxruntime's
DequantizeLinear (+ Add) give. Storages:
- `int8`  (Q8_0): codes int8, one per byte, in order; 34 bytes per block in the source, 34 here;
- `uint4` (Q4_1, and Q4_0 as offset -8d): 16 bytes per block, byte j holding weight j in its low
  nibble and weight j + 16 in its high nibble (GGUF's layout); 20 bytes per block with d and m;
- `e2m1` (FP4: bias 1, magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6): the nibbles of `uint4`, 16 bytes per block;
- `e3m2` (FP6: bias 3, max 28) and `e2m3` (FP6: bias 1, max 7.5): 24 bytes per block, bytes 0..15 the
  low 4 bits of each 6-bit code in `uint4`'s nibble layout, bytes 16..23 the high 2 bits: byte 16 + j
  holds codes j, j + 8, j + 16, j + 24 in bits 0-1, 2-3, 4-5, 6-7;
- GGUF's other integer types, their codes and scales re-laid out, never re-rounded: 5-bit codes in 20
  bytes (`uint4`'s 16 bytes of low nibbles, then a little-endian 32-bit word whose bit i is weight i's
  fifth bit: GGUF's Q5_0 bytes reordered): `int5` (Q5_0: code - 16, d per block), `uint5` (Q5_1: d and m);
  and the K-quants, whose block scales are d (and dmin) per super-block of 256 times a byte per block:
  `q4k` (Q4_K: uint4's nibbles, code * (d * sc) - dmin * m), `q5k` (Q5_K: 5-bit codes, the same scales),
  `q6k` (Q6_K: 6-bit codes in FP6's layout, two's complement, code * (d * sc) with a signed byte sc per
  16 weights). d * sc is exact in float32 (11 and at most 8 significant bits), so each weight is the value
  gguf's dequantizer gives (`SCALES`, `pack_scales`).
The minifloats' codes are ml_dtypes' float4_e2m1fn, float6_e3m2fn and float6_e2m3fn: sign in the top
bit, then exponent, then mantissa, subnormals at exponent 0, every code finite (`minifloat_values`).

The kernels see codes as 3-D arrays whose dtype types each storage apart (and apart from the 2-D
FP8/FP16/FP32 weights): int8 (N, G, 32), uint8 (N, G, 16), and for the minifloats, views of the same
bytes: int16 (N, G, 8) e2m1, int32 (N, G, 6) e3m2, uint32 (N, G, 6) e2m3 (`code_view`; the kernels
read them as bytes, so only the view needs its dtype's alignment: a tensor at a 32-byte multiple in a
mapped file has it). Their "scales" argument is the half bits packed into a float32 array
(`pack_scales`): (N, ceil(G/2)) with two blocks' d per element, uint4 (N, G) with (d, m) per element:
2 and 4 bytes per block read, as in the source file.

The dot products (`emit_block_dots`, reached through hy_edge_ops.dot.row_dots) keep dot's order: one
vector of LANES float32 lanes per (row, token), lane i taking elements i, i + LANES, ... in turn, each
decoded weight (value(q) * d + m, exact as above) multiplied and added; the lanes summed pairwise at the
end. So a token's outputs are the same whatever rows and tokens the kernel blocks together (batch
invariance, as for FP8). Per 32 weights: the codes widened and converted (4-bit: split into low and high
nibbles first), one multiply by d (and one add of m) per vector, shared by the block's tokens.

The minifloat decode, per vector ISA (`_route`):
- avx512: the codes index tables of float32 values in registers: e2m1 widened to 32-bit lanes, the high
  nibbles shifted down, `vpermps` (16 values: 2 instructions per 16 weights, fewer than FP8's 3); FP6:
  the 6-bit codes assembled in bytes (below), sign-extended, shifted, `vpermi2ps` over the 32 magnitudes
  and the sign put back (`vpternlogd`): 4 per 16.
- avx2: e2m1 through `vpermd` from the 8 magnitudes times d (`_e2m1_permps`: one multiply per block, the
  sign put back by one XOR); FP6: `vpshufb` (16-byte tables, per 128-bit half) gives the magnitude's E4M3
  bits from two tables (every FP6 value is an E4M3 normal), the sign OR-ed back, then FP8's decode below
  (value * 2**-120, FP8_FOLD).
- neon (and generic): FP8's route (hy_edge_ops.dot.signed_byte_floats): each code in a byte
  with its sign at bit 7 and exponent and mantissa right below, sign-extended, shifted and masked into a
  float32 that is the code's value times 2**-126 (e2m1, e2m3) or 2**-124 (e3m2); the power of two comes
  back in two exact halves (`MINIFLOAT_FOLD`): one folded into d (a half times 2**63 stays far from
  float32's overflow, and no product of a code and d underflows), the other on the row's sum.
  Zero-exponent codes become float32 subnormals there, and this x86 host (AMD EPYC, AVX-512) multiplies
  those at half speed or worse: e2m1 through shifts ran 7.9 Gweights/s against 14.5 without such codes
  (four tokens, one core, in cache; AVX2 FP6 3.7 against 9.6), the reason for the tables on x86, whose
  speed does not depend on the codes. Whether the Cortex-A76 pays it is not measured here (its FP8
  decode makes subnormals too).
Inputs rounded to integers (`INTEGER_INPUTS`: e2m1 and e2m3; the converter's `--activations q8`): every
value of these formats times 2 (FP4) or 8 (FP6 E2M3) is an integer of magnitude at most 12 / 60, so a
block's dot product with an input rounded to int8 per block of 32 (`quantize_inputs`: q = rint(x / s),
s = amax / 127, llama.cpp's Q8_0 rounding of activations, in float32 steps onnxruntime's graph repeats) is
an exact integer sum. Those kernels read the codes as these integers (x86: `vpshufb` tables, the FP4
nibbles split from one broadcast load by a per-lane shift; elsewhere from the magnitude's code k by two
saturating subtracts, `_integer_codes`), multiply them by the input bytes in quads (x86 `vpmaddubsw` on
|weight| and the input with the weight's sign, then `vpmaddwd`; AVX-512 both blocks of a pair at once, in
one `vpdpbusd` where the CPU has VNNI; elsewhere a partial reduction of 16 products into 4 lanes, one `sdot`
on a CPU with dot-product instructions such as the Cortex-A76), and add each block's 8 lanes of int32
sums, converted, times d * s / 2 (or / 8) into float32 lanes: about 12 vector instructions per 32 weights
in AVX2 code, where the float decode widens bytes to 32-bit lanes through the shuffle port. Blocks go in
pairs into 16 lanes (two chains), an odd last block into the first 8. The codes are viewed under their
own dtype tags (complex64 e2m1, uint64 e2m3), so compiled code knows to take x as `quantize_inputs`' int8
rows (`kernel_input`); the prefill kernel multiplies the same rounded inputs in float32 (`prefill_input`).
The rounding changes the numbers, not only the speed: the file asks for it (`activations: q8`), and
onnxruntime rounds the same inputs in its graph.
The FP6 bytes: the low nibbles shifted into bits 2-5 in 16-bit lanes (weights 0..15 up by 2, 16..31
down by 2), the 8 bytes of high bits broadcast to four 64-bit lanes shifted by 6, 4, 2, 0 so that each
quarter's pairs land in bits 6-7, the two merged under a mask (one `vpternlogd`). Table values and the
`vpshufb` integers are exact, so every route gives value(code) * d exactly, as `dequantize` does.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import overload
from numba.np import numpy_support

from . import minifloat
from .half import FP8_BITS, FP8_FOLD, half_to_f32
from .isa import ISA, has_feature

BLOCK = 32  # weights per block
SUPER = 256  # weights per super-block of the K-quant storages (q4k, q5k, q6k): 8 blocks
# bytes of codes per block
CODE_BYTES = {
    "int8": 32, "uint4": 16, "e2m1": 16, "e3m2": 24, "e2m3": 24,
    "int5": 20, "uint5": 20, "q4k": 16, "q5k": 20, "q6k": 24,
}  # fmt: skip
STORAGES = tuple(CODE_BYTES)
MINIFLOATS = tuple(minifloat.FORMATS)  # e2m1, e3m2, e2m3
# how a block's codes are held: "int8" one a byte; "nibbles" uint4's layout (unsigned); "signed5" /
# "unsigned5": nibbles plus a word of fifth bits (signed: code - 16); "signed6": 6-bit two's complement
# integers in FP6's layout; or a minifloat
CODES = {
    "int8": "int8", "uint4": "nibbles", "q4k": "nibbles", "int5": "signed5", "uint5": "unsigned5",
    "q5k": "unsigned5", "q6k": "signed6", **{f: "minifloat" for f in MINIFLOATS},
}  # fmt: skip
# their scales: "d" a half d per block (weight = code * d); "dm" halves d and m per block (code * d + m);
# "k" halves d and dmin per super-block and bytes sc and m per block (code * (d * sc) - dmin * m); "k16"
# a half d per super-block and a signed byte sc per 16 weights (code * (d * sc))
SCALES = {
    "int8": "d", "uint4": "dm", "int5": "d", "uint5": "dm", "q4k": "k", "q5k": "k", "q6k": "k16",
    **{f: "d" for f in MINIFLOATS},
}  # fmt: skip
# the dtype of the kernels' view of each storage's codes: a tag the compiled code types the storage by
_KERNEL_DTYPE = {
    "int8": np.int8, "uint4": np.uint8, "e2m1": np.int16, "e3m2": np.int32, "e2m3": np.uint32,
    "q4k": np.int64, "q6k": np.float64, "int5": np.uint16, "uint5": np.float32, "q5k": np.bool_,
}  # fmt: skip
_STORAGE_OF = {numpy_support.from_dtype(np.dtype(dt)): name for name, dt in _KERNEL_DTYPE.items()}  # numba dtype
# storages whose every value times a fixed integer is a small integer: their kernels can take the linear's
# input rounded to int8 per block of 32 (`quantize_inputs`) and multiply codes by inputs in integers
INTEGER_INPUTS = {"e2m1": 2, "e2m3": 8}  # value * this: an integer of magnitude <= 12 | 60
# the view that asks for that (the same bytes, another tag: compiled apart from the float-input kernels)
_INTEGER_DTYPE = {"e2m1": np.complex64, "e2m3": np.uint64}
_INTEGER_OF = {numpy_support.from_dtype(np.dtype(dt)): name for name, dt in _INTEGER_DTYPE.items()}
_STORAGE_OF.update(_INTEGER_OF)
_VNNI = ISA == "avx512" and has_feature("avx512vnni")  # vpdpbusd: u8 x s8 quads summed into int32 lanes
ACTIVATIONS = ("none", "q8")  # a block linear's input: float32 as it is, or rounded to int8 per 32
Q8_MAX = 127.0
_TINY = np.float32(np.finfo(np.float32).tiny)
# the decoded float32 is value * 2**-(127 - bias): 2**(127 - bias) = fold on d * fold on the sum
MINIFLOAT_FOLD = {"e2m1": (2.0**63, 2.0**63), "e3m2": (2.0**62, 2.0**62), "e2m3": (2.0**63, 2.0**63)}


def minifloat_values(storage: str) -> np.ndarray:
    """float32 (2**bits,): the value of every code of a minifloat storage (code i -> values[i])."""
    if storage not in MINIFLOATS:
        raise ValueError(f"storage must be one of {', '.join(MINIFLOATS)}, got {storage!r}")
    return minifloat.values(storage)


def code_view(w: np.ndarray, storage: str, activations: str = "none") -> np.ndarray:
    """The kernels' 3-D view of stored codes: int8 (N, K) -> (N, K/32, 32); uint4 bytes (N, K/2) ->
    uint8 (N, K/32, 16); minifloat bytes (N, K/32 * CODE_BYTES) -> int16 (N, K/32, 8) e2m1, int32 |
    uint32 (N, K/32, 6) e3m2 | e2m3; with activations "q8" (INTEGER_INPUTS' storages) complex64 (N, K/32, 2)
    e2m1, uint64 (N, K/32, 3) e2m3. No copy; raises ValueError if the view would be misaligned."""
    per = CODE_BYTES[storage]
    if w.ndim != 2 or w.shape[1] % per:
        raise ValueError(f"{storage} codes of shape {w.shape}: rows must be whole blocks of {per} bytes")
    if activations not in ACTIVATIONS or (activations == "q8" and storage not in INTEGER_INPUTS):
        raise ValueError(f"activations {activations!r} with {storage} codes: q8 takes {', '.join(INTEGER_INPUTS)}")
    dtype = np.dtype(_INTEGER_DTYPE[storage] if activations == "q8" else _KERNEL_DTYPE[storage])
    if w.ctypes.data % dtype.itemsize:
        raise ValueError(f"w: {storage} codes must start at a multiple of {dtype.itemsize} bytes in memory")
    return w.view(dtype).reshape(w.shape[0], w.shape[1] // per, per // dtype.itemsize)


def unpack_codes(storage: str, w: np.ndarray) -> np.ndarray:
    """uint8 (N, K/32, 32) codes of stored minifloat blocks, in weight order (numpy)."""
    code_view(w, storage)  # checks the shape
    return minifloat.unpack(w, storage).reshape(w.shape[0], -1, BLOCK)


def scale_shapes(storage: str, n_rows: int, n_groups: int) -> dict[str, tuple]:
    """The scale arrays a storage's weight of n_rows x n_groups blocks has, by argument name, with their
    shapes and dtypes: scales / offsets half bits (uint16), sub_scales / sub_offsets bytes."""
    kind = SCALES[storage]
    if kind in ("d", "dm"):
        out = {"scales": ((n_rows, n_groups), np.uint16)}
        if kind == "dm":
            out["offsets"] = ((n_rows, n_groups), np.uint16)
        return out
    n_super = n_groups // (SUPER // BLOCK)
    if kind == "k":
        return {
            "scales": ((n_rows, n_super), np.uint16),
            "offsets": ((n_rows, n_super), np.uint16),
            "sub_scales": ((n_rows, n_groups), np.uint8),
            "sub_offsets": ((n_rows, n_groups), np.uint8),
        }
    return {"scales": ((n_rows, n_super), np.uint16), "sub_scales": ((n_rows, 2 * n_groups), np.int8)}


def check_scales(storage: str, n_rows: int, n_groups: int, **arrays) -> None:
    """ValueError naming the argument unless `arrays` are exactly the scales `storage` has (scale_shapes),
    C-contiguous, with finite halves."""
    want = scale_shapes(storage, n_rows, n_groups)
    if SCALES[storage] in ("k", "k16") and n_groups % (SUPER // BLOCK):
        raise ValueError(f"{storage} weights are whole super-blocks of {SUPER} weights, got {n_groups * BLOCK}")
    for name, a in arrays.items():
        if a is None:
            if name in want:
                raise ValueError(f"{name}: {storage} weights need one, shaped {want[name][0]}")
            continue
        if name not in want:
            raise ValueError(f"{name}: {storage} weights have none")
        shape, dtype = want[name]
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape {shape}, got {got}")
        if dtype == np.uint16 and not np.isfinite(a.view(np.float16)).all():
            raise ValueError("scales and offsets must be finite")


def pack_scales(
    storage: str,
    scale: np.ndarray,
    offset: np.ndarray | None = None,
    sub_scale: np.ndarray | None = None,
    sub_offset: np.ndarray | None = None,
) -> np.ndarray:
    """The kernels' scales, per row: "d" storages (N, G) d -> float32 (N, ceil(G/2)) holding the d's in
    order; "dm" (uint4, uint5) (N, G) d and m -> float32 (N, G) holding (d, m) pairs; "k" and "k16" (the
    K-quants, S super-blocks of 8 blocks) -> float32 (N, 5 S): S pairs of halves (d, dmin) -- (d, 0) for
    q6k -- then G pairs of bytes (sc, m) -- the two sc of the block's halves for q6k."""
    scale = np.ascontiguousarray(scale).view(np.uint16)
    n_rows, n_groups = scale.shape
    kind = SCALES[storage]
    if kind == "d":
        halves = np.zeros((n_rows, n_groups + n_groups % 2), np.uint16)
        halves[:, :n_groups] = scale
    elif kind == "dm":
        if offset is None or offset.shape != scale.shape:
            raise ValueError(f"{storage} weights need an offset per block, shaped as the scales")
        halves = np.empty((n_rows, n_groups, 2), np.uint16)
        halves[:, :, 0] = scale
        halves[:, :, 1] = np.ascontiguousarray(offset).view(np.uint16)
    else:  # n_groups counts super-blocks here
        n_blocks = n_groups * (SUPER // BLOCK)
        pairs = np.zeros((n_rows, n_groups, 2), np.uint16)
        pairs[:, :, 0] = scale
        if kind == "k":
            pairs[:, :, 1] = np.ascontiguousarray(offset).view(np.uint16)
            subs = np.stack([sub_scale, sub_offset], axis=2).astype(np.uint8)
        else:
            subs = np.ascontiguousarray(sub_scale).view(np.uint8).reshape(n_rows, n_blocks, 2)
        row = np.concatenate([pairs.reshape(n_rows, -1).view(np.uint8), subs.reshape(n_rows, -1)], axis=1)
        return np.ascontiguousarray(row).view(np.float32)
    return np.ascontiguousarray(halves.reshape(n_rows, -1)).view(np.float32)


def integer_values(storage: str) -> np.ndarray:
    """int32 (2**bits,): the integer each code of an int5 / uint5 / q5k (5-bit) or q6k (6-bit) storage
    stands for."""
    kind = CODES[storage]
    if kind == "signed6":
        codes = np.arange(64, dtype=np.int32)
        return codes - 64 * (codes >= 32)
    return np.arange(32, dtype=np.int32) - (16 if kind == "signed5" else 0)


def codes_of(storage: str, w: np.ndarray) -> np.ndarray:
    """int32 (N, K): the integer codes of stored integer blocks (int8 / uint4 / int5 / uint5 / q4k / q5k /
    q6k), in weight order (numpy)."""
    kind = CODES[storage]
    n_rows = w.shape[0]
    if kind == "int8":
        return code_view(w, storage).reshape(n_rows, -1).astype(np.int32)
    code_view(w, storage)  # checks the shape
    if kind == "signed6":
        return integer_values(storage)[minifloat.unpack(w, "e3m2")]
    b = w.reshape(n_rows, -1, CODE_BYTES[storage])
    q = np.concatenate([b[:, :, :16] & 15, b[:, :, :16] >> 4], axis=2).astype(np.int32)
    if kind != "nibbles":  # the fifth bits: bit i of the little-endian word is weight i's
        q |= np.unpackbits(b[:, :, 16:20], axis=2, bitorder="little").astype(np.int32) << 4
        q = integer_values(storage)[q]
    return q.reshape(n_rows, -1)


def dequantize(
    storage: str,
    w: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray | None = None,
    sub_scale: np.ndarray | None = None,
    sub_offset: np.ndarray | None = None,
) -> np.ndarray:
    """float32 (N, K) weights of stored codes (numpy; the reference the kernels are tested against)."""
    d = np.ascontiguousarray(scale).view(np.float16).astype(np.float32)
    n_rows = w.shape[0]
    if storage in MINIFLOATS:
        return (minifloat_values(storage)[unpack_codes(storage, w)] * d[:, :, None]).reshape(n_rows, -1)
    q = codes_of(storage, w).astype(np.float32)
    kind = SCALES[storage]
    if kind in ("d", "dm"):
        blocks = q.reshape(n_rows, -1, BLOCK) * d[:, :, None]
        if kind == "dm":
            blocks = blocks + np.ascontiguousarray(offset).view(np.float16).astype(np.float32)[:, :, None]
        return blocks.reshape(n_rows, -1)
    per = SUPER // BLOCK if kind == "k" else SUPER // 16  # sub-scales per super-block
    sc = np.ascontiguousarray(sub_scale).astype(np.float32)
    d_sub = np.repeat(d, per, axis=1) * sc  # exact: 11 and at most 8 significant bits
    out = q.reshape(n_rows, sc.shape[1], -1) * d_sub[:, :, None]
    if kind == "k":
        dmin = np.repeat(np.ascontiguousarray(offset).view(np.float16).astype(np.float32), per, axis=1)
        out = out - (dmin * np.ascontiguousarray(sub_offset).astype(np.float32))[:, :, None]
    return out.reshape(n_rows, -1)


# -- compiled helpers ----------------------------------------------------------------------------------


@njit(cache=True)
def quantize_inputs(x):
    """The rows of x (T, K) f32 rounded to int8 per block of 32: q = rint(x / s), s = max(amax(|x|) / 127,
    float32's smallest normal), in float32 as onnxruntime computes it (convert.graph). Returns int8 (T, K +
    4 K/32): each row's K codes, then its K/32 scales s as float32 bytes (the kernels' x for codes of
    INTEGER_INPUTS viewed for q8). A block with a NaN or infinite input gets s = NaN and codes 0, so the
    products with it are NaN, as in float."""
    n_tok, k_dim = x.shape
    n_g = k_dim // BLOCK
    buf = np.empty((n_tok, k_dim // 4 + n_g), np.float32)
    codes = buf.view(np.int8)
    for t in range(n_tok):
        for g in range(n_g):
            k0 = g * BLOCK
            amax = np.float32(0.0)
            finite = True
            for j in range(BLOCK):
                v = x[t, k0 + j]
                finite &= np.isfinite(v)
                amax = max(amax, abs(v))
            s = max(amax / np.float32(Q8_MAX), _TINY)
            if not finite:
                s = np.float32(np.nan)
            buf[t, k_dim // 4 + g] = s
            for j in range(BLOCK):
                codes[t, k0 + j] = np.int8(np.rint(x[t, k0 + j] / s)) if finite else np.int8(0)
    return codes


@njit(cache=True)
def rounded_inputs(x):
    """x (T, K) f32 as quantize_inputs rounds it, in float32: code * s (exact), what the integer kernels
    multiply (the prefill kernel takes these)."""
    codes = quantize_inputs(x)
    n_tok, k_dim = x.shape
    scales = codes.view(np.float32)
    out = np.empty_like(x)
    for t in range(n_tok):
        for k in range(k_dim):
            out[t, k] = np.float32(codes[t, k]) * scales[t, k_dim // 4 + k // BLOCK]
    return out


def kernel_input(x, w):
    """x as the one-token and batched kernels take it with weight w: itself, or quantize_inputs(x) for codes
    viewed for q8 (compiled per weight type)."""


@overload(kernel_input, inline="always")
def _kernel_input_impl(x, w):
    if isinstance(w, types.Array) and w.ndim == 3 and w.dtype in _INTEGER_OF:
        return lambda x, w: quantize_inputs(x)
    return lambda x, w: x


def prefill_input(x, w):
    """x as the prefill kernel takes it with weight w: itself, or rounded_inputs(x) for codes viewed for q8."""


@overload(prefill_input, inline="always")
def _prefill_input_impl(x, w):
    if isinstance(w, types.Array) and w.ndim == 3 and w.dtype in _INTEGER_OF:
        return lambda x, w: rounded_inputs(x)
    return lambda x, w: x


def cols(w):
    """K of a weight as the kernels hold it (2-D: its columns; block codes: 32 per block)."""


@overload(cols, inline="always")
def _cols_impl(w):
    if isinstance(w, types.Array) and w.ndim == 3:
        return lambda w: w.shape[1] * BLOCK
    return lambda w: w.shape[1]


def decode_row(codes, halves, out):
    """out (K,) f32 = one row's weights; codes: the row of `code_view` (G, ...), halves: the row's packed
    scales as uint16 (pack_scales' layout). Compiled per storage (an overload on the codes' dtype)."""


@overload(decode_row, inline="always")
def _decode_row_impl(codes, halves, out):
    if not isinstance(codes, types.Array) or codes.dtype not in _STORAGE_OF:
        return None
    storage = _STORAGE_OF[codes.dtype]
    if storage == "int8":  # d per block

        def int8(codes, halves, out):
            for g in range(codes.shape[0]):
                d = half_to_f32(halves[g])
                for j in range(BLOCK):
                    out[g * BLOCK + j] = np.float32(codes[g, j]) * d

        return int8
    if storage == "uint4":  # (d, m) per block, low nibbles are weights 0..15

        def uint4(codes, halves, out):
            for g in range(codes.shape[0]):
                d = half_to_f32(halves[2 * g])
                m = half_to_f32(halves[2 * g + 1])
                for j in range(BLOCK // 2):
                    b = np.int32(codes[g, j])
                    out[g * BLOCK + j] = np.float32(b & 15) * d + m
                    out[g * BLOCK + BLOCK // 2 + j] = np.float32(b >> 4) * d + m

        return uint4
    if storage not in MINIFLOATS:
        return _integer_decoder(storage)
    values = minifloat_values(storage)  # a constant of the compiled code
    six = storage != "e2m1"

    def minifloat(codes, halves, out):  # value(code) * d, exact; low nibbles are weights 0..15
        b = codes.view(np.uint8)  # (G, 16 | 24)
        for g in range(b.shape[0]):
            d = half_to_f32(halves[g])
            for j in range(BLOCK // 2):
                q = np.int32(b[g, j])
                lo, hi = q & 15, q >> 4
                if six:  # the high 2 bits: quarter j // 8 (weights 0..15), 2 + j // 8 (16..31)
                    h = np.int32(b[g, BLOCK // 2 + (j & 7)]) >> (2 * (j >> 3))
                    lo |= (h & 3) << 4
                    hi |= ((h >> 4) & 3) << 4
                out[g * BLOCK + j] = values[lo] * d
                out[g * BLOCK + BLOCK // 2 + j] = values[hi] * d

    return minifloat


def _integer_decoder(storage: str):
    """decode_row for int5 / uint5 / q4k / q5k / q6k: integer codes times a scale per block (or per half
    block), plus an offset per block; the two-level scales (d * sc, dmin * m) are exact in float32."""
    six = CODES[storage] == "signed6"  # two's complement in FP6's layout
    five = CODES[storage] in ("signed5", "unsigned5")
    minus = 16 if CODES[storage] == "signed5" else 0
    kind = ("d", "dm", "k", "k16").index(SCALES[storage])

    def integer(codes, halves, out):
        b = codes.view(np.uint8)  # (G, code bytes)
        n_super = b.shape[0] // (SUPER // BLOCK)
        subs = halves[2 * n_super :].view(np.uint8)  # "k" / "k16": a pair of bytes per block
        for g in range(b.shape[0]):
            m = np.float32(0.0)
            if kind == 0:
                d = d1 = half_to_f32(halves[g])
            elif kind == 1:
                d = d1 = half_to_f32(halves[2 * g])
                m = half_to_f32(halves[2 * g + 1])
            elif kind == 2:
                s = g >> 3
                d = d1 = half_to_f32(halves[2 * s]) * np.float32(subs[2 * g])
                m = -(half_to_f32(halves[2 * s + 1]) * np.float32(subs[2 * g + 1]))
            else:
                top = half_to_f32(halves[2 * (g >> 3)])
                d = top * np.float32(np.int8(subs[2 * g]))
                d1 = top * np.float32(np.int8(subs[2 * g + 1]))
            bits = np.int64(0)
            if five:  # bit i of the little-endian word at byte 16: weight i's fifth bit
                for k in range(4):
                    bits |= np.int64(b[g, BLOCK // 2 + k]) << (8 * k)
            for j in range(BLOCK // 2):
                q = np.int32(b[g, j])
                lo, hi = q & 15, q >> 4
                if five:
                    lo = (lo | np.int32((bits >> j) & 1) << 4) - minus
                    hi = (hi | np.int32((bits >> (j + 16)) & 1) << 4) - minus
                if six:  # the high 2 bits: quarter j // 8 (weights 0..15), 2 + j // 8 (16..31)
                    h = np.int32(b[g, BLOCK // 2 + (j & 7)]) >> (2 * (j >> 3))
                    lo |= (h & 3) << 4
                    hi |= ((h >> 4) & 3) << 4
                    lo -= (lo >> 5) << 6
                    hi -= (hi >> 5) << 6
                out[g * BLOCK + j] = np.float32(lo) * d + m
                out[g * BLOCK + BLOCK // 2 + j] = np.float32(hi) * d1 + m

    return integer


@njit(cache=True, nogil=True)
def decode_rows(codes, halves, ids, out):
    """out[t] = the weights of row t of `codes` (T, G, ...: code_view's), whose scales are row ids[t] of
    `halves` (V, H) uint16 (pack_scales' layout): an embedding's token rows, read from the file."""
    for t in range(ids.shape[0]):
        decode_row(codes[t], halves[ids[t]], out[t])


# -- the dot products in explicit vectors (called from hy_edge_ops.dot.row_dots) ----------------------

_F32 = ir.FloatType()
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_CONTRACT = ("contract",)
_LINE = 64


def _minifloat_bits(storage: str) -> tuple[int, int]:
    """(shift, mask) taking a sign-extended byte (sign in bit 7, exponent and mantissa below) to a float32
    bit pattern: the exponent's top bit lands on float32's exponent bit e - 1 + 23."""
    e_bits, m_bits = minifloat.FORMATS[storage]
    mask = (1 << 31) | (((1 << (e_bits + m_bits)) - 1) << (23 - m_bits))
    return 16 + e_bits, mask - (1 << 32)


def _minifloat_bytes(builder, p, at, storage):
    """<32 x i8>: the block's codes at byte `at` of row `p`, in weight order, each with its sign in bit 7
    and exponent and mantissa below it; lower bits are left as they fall (the decode masks them)."""
    v16 = ir.VectorType(_I8, 16)
    i16x8 = ir.VectorType(_I16, 8)
    q = builder.load(builder.gep(p, [at], source_etype=_I8), typ=v16, align=1)
    words = builder.bitcast(q, i16x8)  # shifts in 16-bit lanes: one instruction, no byte masks
    order = ir.Constant(ir.VectorType(_I32, BLOCK), list(range(BLOCK)))
    if storage == "e2m1":  # weights 0..15 the low nibbles, shifted up; 16..31 the high nibbles as they are
        lo = builder.bitcast(builder.shl(words, ir.Constant(i16x8, [4] * 8)), v16)
        return builder.shuffle_vector(lo, q, order)
    # FP6: the low 4 bits into bits 2-5 (weights 0..15 from the low nibbles, 16..31 from the high)
    lo = builder.bitcast(builder.shl(words, ir.Constant(i16x8, [2] * 8)), v16)
    hi = builder.bitcast(builder.lshr(words, ir.Constant(i16x8, [2] * 8)), v16)
    low4 = builder.shuffle_vector(lo, hi, order)
    v32 = ir.VectorType(_I8, BLOCK)
    top, rest = ir.Constant(v32, [0xC0] * BLOCK), ir.Constant(v32, [0x3F] * BLOCK)
    return builder.or_(builder.and_(_high_pairs(builder, p, at), top), builder.and_(low4, rest))


def _high_pairs(builder, p, at):
    """<32 x i8>: the FP6 block's high 2 bits of weight j in bits 6-7 of byte j (the bits below are other
    weights'). Quarter i of the block (weights 8i..8i+7) has them in bits 2i, 2i+1 of the 8 bytes from byte
    16: shifted by 6 - 2i in its 64-bit lane, they land in bits 6-7."""
    i64x4 = ir.VectorType(_I64, 4)
    high = builder.load(builder.gep(p, [builder.add(at, at.type(16))], source_etype=_I8), typ=_I64, align=1)
    high = builder.insert_element(ir.Constant(i64x4, ir.Undefined), high, _I32(0))
    high = builder.shuffle_vector(high, high, ir.Constant(ir.VectorType(_I32, 4), [0] * 4))  # broadcast
    return builder.bitcast(builder.shl(high, ir.Constant(i64x4, [6, 4, 2, 0])), ir.VectorType(_I8, BLOCK))


def _nibble_lanes(builder, p, at):
    """<32 x i8>: uint4's nibbles at byte `at` of row `p` in weight order, for 256-bit x86 code: the 16 bytes in
    both 128-bit halves (one broadcast load), the high half's shifted down by 4 (a per-lane shift), masked."""
    v32, i32x8 = ir.VectorType(_I8, BLOCK), ir.VectorType(_I32, 8)
    b = builder.load(builder.gep(p, [at], source_etype=_I8), typ=ir.VectorType(_I8, 16), align=1)
    both = builder.shuffle_vector(b, b, ir.Constant(ir.VectorType(_I32, BLOCK), list(range(16)) * 2))
    shifted = builder.lshr(builder.bitcast(both, i32x8), ir.Constant(i32x8, [0] * 4 + [4] * 4))
    return builder.and_(builder.bitcast(shifted, v32), ir.Constant(v32, [15] * BLOCK))


def _route(storage: str) -> str:
    """How the kernels decode a minifloat on this ISA (see the module's docstring): "permute" (AVX-512:
    vpermps / vpermi2ps from a table of float32 values), "shuffle" (AVX2: vpshufb from tables of bytes), or
    "bits" (shifts and masks into a float32 bit pattern)."""
    return {"avx512": "permute", "avx2": "shuffle"}.get(ISA, "bits")


def minifloat_folds(storage: str) -> tuple[float, float]:
    """(on d, on the row's sum): the powers of two the kernels' decode of `storage` leaves out."""
    route = _route(storage)
    if route == "bits":
        return MINIFLOAT_FOLD[storage]
    if route == "shuffle":  # e2m1: the table holds value * d itself; FP6: E4M3 bits (value * 2**-120)
        return (1.0, 1.0) if storage == "e2m1" else (FP8_FOLD["e4m3"], FP8_FOLD["e4m3"])
    return (1.0, 1.0)


def _e4m3_magnitudes(storage: str) -> list[int]:
    """The E4M3 bits of each of a FP6 format's 32 magnitudes (all E4M3 normals or zero, exactly)."""
    out = []
    for v in minifloat_values(storage)[:32].astype(np.float64):
        if v == 0:
            out.append(0)
            continue
        frac, exp = np.frexp(v)  # v = frac * 2**exp, frac in [0.5, 1)
        mant = (frac * 2 - 1) * 8
        assert 1 <= exp - 1 + 7 <= 15 and mant == int(mant)
        out.append((exp - 1 + 7) << 3 | int(mant))
    return out


def _call(builder, name: str, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _minifloat_vectors(builder, p, at, d, storage: str, lanes: int, signed_byte_floats, splat_value) -> list:
    """The block's 32 weights at byte `at` of row `p` as BLOCK / lanes vectors of float32: value(code) * d,
    d the block's scale (a float32 scalar) times minifloat_folds' power of two on d; the vectors lack the
    power of two on the row's sum."""
    if _route(storage) == "shuffle" and storage == "e2m1":
        return [_e2m1_permps(builder, p, at, d, lanes)]
    dv = splat_value(builder, d, ir.VectorType(_F32, lanes))
    raw = _minifloat_raw(builder, p, at, storage, lanes, signed_byte_floats)
    return [builder.fmul(v, dv, flags=_CONTRACT) for v in raw]


def _e2m1_permps(builder, p, at, d, lanes: int):
    """AVX2's FP4 decode: the block's 32 weights as one <32 x float>, value(code) * d, through `vpermps`
    from the 8 magnitudes times d (one multiply per block, exact: a half times at most 2 significant bits).
    The codes are zero-extended from bytes (8 at a time: weights j..j+7 in the low nibbles, j+16.. in the
    high), vpermps reads each index's low 3 bits, and the sign (bit 3) reaches bit 31 by a shift left by 28
    that also drops the magnitude's 3 bits onto bits 28-30: the table holds each value with those same bits
    XOR-ed in beforehand, so one XOR undoes them and sets the sign."""
    assert lanes == BLOCK
    i32x8, f8 = ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)
    mags = [float(v) for v in minifloat_values("e2m1")[:8]]
    dv = builder.insert_element(ir.Constant(f8, ir.Undefined), d, _I32(0))
    dv = builder.shuffle_vector(dv, dv, ir.Constant(i32x8, [0] * 8))
    table = builder.bitcast(builder.fmul(ir.Constant(f8, mags), dv), i32x8)
    table = builder.bitcast(builder.xor(table, ir.Constant(i32x8, [m << 28 for m in range(8)])), f8)
    bytes_ = [
        builder.zext(
            builder.load(
                builder.gep(p, [builder.add(at, at.type(j))], source_etype=_I8), typ=ir.VectorType(_I8, 8), align=1
            ),
            i32x8,
        )
        for j in (0, 8)
    ]
    parts = []
    for high in (False, True):  # weights 0..7, 8..15 (low nibbles), then 16..23, 24..31 (high nibbles)
        for z in bytes_:
            idx = builder.lshr(z, ir.Constant(i32x8, [4] * 8)) if high else z
            mag = _call(builder, "llvm.x86.avx2.permps", f8, [table, idx])
            sign = builder.shl(idx, ir.Constant(i32x8, [28] * 8))  # z < 256: bits 4-7 of z shift out
            parts.append(builder.bitcast(builder.xor(builder.bitcast(mag, i32x8), sign), f8))
    halves = [
        builder.shuffle_vector(parts[i], parts[i + 1], ir.Constant(ir.VectorType(_I32, 16), list(range(16))))
        for i in (0, 2)
    ]
    return builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(_I32, BLOCK), list(range(BLOCK))))


def _minifloat_raw(builder, p, at, storage: str, lanes: int, signed_byte_floats) -> list:
    """_minifloat_vectors before the multiply by d: value(code) times minifloat_folds' missing powers of two."""
    v16, i32x16 = ir.VectorType(_I8, 16), ir.VectorType(_I32, 16)
    route = _route(storage)
    if route == "permute" and storage == "e2m1":  # vpermps reads each index's low 4 bits
        table = ir.Constant(ir.VectorType(_F32, 16), [float(v) for v in minifloat_values(storage)])
        q = builder.zext(builder.load(builder.gep(p, [at], source_etype=_I8), typ=v16, align=1), i32x16)
        halves = [q, builder.lshr(q, ir.Constant(i32x16, [4] * 16))]  # weights 0..15, 16..31
        vals = [_call(builder, "llvm.x86.avx512.permvar.sf.512", table.type, [table, i]) for i in halves]
        return [builder.shuffle_vector(vals[0], vals[1], ir.Constant(ir.VectorType(_I32, BLOCK), list(range(BLOCK))))]
    codes = _minifloat_bytes(builder, p, at, storage)  # sign in bit 7, exponent and mantissa below
    if route == "shuffle":  # FP6 on AVX2: the magnitude's E4M3 bits from two vpshufb tables, then FP8's decode
        v32, i16x16 = ir.VectorType(_I8, BLOCK), ir.VectorType(_I16, BLOCK // 2)
        mag = builder.bitcast(builder.lshr(builder.bitcast(codes, i16x16), ir.Constant(i16x16, [2] * 16)), v32)
        mag = builder.and_(mag, ir.Constant(v32, [31] * BLOCK))
        # vpshufb gives 0 for an index with bit 7 set: magnitudes 0..15 index the first table, 16..31 the second
        first = _call(builder, "llvm.uadd.sat.v32i8", v32, [mag, ir.Constant(v32, [0x70] * BLOCK)])
        second = builder.add(mag, ir.Constant(v32, [0xF0] * BLOCK))
        table = _e4m3_magnitudes(storage)
        e4m3 = builder.or_(
            _call(builder, "llvm.x86.avx2.pshuf.b", v32, [ir.Constant(v32, table[:16] * 2), first]),
            _call(builder, "llvm.x86.avx2.pshuf.b", v32, [ir.Constant(v32, table[16:] * 2), second]),
        )
        e4m3 = builder.or_(e4m3, builder.and_(codes, ir.Constant(v32, [0x80] * BLOCK)))  # the sign
        return [signed_byte_floats(builder, e4m3, *FP8_BITS["e4m3"])]
    if route == "permute":  # FP6: vpermi2ps from the 32 magnitudes (index bits 0-4), the sign put back
        mags = [float(v) for v in minifloat_values(storage)[:32]]
        lo_t, hi_t = (ir.Constant(ir.VectorType(_F32, 16), mags[i : i + 16]) for i in (0, 16))
        out = []
        for half in range(2):
            pick = ir.Constant(i32x16, list(range(16 * half, 16 * half + 16)))
            s = builder.sext(builder.shuffle_vector(codes, codes, pick), i32x16)
            idx = builder.lshr(s, ir.Constant(i32x16, [2] * 16))
            mag = _call(builder, "llvm.x86.avx512.vpermi2var.ps.512", lo_t.type, [lo_t, idx, hi_t])
            sign = builder.and_(s, ir.Constant(i32x16, [-(1 << 31)] * 16))
            out.append(builder.bitcast(builder.or_(builder.bitcast(mag, i32x16), sign), lo_t.type))
        return [builder.shuffle_vector(out[0], out[1], ir.Constant(ir.VectorType(_I32, BLOCK), list(range(BLOCK))))]
    shift, mask = _minifloat_bits(storage)
    return [signed_byte_floats(builder, part, shift, mask) for part in _lane_parts(builder, codes, lanes)]


def _lane_parts(builder, v, lanes: int) -> list:
    """A block's <32 x T> vector as BLOCK / lanes vectors of `lanes` elements, in order."""
    if lanes == BLOCK:
        return [v]
    picks = [ir.Constant(ir.VectorType(_I32, lanes), list(range(i, i + lanes))) for i in range(0, BLOCK, lanes)]
    return [builder.shuffle_vector(v, v, pick) for pick in picks]


def _nibbles(builder, p, at, lanes: int) -> list:
    """The 4-bit codes of the block at byte `at` of row `p` (uint4's layout: byte j holds weights j and
    j + 16), as i8 vectors in weight order: one of 32 (lanes == BLOCK), or the low nibbles then the high."""
    v16 = ir.VectorType(_I8, 16)
    b = builder.load(builder.gep(p, [at], source_etype=_I8), typ=v16, align=1)
    lo = builder.and_(b, ir.Constant(v16, [15] * 16))
    hi = builder.lshr(b, ir.Constant(v16, [4] * 16))
    if lanes == BLOCK:
        return [builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, BLOCK), list(range(BLOCK))))]
    return [lo, hi]


def _integer_block(builder, p, s_row, at, g, storage, lanes, n_super, pair_at, splat_value) -> list:
    """The 32 weights of block g of an int5 / uint5 / q4k / q5k / q6k row as BLOCK / lanes float32
    vectors: code * scale (+ offset), each exact as `dequantize` computes it (the scale's product d * sc
    is exact in float32; code * scale is rounded once, or exact where an offset follows)."""
    intp = g.type
    vf = ir.VectorType(_F32, lanes)
    kind = SCALES[storage]
    if CODES[storage] == "nibbles":
        codes = [builder.uitofp(q, vf) for q in _nibbles(builder, p, at, lanes)]
        fold = 1.0
    elif CODES[storage] != "signed6":  # 5-bit: the nibbles, and bit i of the word at byte 16 as 16
        v32 = ir.VectorType(_I8, BLOCK)
        (nibbles,) = _nibbles(builder, p, at, BLOCK)
        word = builder.load(
            builder.gep(p, [builder.add(at, intp(16))], source_etype=_I8), typ=ir.VectorType(_I8, 4), align=1
        )
        spread = builder.shuffle_vector(
            word, word, ir.Constant(ir.VectorType(_I32, BLOCK), [i // 8 for i in range(BLOCK)])
        )
        mask = ir.Constant(v32, [1 << (i % 8) for i in range(BLOCK)])
        set_ = builder.icmp_unsigned("!=", builder.and_(spread, mask), ir.Constant(v32, [0] * BLOCK))
        ints = builder.or_(nibbles, builder.select(set_, ir.Constant(v32, [16] * BLOCK), ir.Constant(v32, [0] * BLOCK)))
        signed = CODES[storage] == "signed5"
        if signed:
            ints = builder.sub(ints, ir.Constant(v32, [16] * BLOCK))
        codes = [builder.sitofp(q, vf) if signed else builder.uitofp(q, vf) for q in _lane_parts(builder, ints, lanes)]
        fold = 1.0
    else:  # 6-bit codes in bits 2-7 of a byte: signed, their value times 4 (the 4 folded into the scale)
        v32 = ir.VectorType(_I8, BLOCK)
        six = _minifloat_bytes(builder, p, at, "e3m2")
        ints, fold = builder.and_(six, ir.Constant(v32, [0xFC] * BLOCK)), 0.25
        codes = [builder.sitofp(q, vf) for q in _lane_parts(builder, ints, lanes)]
    offset = None
    if kind == "d":
        d, _ = pair_at(s_row, g)
        scales = [d, d]
    elif kind == "dm":
        d, offset = pair_at(s_row, builder.mul(g, intp(2)))
        scales = [d, d]
    else:  # the super-block's halves, then this block's pair of bytes after the row's 2 S halves
        top, low = pair_at(s_row, builder.mul(builder.lshr(g, intp(3)), intp(2)))
        subs_at = builder.add(builder.mul(n_super, intp(4)), builder.mul(g, intp(2)))
        pair = builder.load(builder.gep(s_row, [subs_at], source_etype=_I8), typ=ir.VectorType(_I8, 2), align=1)
        if kind == "k":
            sub = builder.uitofp(pair, ir.VectorType(_F32, 2))
            d = builder.fmul(top, builder.extract_element(sub, _I32(0)))
            offset = builder.fneg(builder.fmul(low, builder.extract_element(sub, _I32(1))))
            scales = [d, d]
        else:
            sub = builder.sitofp(pair, ir.VectorType(_F32, 2))
            scales = [builder.fmul(top, builder.extract_element(sub, _I32(j))) for j in range(2)]
    if fold != 1.0:  # exact: a power of two
        scales = [builder.fmul(s, _F32(fold)) for s in scales]
    if lanes == BLOCK:  # one vector: its first 16 lanes take scales[0], the rest scales[1]
        halves = [splat_value(builder, s, ir.VectorType(_F32, 16)) for s in scales]
        order = ir.Constant(ir.VectorType(_I32, BLOCK), list(range(BLOCK)))
        scale_vecs = [builder.shuffle_vector(halves[0], halves[1], order)]
    else:
        scale_vecs = [splat_value(builder, scales[(sub * lanes) // 16], vf) for sub in range(BLOCK // lanes)]
    out = []
    for q, s in zip(codes, scale_vecs, strict=True):
        v = builder.fmul(q, s, flags=_CONTRACT)
        if offset is not None:
            v = builder.fadd(v, splat_value(builder, offset, vf), flags=_CONTRACT)
        out.append(v)
    return out


def _integer_codes(builder, p, at, storage: str):
    """The block's 32 codes as integers value(code) * INTEGER_INPUTS[storage], for the integer dot: a pair
    of <32 x i8> (magnitude, sign source) on x86 (vpshufb tables; the sign source is negative where the
    weight is, and zero only where the weight is), or (None, signed integers) elsewhere (shifts)."""
    v32 = ir.VectorType(_I8, BLOCK)
    x86 = ISA in ("avx2", "avx512")

    def c(value):
        return ir.Constant(v32, [value] * BLOCK)

    if storage == "e2m1":  # codes: bit 3 the sign, then exponent (2 bits) and mantissa (1)
        if x86:
            nib = _nibble_lanes(builder, p, at)
        else:
            (nib,) = _nibbles(builder, p, at, BLOCK)
        if x86:
            table = [int(v) for v in minifloat_values(storage) * INTEGER_INPUTS[storage]] * 2
            signed = _call(builder, "llvm.x86.avx2.pshuf.b", v32, [ir.Constant(v32, table), nib])
            return _call(builder, "llvm.abs.v32i8", v32, [signed, ir.IntType(1)(0)]), signed
        sign, mag, m_bits = builder.and_(nib, c(8)), builder.and_(nib, c(7)), 1
    else:  # e2m3: the low nibble, then the high pair (the magnitude's bit 4, then the sign)
        if x86:  # the nibble indexes two vpshufb tables, one per value of the magnitude's bit 4, blended
            nib, high = _nibble_lanes(builder, p, at), _high_pairs(builder, p, at)  # high: the pair in bits 6-7
            ints = [int(v) for v in minifloat_values(storage)[:32] * INTEGER_INPUTS[storage]]
            low, upper = (
                _call(builder, "llvm.x86.avx2.pshuf.b", v32, [ir.Constant(v32, ints[i : i + 16] * 2), nib])
                for i in (0, 16)
            )
            bit4 = builder.icmp_signed("<", builder.add(high, high), c(0))  # bit 6 doubled into the sign bit
            # the sign source: negative with the sign bit, never zero (vpsignb zeroes x where it is)
            return builder.select(bit4, upper, low), builder.or_(high, c(1))
        codes = _minifloat_bytes(builder, p, at, storage)
        sign = builder.and_(codes, c(0x80))
        mag, m_bits = builder.and_(builder.lshr(codes, c(2)), c(31)), 3
    # value * 2**m_bits for the magnitude's code k = e * 2**m_bits + m (e the exponent bits, m the mantissa):
    # k itself while e <= 1 (m, then 2**m_bits + m); 2 (2**m_bits + m) = k + m at e = 2; 4 (2**m_bits + m) =
    # k + 3 m + 2 * 2**m_bits at e = 3: k + (k - 2 * 2**m_bits)+ + 2 (k - 3 * 2**m_bits)+, by saturating subtracts
    one = 1 << m_bits
    above = _call(builder, "llvm.usub.sat.v32i8", v32, [mag, c(2 * one)])
    top = _call(builder, "llvm.usub.sat.v32i8", v32, [mag, c(3 * one)])
    ints = builder.add(builder.add(mag, above), builder.add(top, top))
    negative = builder.icmp_unsigned("!=", sign, c(0))
    return None, builder.select(negative, builder.sub(c(0), ints), ints)


def _integer_dot(builder, mag, signs, xs):
    """<8 x i32> for one block, <16 x i32> for two (the vectors concatenated): lane j = the sum over i < 4
    of weight[4j + i] * xs[4j + i], the weights as _integer_codes gives them; exact (|weight| <= 60,
    |x| <= 127: no pair sum leaves int16). x86: |w| times x with w's sign, as unsigned x signed bytes,
    pairs summed (vpmaddubsw), then pairs of pairs (vpmaddwd); two blocks in one instruction each with
    AVX-512 (which has no vpsignb: the sign by a masked subtract)."""
    n = xs.type.count
    v8, i16, i32 = ir.VectorType(_I8, n), ir.VectorType(_I16, n // 2), ir.VectorType(_I32, n // 4)
    if mag is not None and ISA == "avx512" and n == 2 * BLOCK:
        xs = builder.select(
            builder.icmp_signed("<", signs, ir.Constant(v8, [0] * n)), builder.sub(ir.Constant(v8, [0] * n), xs), xs
        )
        if _VNNI:  # the quads in one instruction (exact: no int16 pair sums)
            args = [ir.Constant(i32, None), builder.bitcast(mag, i32), builder.bitcast(xs, i32)]
            return _call(builder, "llvm.x86.avx512.vpdpbusd.512", i32, args)
        pairs = _call(builder, "llvm.x86.avx512.pmaddubs.w.512", i16, [mag, xs])
        return _call(builder, "llvm.x86.avx512.pmaddw.d.512", i32, [pairs, ir.Constant(i16, [1] * (n // 2))])
    if mag is not None:
        if n == 2 * BLOCK:  # AVX2: block by block
            halves = [ir.Constant(ir.VectorType(_I32, BLOCK), list(range(h, h + BLOCK))) for h in (0, BLOCK)]
            parts = [
                _integer_dot(builder, *(builder.shuffle_vector(v, v, pick) for v in (mag, signs, xs)))
                for pick in halves
            ]
            return builder.shuffle_vector(parts[0], parts[1], ir.Constant(ir.VectorType(_I32, 16), list(range(16))))
        v32, i16x16, i32x8 = ir.VectorType(_I8, BLOCK), ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
        xs = _call(builder, "llvm.x86.avx2.psign.b", v32, [xs, signs])
        pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", i16x16, [mag, xs])
        return _call(builder, "llvm.x86.avx2.pmadd.wd", i32x8, [pairs, ir.Constant(i16x16, [1] * 16)])
    # 16 bytes at a time: the quads of each (a partial reduction of 16 products into 4 lanes: one `sdot` on
    # a CPU with the dot-product instructions, as the Cortex-A76)
    i32x4, i32x16 = ir.VectorType(_I32, 4), ir.VectorType(_I32, 16)
    parts = []
    for c in range(0, n, 16):
        pick = ir.Constant(ir.VectorType(_I32, 16), list(range(c, c + 16)))
        a, b = (builder.sext(builder.shuffle_vector(v, v, pick), i32x16) for v in (signs, xs))
        reduce = "llvm.vector.partial.reduce.add.v4i32.v16i32"
        parts.append(_call(builder, reduce, i32x4, [ir.Constant(i32x4, None), builder.mul(a, b, flags=["nsw"])]))
    while len(parts) > 1:
        m = parts[0].type.count
        order = ir.Constant(ir.VectorType(_I32, 2 * m), list(range(2 * m)))
        parts = [builder.shuffle_vector(parts[i], parts[i + 1], order) for i in range(0, len(parts), 2)]
    return parts[0]


def emit_block_dots(context, builder, signature, args, lanes: int, lane_sum, splat_value):
    """The code of row_dots for block codes (see the module's docstring); returns the tuple of sums."""
    from .dot import signed_byte_floats
    from .prefetch import emit_prefetch_l2

    wty, scty, _, rows_ty, xty, toks_ty, _ = signature.args
    n_r, n_t = rows_ty.count, toks_ty.count
    wa = context.make_array(wty)(context, builder, args[0])
    sa = context.make_array(scty)(context, builder, args[1])
    xa = context.make_array(xty)(context, builder, args[4])
    intp = args[2].type
    storage = _STORAGE_OF[wty.dtype]
    per = CODE_BYTES[storage]  # code bytes per block
    row_ix = cgutils.unpack_tuple(builder, args[3], n_r)
    tok_ix = cgutils.unpack_tuple(builder, args[5], n_t)
    n_groups = builder.extract_value(wa.shape, 1)
    row_bytes = builder.mul(n_groups, intp(per))
    halves_per_row = builder.mul(builder.extract_value(sa.shape, 1), intp(2))
    x_stride = builder.extract_value(xa.shape, 1)
    vf = ir.VectorType(_F32, lanes)
    zero_f = ir.Constant(vf, None)
    fold_d, fold_sum = minifloat_folds(storage) if storage in MINIFLOATS else (1.0, 1.0)

    def byte_ptr(base, at):
        return builder.gep(base, [at], source_etype=_I8)

    w_rows = [byte_ptr(wa.data, builder.mul(r, row_bytes)) for r in row_ix]
    s_rows = [builder.gep(sa.data, [builder.mul(r, halves_per_row)], source_etype=_I16) for r in row_ix]
    x_rows = [builder.gep(xa.data, [builder.mul(t, x_stride)]) for t in tok_ix]
    accs = [] if wty.dtype in _INTEGER_OF else [cgutils.alloca_once_value(builder, zero_f) for _ in range(n_r * n_t)]
    ahead = args[6]

    def halves_at(s_row, i):
        # halves i and i + 1 as one 32-bit load (pack_scales pads single-d rows to an even count): a scalar
        # half load became vpinsrw, merging into a register that held an accumulator (a false dependency)
        pair = builder.load(builder.gep(s_row, [i], source_etype=_I16), typ=ir.VectorType(_I16, 2), align=2)
        wide = builder.fpext(builder.bitcast(pair, ir.VectorType(ir.HalfType(), 2)), ir.VectorType(_F32, 2))
        return [splat_value(builder, builder.extract_element(wide, _I32(j)), vf) for j in range(2)]

    def pair_at(s_row, i):  # halves i and i + 1 of a row as two float32 scalars
        pair = builder.load(builder.gep(s_row, [i], source_etype=_I16), typ=ir.VectorType(_I16, 2), align=2)
        wide = builder.fpext(builder.bitcast(pair, ir.VectorType(ir.HalfType(), 2)), ir.VectorType(_F32, 2))
        return [builder.extract_element(wide, _I32(j)) for j in range(2)]

    n_super = builder.udiv(n_groups, intp(SUPER // BLOCK))
    if wty.dtype in _INTEGER_OF:  # inputs rounded to int8 (quantize_inputs): integer dots per block
        return _emit_integer_dots(
            context, builder, signature, (w_rows, s_rows, x_rows), n_groups, ahead, pair_at, byte_ptr, lane_sum
        )
    with cgutils.for_range(builder, n_groups, intp=intp) as loop:
        g = loop.index
        at = builder.mul(g, intp(per))
        at_line = builder.icmp_unsigned("<", builder.urem(at, intp(_LINE)), intp(per))  # the block starts a line
        with builder.if_then(at_line):
            for p in w_rows:  # once per cache line of codes: the same row `ahead` bytes on, into L2
                emit_prefetch_l2(builder, byte_ptr(p, builder.add(at, ahead)))
        # each row's decoded vectors of this block: 32 / lanes of them
        decoded = []
        for p, s_row in zip(w_rows, s_rows, strict=True):
            if storage == "int8":
                d = halves_at(s_row, g)[0]
                vecs = []
                for sub in range(BLOCK // lanes):
                    q_at = byte_ptr(p, builder.add(at, intp(sub * lanes)))
                    q = builder.load(q_at, typ=ir.VectorType(_I8, lanes), align=1)
                    vecs.append(builder.fmul(builder.sitofp(q, vf), d, flags=_CONTRACT))
            elif storage == "uint4":
                d, m = halves_at(s_row, builder.mul(g, intp(2)))
                parts = _nibbles(builder, p, at, lanes)
                vecs = [
                    builder.fadd(builder.fmul(builder.uitofp(q, vf), d, flags=_CONTRACT), m, flags=_CONTRACT)
                    for q in parts
                ]
            elif storage not in MINIFLOATS:  # int5 / uint5 / q4k / q5k / q6k
                vecs = _integer_block(builder, p, s_row, at, g, storage, lanes, n_super, pair_at, splat_value)
            else:  # minifloats: value(code) times a power of two, times d with the fold on d
                d = pair_at(s_row, g)[0]
                if fold_d != 1.0:  # exact: a power of two
                    d = builder.fmul(d, _F32(fold_d))
                vecs = _minifloat_vectors(builder, p, at, d, storage, lanes, signed_byte_floats, splat_value)
            decoded.append(vecs)
        for sub in range(BLOCK // lanes):
            k = builder.add(builder.mul(g, intp(BLOCK)), intp(sub * lanes))
            xs = [builder.load(builder.gep(p, [k]), typ=vf, align=4) for p in x_rows]
            for i in range(n_r):
                for j in range(n_t):
                    acc = accs[i * n_t + j]
                    prod = builder.fmul(decoded[i][sub], xs[j], flags=_CONTRACT)
                    builder.store(builder.fadd(builder.load(acc), prod, flags=_CONTRACT), acc)
    sums = [lane_sum(builder, builder.load(acc)) for acc in accs]
    if fold_sum != 1.0:  # the rest of the minifloat's power of two, exact
        sums = [builder.fmul(s, _F32(fold_sum)) for s in sums]
    return context.make_tuple(builder, signature.return_type, sums)


def _emit_integer_dots(context, builder, signature, rows, n_groups, ahead, pair_at, byte_ptr, lane_sum):
    """row_dots for codes viewed for q8: blocks in pairs; per pair, each row's codes as integers
    (_integer_codes, once per row) times each token's int8 inputs, summed exactly in 8 int32 lanes per block
    (_integer_dot), converted, and added to the (row, token)'s 16 float32 lanes (the pair's first block in
    lanes 0-7, its second in 8-15: two independent chains) times d * s / INTEGER_INPUTS (d the block's
    scale, s the input block's); an odd last block goes to lanes 0-7. The lanes are summed pairwise at the
    end. The same order for every rows x tokens block: batch-invariant as the float kernels."""
    from .prefetch import emit_prefetch_l2

    w_rows, s_rows, x_rows = rows
    n_r, n_t = len(w_rows), len(x_rows)
    intp = n_groups.type
    storage = _STORAGE_OF[signature.args[0].dtype]
    per = CODE_BYTES[storage]
    f8, f16 = ir.VectorType(_F32, 8), ir.VectorType(_F32, 16)
    k_dim = builder.mul(n_groups, intp(BLOCK))
    accs = [cgutils.alloca_once_value(builder, ir.Constant(f16, None)) for _ in range(n_r * n_t)]
    fold = _F32(1.0 / INTEGER_INPUTS[storage])  # exact: a power of two

    def concat(a, b):
        n = a.type.count
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n))))

    def splat8(value):
        v = builder.insert_element(ir.Constant(f8, ir.Undefined), value, _I32(0))
        return builder.shuffle_vector(v, ir.Constant(f8, ir.Undefined), ir.Constant(ir.VectorType(_I32, 8), [0] * 8))

    def blocks(gs):  # add blocks gs (one or two) of every (row, token) to its accumulator
        for g in gs:
            at = builder.mul(g, intp(per))
            with builder.if_then(builder.icmp_unsigned("<", builder.urem(at, intp(_LINE)), intp(per))):
                for p in w_rows:
                    emit_prefetch_l2(builder, byte_ptr(p, builder.add(at, ahead)))
        codes = [[_integer_codes(builder, p, builder.mul(g, intp(per)), storage) for g in gs] for p in w_rows]
        ds = [[builder.fmul(pair_at(s_row, g)[0], fold) for g in gs] for s_row in s_rows]
        for j, x in enumerate(x_rows):
            xs = [
                builder.load(byte_ptr(x, builder.mul(g, intp(BLOCK))), typ=ir.VectorType(_I8, BLOCK), align=1)
                for g in gs
            ]
            ss = [builder.load(byte_ptr(x, builder.add(k_dim, builder.mul(g, intp(4)))), typ=_F32, align=4) for g in gs]
            for i in range(n_r):
                acc = accs[i * n_t + j]
                if len(gs) == 2:
                    (m0, s0), (m1, s1) = codes[i]
                    mag = None if m0 is None else concat(m0, m1)
                    sums = builder.sitofp(_integer_dot(builder, mag, concat(s0, s1), concat(*xs)), f16)
                else:
                    ((mag, signs),) = codes[i]
                    sums = concat(builder.sitofp(_integer_dot(builder, mag, signs, xs[0]), f8), ir.Constant(f8, None))
                scales = [splat8(builder.fmul(d, s)) for d, s in zip(ds[i], ss, strict=True)]
                scale = concat(scales[0], scales[-1])
                prod = builder.fmul(sums, scale, flags=_CONTRACT)
                builder.store(builder.fadd(builder.load(acc), prod, flags=_CONTRACT), acc)

    with cgutils.for_range(builder, builder.udiv(n_groups, intp(2)), intp=intp) as loop:
        g0 = builder.mul(loop.index, intp(2))
        blocks([g0, builder.add(g0, intp(1))])
    with builder.if_then(builder.icmp_unsigned("!=", builder.urem(n_groups, intp(2)), intp(0))):
        blocks([builder.sub(n_groups, intp(1))])
    sums = [lane_sum(builder, builder.load(acc)) for acc in accs]
    return context.make_tuple(builder, signature.return_type, sums)
