"""The prefill GEMM: out (T, N) = x (T, K) @ dequant(W)^T for a chunk of one sequence's tokens.

Prefill is arithmetic: each weight is used T times, so it is dequantized once per call, not once per
token block. A task of RT rows dequantizes them into a float32 panel (the code's value times its scale,
rounded once, as DequantizeLinear gives it), then multiplies the panel with every token through a
register-blocked microkernel (`_tile`): NR rows x TV vectors of VL tokens of accumulators, each step
along K loading TV vectors of tokens and broadcasting NR weights, NR * TV fused multiply-adds. The
tokens are packed once per call as x^T in vectors of VL (`_pack`), zero-padded, so that a step's
vectors are contiguous. Per vector ISA (hy_edge_ops.isa), the block that fills the registers without
spilling (accumulators + token vectors + one broadcast):

| ISA     | registers   | VL | NR x TV | accumulators | FMAs per load |
|---------|-------------|----|---------|--------------|---------------|
| avx512  | 32 x 512    | 16 | 12 x 2  | 24           | 24 / 14       |
| avx2    | 16 x 256    |  8 |  6 x 2  | 12           | 12 / 8        |
| neon    | 32 x 128    |  4 |  6 x 4  | 24           | 24 / 10       |

The sums run along K in one accumulator per (row, token) lane, in order: a prefill's outputs do not
depend on how many threads ran it, nor on the other tokens of the chunk. They differ in rounding from the
one-token kernels' (hy_edge_ops.dot), which a decode does not need to match.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from .blockq import cols, decode_row, prefill_input
from .dot import _STORED, LANES, _decode, _splat_value, load_vector, scales_on_weights, store_vector
from .half import acc_scale as _acc
from .half import as_f32 as _weight
from .isa import ISA

VL, NR, TV = {"avx512": (16, 12, 2), "avx2": (8, 6, 2), "neon": (4, 6, 4), "generic": (4, 6, 4)}[ISA]
PANELS = 4  # NR-row panels per task: the rows a task dequantizes and reuses for every token tile
RT = NR * PANELS
KC = 4096 // (TV * VL)  # columns per block: a tile's tokens over them are 16 KB, held in L1
_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_CONTRACT = ("contract",)


def _emit_tile(builder, context, sig, args, tv):
    # accumulators (NR rows x tv vectors of tokens) from `part` (or zeros at k0 == 0), + wp[r, k] * x[t, k]
    # for k in k0..k1, then back to `part` (or, at k1 == K, to out[t, n] where both exist)
    wty, _, xty, _, oty, _, _, _, _, pty = sig.args
    wp = context.make_array(wty)(context, builder, args[0])
    xp = context.make_array(xty)(context, builder, args[2])
    out = context.make_array(oty)(context, builder, args[4])
    part = context.make_array(pty)(context, builder, args[9])
    r0, j0, n0, t0, k0, k1 = args[1], args[3], args[5], args[6], args[7], args[8]
    intp = r0.type
    k_dim = builder.extract_value(wp.shape, 1)
    n_tok, n_out = builder.extract_value(out.shape, 0), builder.extract_value(out.shape, 1)
    vf = ir.VectorType(_F32, VL)
    splat_mask = ir.Constant(ir.VectorType(_I32, VL), [0] * VL)
    w_rows = [builder.gep(wp.data, [builder.mul(builder.add(r0, intp(r)), k_dim)]) for r in range(NR)]
    x_rows = [
        builder.gep(xp.data, [builder.mul(builder.add(j0, intp(v)), builder.mul(k_dim, intp(VL)))]) for v in range(tv)
    ]
    t_pad = builder.extract_value(part.shape, 1)

    def part_at(r, v):  # the element index of part[r0 + r, (j0 + v) * VL]
        return builder.add(
            builder.mul(builder.add(r0, intp(r)), t_pad), builder.mul(builder.add(j0, intp(v)), intp(VL))
        )

    part_ix = [[part_at(r, v) for v in range(tv)] for r in range(NR)]
    accs = [[cgutils.alloca_once(builder, vf) for _ in range(tv)] for _ in range(NR)]
    with builder.if_else(builder.icmp_signed("==", k0, intp(0))) as (first, later):
        with first:
            for row in accs:
                for acc in row:
                    builder.store(ir.Constant(vf, None), acc)
        with later:
            for row, ixs in zip(accs, part_ix, strict=True):
                for acc, ix in zip(row, ixs, strict=True):
                    builder.store(load_vector(builder, part.data, ix, vf, 4), acc)
    with cgutils.for_range(builder, builder.sub(k1, k0), intp=intp) as loop:
        k = builder.add(k0, loop.index)
        xs = [load_vector(builder, p, builder.mul(k, intp(VL)), vf, 4) for p in x_rows]
        for r in range(NR):
            s = builder.load(builder.gep(w_rows[r], [k]))
            b = builder.shuffle_vector(builder.insert_element(ir.Constant(vf, ir.Undefined), s, _I32(0)),
                                       ir.Constant(vf, ir.Undefined), splat_mask)  # fmt: skip
            for v in range(tv):
                acc = accs[r][v]
                prod = builder.fmul(b, xs[v], flags=_CONTRACT)
                builder.store(builder.fadd(builder.load(acc), prod, flags=_CONTRACT), acc)
    with builder.if_else(builder.icmp_signed("<", k1, k_dim)) as (partial, done):
        with partial:
            for row, ixs in zip(accs, part_ix, strict=True):
                for acc, ix in zip(row, ixs, strict=True):
                    store_vector(builder, builder.load(acc), part.data, ix, 4)
        with done:  # out[t, n] for the tile's rows and tokens that exist
            t_stride, n_stride = (builder.extract_value(out.strides, i) for i in (0, 1))  # bytes
            for r in range(NR):
                n = builder.add(n0, intp(r))
                with builder.if_then(builder.icmp_signed("<", n, n_out)):
                    col = builder.mul(n, n_stride)
                    for v in range(tv):
                        acc = builder.load(accs[r][v])
                        for lane in range(VL):
                            t = builder.add(t0, intp(v * VL + lane))
                            with builder.if_then(builder.icmp_signed("<", t, n_tok)):
                                at = builder.add(col, builder.mul(t, t_stride))  # a byte offset
                                ptr = builder.gep(out.data, [at], source_etype=ir.IntType(8))
                                builder.store(builder.extract_element(acc, _I32(lane)), ptr)
    return context.get_dummy_value()


def _tile_typing(wp, xp, out, part):
    ok = (
        isinstance(wp, types.Array) and wp.ndim == 2 and wp.layout == "C" and wp.dtype == types.float32
        and isinstance(xp, types.Array) and xp.ndim == 3 and xp.layout == "C" and xp.dtype == types.float32
        and isinstance(out, types.Array) and out.ndim == 2 and out.dtype == types.float32
        and isinstance(part, types.Array) and part.ndim == 2 and part.layout == "C" and part.dtype == types.float32
    )  # fmt: skip
    if not ok:
        raise TypingError("tile: wp f32 (R, K), xp f32 (J, K, VL), out f32 (T, N), part f32 (R, J * VL)")
    i = types.intp
    return types.void(wp, i, xp, i, out, i, i, i, i, part)


@intrinsic
def _tile(typingctx, wp, r0, xp, j0, out, n0, t0, k0, k1, part):
    """Rows r0 .. r0 + NR of the panel wp (rows n0 .. of out) x the packed tokens of vectors j0 .. j0 + TV
    (tokens t0 ..), over columns k0 .. k1; partial sums kept in `part` between column blocks."""
    sig = _tile_typing(wp, xp, out, part)
    return sig, lambda context, builder, sig, args: _emit_tile(builder, context, sig, args, TV)


@intrinsic
def _tile1(typingctx, wp, r0, xp, j0, out, n0, t0, k0, k1, part):
    """As _tile for one vector of VL tokens: the tail of a chunk."""
    sig = _tile_typing(wp, xp, out, part)
    return sig, lambda context, builder, sig, args: _emit_tile(builder, context, sig, args, 1)


@njit(cache=True)
def _pack(x, xp):
    # xp[j, k, l] = x[j * VL + l, k], zero past the last token. Serial: ~0.05 ms for 128 x 1024, less
    # than the wake-up of a parallel region on a busy machine
    n_tok, k_dim = x.shape
    for j in range(xp.shape[0]):
        for lane in range(VL):
            t = j * VL + lane
            if t < n_tok:
                row = x[t]
                for k in range(k_dim):
                    xp[j, k, lane] = row[k]
            else:
                for k in range(k_dim):
                    xp[j, k, lane] = 0.0


@intrinsic
def _dequantize_vectors(typingctx, w, n, k0, k1, unfold, s, wp, r):
    """wp[r, k0:k] = (decode(w[n, k0:k]) * unfold) * s for the whole vectors of hy_edge_ops.dot.LANES in
    k0..k1 (unfold: the power of two the scales do not hold); returns k, where they end. In explicit
    vectors: numba's own loop became gathers."""
    ok = (
        isinstance(w, types.Array) and w.ndim == 2 and w.layout == "C" and w.dtype in _STORED
        and isinstance(wp, types.Array) and wp.ndim == 2 and wp.layout == "C" and wp.dtype == types.float32
    )  # fmt: skip
    if not ok:
        raise TypingError("_dequantize_vectors: w (N, K) int8/uint8/uint16/float32, wp f32 (R, K)")
    sig = types.intp(w, types.intp, types.intp, types.intp, types.float32, types.float32, wp, types.intp)

    def codegen(context, builder, signature, args):
        wty = signature.args[0]
        wa = context.make_array(wty)(context, builder, args[0])
        pa = context.make_array(signature.args[6])(context, builder, args[6])
        n, k0, k1, unfold, scale, r = args[1], args[2], args[3], args[4], args[5], args[7]
        intp = n.type
        src = builder.gep(wa.data, [builder.mul(n, builder.extract_value(wa.shape, 1))])
        dst = builder.gep(pa.data, [builder.mul(r, builder.extract_value(pa.shape, 1))])
        vw = ir.VectorType(context.get_data_type(wty.dtype), LANES)
        vf = ir.VectorType(_F32, LANES)
        splat, unfolds = _splat_value(builder, scale, vf), _splat_value(builder, unfold, vf)
        n_full = builder.sdiv(builder.sub(k1, k0), intp(LANES))
        with cgutils.for_range(builder, n_full, intp=intp) as step:
            k = builder.add(k0, builder.mul(step.index, intp(LANES)))
            v = _decode(builder, load_vector(builder, src, k, vw, 1), wty.dtype)
            v = builder.fmul(v, unfolds)  # exact: a power of two
            store_vector(builder, builder.fmul(v, splat), dst, k, 4)
        return builder.add(k0, builder.mul(n_full, intp(LANES)))

    return sig, codegen


@njit(cache=True, inline="always")
def _dequantize_rows(w, sc, bk, n0, wp):
    # wp[r] = row n0 + r of w, dequantized (zeros past the last row)
    n_rows, k_dim = w.shape
    # scales of whole-vector groups hold the decode's whole power of two (hy_edge_ops.linear.prepare)
    unfold = np.float32(1.0) if scales_on_weights(k_dim, sc.shape[1], bk) else _acc(w)
    for r in range(wp.shape[0]):
        n = n0 + r
        if n >= n_rows:
            wp[r, :] = 0.0
            continue
        for g in range(sc.shape[1]):
            s = sc[n, g]
            k1 = min(k_dim, (g + 1) * bk)
            for k in range(_dequantize_vectors(w, n, g * bk, k1, unfold, s, wp, r), k1):
                wp[r, k] = (_weight(w[n, k]) * unfold) * s


def _dequantize_panel(w, sc, bk, n0, wp):
    """wp[r] = row n0 + r of w dequantized, for any weight the kernels take (2-D, or block codes)."""


@overload(_dequantize_panel, inline="always")
def _dequantize_panel_impl(w, sc, bk, n0, wp):
    if isinstance(w, types.Array) and w.ndim == 3:  # hy_edge_ops.blockq codes; sc: its packed half scales

        def blocks(w, sc, bk, n0, wp):
            halves = sc.view(np.uint16)
            for r in range(wp.shape[0]):
                n = n0 + r
                if n >= w.shape[0]:
                    wp[r, :] = 0.0
                else:
                    decode_row(w[n], halves[n], wp[r])

        return blocks
    return lambda w, sc, bk, n0, wp: _dequantize_rows(w, sc, bk, n0, wp)


@njit(cache=True)
def _task(xp, n_tok, w, sc, bk, n0, out):
    # rows n0 .. n0 + RT of w (those that exist) x every token: out[t, n0 ..]. Compiled once per weight
    # type, not inlined into each tuple size of mm_prefill (a third of the first run's compile time)
    k_dim = cols(w)
    n_j = xp.shape[0]
    # per task: numba.get_num_threads() in compiled code cannot be cached
    wp = np.empty((RT, k_dim), np.float32)  # the task's rows, dequantized
    part = np.empty((RT, n_j * VL), np.float32)  # sums over the column blocks done so far
    _dequantize_panel(w, sc, bk, n0, wp)
    for k0 in range(0, k_dim, KC):
        k1 = min(k_dim, k0 + KC)
        t0 = 0
        while t0 < n_tok:  # a tile's KC columns of tokens stay in L1 for the task's panels
            if n_tok - t0 > (TV - 1) * VL:  # a full-width tile (the last may be partly padding)
                for p in range(PANELS):
                    _tile(wp, p * NR, xp, t0 // VL, out, n0 + p * NR, t0, k0, k1, part)
                t0 += TV * VL
            else:
                for p in range(PANELS):
                    _tile1(wp, p * NR, xp, t0 // VL, out, n0 + p * NR, t0, k0, k1, part)
                t0 += VL


@njit(cache=True, nogil=True, parallel=True)
def mm_prefill(x, ws, scs, outs, bks, starts):
    """outs[m] (T, N_m) = x (T, K) @ dequant(ws[m])^T for a tuple of up to 3 weights sharing x.
    starts: cumulative RT-row task counts per weight."""
    n_tok, k_dim = x.shape
    xp = np.empty(((n_tok + VL - 1) // VL, k_dim, VL), np.float32)
    _pack(prefill_input(x, ws[0]), xp)  # weights that take integer inputs: x rounded as the other kernels do
    for task in prange(starts[-1]):
        m = 0
        while task >= starts[m + 1]:
            m += 1
        _task(xp, n_tok, ws[m], scs[m], bks[m], (task - starts[m]) * RT, outs[m])


def task_starts(row_counts) -> np.ndarray:
    """Cumulative RT-row task counts for `mm_prefill` of weights with these row counts."""
    return np.cumsum([0, *((n + RT - 1) // RT for n in row_counts)]).astype(np.int64)
