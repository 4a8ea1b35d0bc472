"""Block-integer weights: GGUF's Q8_0, Q4_0 and Q4_1 kept as they are, decoded inside the kernels.

A row of K weights is K / 32 blocks of 32; block g of row n holds integer codes q and an IEEE half scale
d (and, for 4-bit codes, a half offset m): weight = q * d (+ m), computed in float32, where q * d is
exact (a half has 11 significant bits, a code at most 8) and the offset is added with one rounding — the
value `gguf`'s dequantizer and onnxruntime's DequantizeLinear (+ Add) give. Two storages:
- `int8`  (Q8_0): codes int8, one per byte, in order; 34 bytes per block in the source, 34 here;
- `uint4` (Q4_1, and Q4_0 as offset -8d): 16 bytes per block, byte j holding weight j in its low
  nibble and weight j + 16 in its high nibble (GGUF's layout); 20 bytes per block with d and m.
The kernels see codes as 3-D arrays, which types them apart from the 2-D FP8/FP16/FP32 weights: int8
(N, K/32, 32), uint8 (N, K/32, 16). Their "scales" argument is the half bits packed into a float32
array (`pack_scales`): int8 (N, ceil(G/2)) with two blocks' d per element, uint4 (N, G) with (d, m) per
element: 2 and 4 bytes per block read, as in the source file.

The dot products (`emit_block_dots`, reached through hy_edge_ops.dot.row_dots) keep dot's order: one
vector of LANES float32 lanes per (row, token), lane i taking elements i, i + LANES, ... in turn, each
decoded weight (q * d + m, exact as above) multiplied and added; the lanes summed pairwise at the end.
So a token's outputs are the same whatever rows and tokens the kernel blocks together (batch invariance,
as for FP8). Per 32 weights: the codes widened and converted (4-bit: split into low and high nibbles
first), one multiply by d (and one add of m) per vector, shared by the block's tokens.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import overload

from .half import half_to_f32

BLOCK = 32  # weights per block
CODE_BYTES = {"int8": 32, "uint4": 16}  # bytes of codes per block
STORAGES = tuple(CODE_BYTES)
_KERNEL_DTYPE = {"int8": np.int8, "uint4": np.uint8}


def code_view(w: np.ndarray, storage: str) -> np.ndarray:
    """The kernels' 3-D view of stored codes: int8 (N, K) -> (N, K/32, 32); uint4 bytes (N, K/2) ->
    uint8 (N, K/32, 16). No copy."""
    n_rows = w.shape[0]
    per = CODE_BYTES[storage]
    if w.ndim != 2 or w.shape[1] % per:
        raise ValueError(f"{storage} codes of shape {w.shape}: rows must be whole blocks of {per} bytes")
    return w.view(_KERNEL_DTYPE[storage]).reshape(n_rows, w.shape[1] // per, per)


def pack_scales(storage: str, scale: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """The kernels' scales from half bits: int8 (N, G) d -> float32 (N, ceil(G/2)) holding the d's in
    order; uint4 (N, G) d and m -> float32 (N, G) holding (d, m) pairs."""
    scale = np.ascontiguousarray(scale).view(np.uint16)
    n_rows, n_groups = scale.shape
    if storage == "int8":
        halves = np.zeros((n_rows, n_groups + n_groups % 2), np.uint16)
        halves[:, :n_groups] = scale
    else:
        if offset is None or offset.shape != scale.shape:
            raise ValueError("uint4 weights need an offset per block, shaped as the scales")
        halves = np.empty((n_rows, n_groups, 2), np.uint16)
        halves[:, :, 0] = scale
        halves[:, :, 1] = np.ascontiguousarray(offset).view(np.uint16)
    return np.ascontiguousarray(halves.reshape(n_rows, -1)).view(np.float32)


def dequantize(storage: str, w: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """float32 (N, K) weights of stored codes (numpy; the reference the kernels are tested against)."""
    d = np.ascontiguousarray(scale).view(np.float16).astype(np.float32)[:, :, None]  # (N, G, 1)
    if storage == "int8":
        q = code_view(w, storage).astype(np.float32)
        return (q * d).reshape(w.shape[0], -1)
    b = code_view(w, storage)
    q = np.concatenate([b & 15, b >> 4], axis=2).astype(np.float32)  # (N, G, 32): low nibbles first
    m = np.ascontiguousarray(offset).view(np.float16).astype(np.float32)[:, :, None]
    return (q * d + m).reshape(w.shape[0], -1)


# -- compiled helpers ----------------------------------------------------------------------------------


def cols(w):
    """K of a weight as the kernels hold it (2-D: its columns; block codes: 32 per block)."""


@overload(cols, inline="always")
def _cols_impl(w):
    if isinstance(w, types.Array) and w.ndim == 3:
        return lambda w: w.shape[1] * BLOCK
    return lambda w: w.shape[1]


@njit(cache=True, inline="always")
def decode_row(codes, halves, out):
    """out (K,) f32 = one row's weights; codes (G, 32) int8 | (G, 16) uint8, halves: the row's packed
    scales as uint16 (pack_scales' layout)."""
    n_groups, per = codes.shape
    for g in range(n_groups):
        base = g * BLOCK
        if per == BLOCK:  # int8: d per block
            d = half_to_f32(halves[g])
            for j in range(BLOCK):
                out[base + j] = np.float32(codes[g, j]) * d
        else:  # uint4: (d, m) per block, low nibbles are weights 0..15
            d = half_to_f32(halves[2 * g])
            m = half_to_f32(halves[2 * g + 1])
            for j in range(per):
                b = np.int32(codes[g, j])
                out[base + j] = np.float32(b & 15) * d + m
                out[base + per + j] = np.float32(b >> 4) * d + m


@njit(cache=True, nogil=True)
def decode_rows(codes, halves, ids, out):
    """out[t] = the weights of row t of `codes` (T, G, 32 | 16), whose scales are row ids[t] of
    `halves` (V, H) uint16 (pack_scales' layout): an embedding's token rows, read from the file."""
    for t in range(ids.shape[0]):
        decode_row(codes[t], halves[ids[t]], out[t])


# -- the dot products in explicit vectors (called from hy_edge_ops.dot.row_dots) ----------------------

_F32 = ir.FloatType()
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_CONTRACT = ("contract",)
_LINE = 64


def emit_block_dots(context, builder, signature, args, lanes: int, lane_sum, splat_value):
    """The code of row_dots for block codes (see the module's docstring); returns the tuple of sums."""
    from .prefetch import emit_prefetch_l2

    wty, scty, _, rows_ty, xty, toks_ty, _ = signature.args
    n_r, n_t = rows_ty.count, toks_ty.count
    wa = context.make_array(wty)(context, builder, args[0])
    sa = context.make_array(scty)(context, builder, args[1])
    xa = context.make_array(xty)(context, builder, args[4])
    intp = args[2].type
    per = BLOCK if wty.dtype == types.int8 else BLOCK // 2  # code bytes per block
    row_ix = cgutils.unpack_tuple(builder, args[3], n_r)
    tok_ix = cgutils.unpack_tuple(builder, args[5], n_t)
    n_groups = builder.extract_value(wa.shape, 1)
    row_bytes = builder.mul(n_groups, intp(per))
    halves_per_row = builder.mul(builder.extract_value(sa.shape, 1), intp(2))
    x_stride = builder.extract_value(xa.shape, 1)
    vf = ir.VectorType(_F32, lanes)
    zero_f = ir.Constant(vf, None)

    def byte_ptr(base, at):
        return builder.gep(base, [at], source_etype=_I8)

    w_rows = [byte_ptr(wa.data, builder.mul(r, row_bytes)) for r in row_ix]
    s_rows = [builder.gep(sa.data, [builder.mul(r, halves_per_row)], source_etype=_I16) for r in row_ix]
    x_rows = [builder.gep(xa.data, [builder.mul(t, x_stride)]) for t in tok_ix]
    accs = [cgutils.alloca_once_value(builder, zero_f) for _ in range(n_r * n_t)]
    ahead = args[6]
    blocks_per_line = max(1, _LINE // per)

    def halves_at(s_row, i):
        # halves i and i + 1 as one 32-bit load (pack_scales pads int8 rows to an even count): a scalar half
        # load became vpinsrw, merging into a register that held an accumulator (a false dependency)
        pair = builder.load(builder.gep(s_row, [i], source_etype=_I16), typ=ir.VectorType(_I16, 2), align=2)
        wide = builder.fpext(builder.bitcast(pair, ir.VectorType(ir.HalfType(), 2)), ir.VectorType(_F32, 2))
        return [splat_value(builder, builder.extract_element(wide, _I32(j)), vf) for j in range(2)]

    with cgutils.for_range(builder, n_groups, intp=intp) as loop:
        g = loop.index
        at_line = builder.icmp_signed("==", builder.srem(g, intp(blocks_per_line)), intp(0))
        with builder.if_then(at_line):
            for p in w_rows:  # once per cache line of codes: the same row `ahead` bytes on, into L2
                emit_prefetch_l2(builder, byte_ptr(p, builder.add(builder.mul(g, intp(per)), ahead)))
        # each row's decoded vectors of this block: 32 / lanes of them
        decoded = []
        for p, s_row in zip(w_rows, s_rows, strict=True):
            if per == BLOCK:
                d = halves_at(s_row, g)[0]
                vecs = []
                for sub in range(BLOCK // lanes):
                    at = builder.add(builder.mul(g, intp(per)), intp(sub * lanes))
                    q = builder.load(byte_ptr(p, at), typ=ir.VectorType(_I8, lanes), align=1)
                    vecs.append(builder.fmul(builder.sitofp(q, vf), d, flags=_CONTRACT))
            else:
                d, m = halves_at(s_row, builder.mul(g, intp(2)))
                v16 = ir.VectorType(_I8, per)
                b = builder.load(byte_ptr(p, builder.mul(g, intp(per))), typ=v16, align=1)
                lo = builder.and_(b, ir.Constant(v16, [15] * per))
                hi = builder.lshr(b, ir.Constant(v16, [4] * per))
                if lanes == BLOCK:
                    order = ir.Constant(ir.VectorType(_I32, BLOCK), list(range(BLOCK)))
                    parts = [builder.shuffle_vector(lo, hi, order)]
                else:  # lanes == 16: the low nibbles, then the high
                    parts = [lo, hi]
                vecs = [
                    builder.fadd(builder.fmul(builder.uitofp(q, vf), d, flags=_CONTRACT), m, flags=_CONTRACT)
                    for q in parts
                ]
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
    return context.make_tuple(builder, signature.return_type, sums)
