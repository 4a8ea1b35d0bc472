"""Scaled dot products of a few weight rows with a few float32 vectors, in explicit LLVM vectors.

`row_dots(w, sc, bk, rows, x, toks, ahead)` returns, for every row r of the tuple `rows` and token t of
`toks` (r-major), sum over scale groups g of (dot(decode(w[r, g*bk : (g+1)*bk]), x[t, same]) * fold) *
sc[r, g] — one linear's output elements, with the weight decode of hy_edge_ops.half.as_f32 and its
power of two (`acc_scale`) put back.

Why not let the compiler vectorise a Python loop: an auto-vectorised reduction is summed in whatever
order the vectoriser picks (vector width, how many accumulators), and it picks differently for one
row x one token than for two rows x four tokens, where sixteen accumulators would not fit in registers.
Here the order is written down once and is the same for every number of rows and tokens: each
(row, token) pair sums its group in one vector of LANES float32 lanes, lane i taking elements i,
i + LANES, ... in turn (multiply and add, fused where the CPU has FMA), the tail of a group zero-padded
to a full vector; then the lanes are added pairwise, halves first (a fixed tree); then the groups in
order. So a token's outputs are bit-identical whether it is computed alone (decode), beside three
others (batched decode), or in a block of two rows: the batched decode is batch-invariant by
construction, and the kernel that runs it may block rows and tokens for speed.

LANES is 32 where the CPU has AVX-512 (two 512-bit registers per accumulator; one row x one token keeps
two FMA chains in flight, two rows x four tokens use 16 of its 32 registers) and 16 elsewhere (AVX2:
two 256-bit registers, NEON: four 128-bit ones; four tokens' accumulators then fit in 16 or 32
registers). BATCH_ROWS is how many rows the batched kernel blocks (2 with AVX-512, else 1).
Measured on Zen 4, 2 threads, 48 matrices 3584 x 1024 E4M3 from memory: one token 5.6-6.1 ms against
5.9-6.3 ms for the auto-vectorised loop; four tokens 8.5-9.3 ms in 2-row blocks against 10.5-14.6 ms
one row at a time.

Each row is prefetched as it is read: once per 64-byte line, the line `ahead` bytes further on goes to
L2 (hy_edge_ops.prefetch: hardware prefetchers stop at 4 KiB pages). A steady stream, where a whole
row requested before reading it came in bursts that long rows overflowed: 48 matrices 1024 x 3584,
one token 8.1 -> 5.9 ms, four tokens 13.2 -> 9.5 ms; 3584 x 1024: 5.6 -> 5.4 and 9.3 -> 8.1 ms.
"""

from __future__ import annotations

from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.core.errors import TypingError
from numba.extending import intrinsic

from .half import FP8_BITS, FP8_FOLD
from .prefetch import emit_prefetch_l2


def _compiles_for_avx512() -> bool:
    # the CPU numba compiles for: the host, or NUMBA_CPU_NAME / NUMBA_CPU_FEATURES (portable caches)
    if config.CPU_FEATURES is not None:
        return "+avx512f" in config.CPU_FEATURES.split(",")
    if config.CPU_NAME is not None:
        return False  # a named CPU without a feature list: assume the narrower registers
    return bool(llvm.get_host_cpu_features().get("avx512f", False))


_AVX512 = _compiles_for_avx512()
LANES = 32 if _AVX512 else 16
BATCH_ROWS = 2 if _AVX512 else 1
_CONTRACT = ("contract",)  # a multiply feeding an add may become one FMA: the same in every kernel
_LINE = 64
_F32 = ir.FloatType()
_I32 = ir.IntType(32)
# E4M3 viewed as int8, E5M2 as uint8 (sign-extended through int8): shift, then keep sign, exponent and
# mantissa (hy_edge_ops.half.as_f32); the fold puts the power of two back on each group's sum
_FP8 = {types.int8: (*FP8_BITS["e4m3"], FP8_FOLD["e4m3"]), types.uint8: (*FP8_BITS["e5m2"], FP8_FOLD["e5m2"])}
_STORED = (types.int8, types.uint8, types.uint16, types.float32)


def _splat(value, ty, n=LANES):
    return ir.Constant(ir.VectorType(ty, n), [value] * n)


def _decode(builder, codes, dtype):
    # <LANES x stored> -> <LANES x float>
    vf = ir.VectorType(_F32, LANES)
    if dtype in _FP8:
        shift, mask, _ = _FP8[dtype]
        bits = builder.shl(builder.sext(codes, ir.VectorType(_I32, LANES)), _splat(shift, _I32))
        return builder.bitcast(builder.and_(bits, _splat(mask, _I32)), vf)
    if dtype == types.uint16:
        return builder.fpext(builder.bitcast(codes, ir.VectorType(ir.HalfType(), LANES)), vf)
    return codes


def _lane_sum(builder, v):
    # pairwise, halves first: (v[0..n/2) + v[n/2..n)) and again, to one lane
    width = LANES
    while width > 1:
        half = width // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half, width))))
        v = builder.fadd(lo, hi)
        width = half
    return builder.extract_element(v, _I32(0))


def _load(builder, base, k, vty, align):
    # the vector of `vty` at element k of `base`
    return builder.load(builder.bitcast(builder.gep(base, [k]), vty.as_pointer()), align=align)


def _fma(builder, acc, a, b):
    return builder.fadd(acc, builder.fmul(a, b, flags=_CONTRACT), flags=_CONTRACT)


@intrinsic
def row_dots(typingctx, w, sc, bk, rows, x, toks, ahead):
    """w (N, K) stored codes, sc f32 (N, G), bk columns per scale, rows: UniTuple of row indices,
    x f32 (T, K), toks: UniTuple of token indices, ahead: prefetch distance in bytes ->
    UniTuple(float32, R * T), row-major. Indices are not checked: the kernels clamp them."""
    ok = (
        isinstance(w, types.Array) and w.ndim == 2 and w.layout == "C" and w.dtype in _STORED
        and isinstance(x, types.Array) and x.ndim == 2 and x.layout == "C" and x.dtype == types.float32
        and isinstance(sc, types.Array) and sc.ndim == 2 and sc.layout == "C" and sc.dtype == types.float32
        and isinstance(rows, types.UniTuple) and isinstance(toks, types.UniTuple)
    )  # fmt: skip
    if not ok:
        raise TypingError("row_dots: w (N, K) int8/uint8/uint16/float32, sc and x float32 2-D C arrays, tuples")
    n_r, n_t = rows.count, toks.count
    sig = types.UniTuple(types.float32, n_r * n_t)(w, sc, types.intp, rows, x, toks, types.intp)

    def codegen(context, builder, signature, args):
        wty, scty, _, _, xty, _, _ = signature.args
        wa = context.make_array(wty)(context, builder, args[0])
        sa = context.make_array(scty)(context, builder, args[1])
        xa = context.make_array(xty)(context, builder, args[4])
        bk_, intp = args[2], args[2].type
        stored = context.get_data_type(wty.dtype)
        item = context.get_abi_sizeof(stored)
        ahead_elems = builder.sdiv(args[6], intp(item))
        every = max(1, _LINE // (LANES * item))  # vector steps per 64-byte line
        row_ix = cgutils.unpack_tuple(builder, args[3], n_r)
        tok_ix = cgutils.unpack_tuple(builder, args[5], n_t)
        k_dim = builder.extract_value(wa.shape, 1)
        n_groups = builder.extract_value(sa.shape, 1)
        vw, vf = ir.VectorType(stored, LANES), ir.VectorType(_F32, LANES)
        zero_f, zero_w = ir.Constant(vf, None), ir.Constant(vw, None)
        fold = _F32(_FP8[wty.dtype][2] if wty.dtype in _FP8 else 1.0)

        w_rows = [builder.gep(wa.data, [builder.mul(r, k_dim)]) for r in row_ix]
        x_stride = builder.extract_value(xa.shape, 1)
        x_rows = [builder.gep(xa.data, [builder.mul(t, x_stride)]) for t in tok_ix]
        s_rows = [builder.gep(sa.data, [builder.mul(r, n_groups)]) for r in row_ix]
        totals = [cgutils.alloca_once_value(builder, _F32(0.0)) for _ in range(n_r * n_t)]
        accs = [cgutils.alloca_once(builder, vf) for _ in range(n_r * n_t)]
        w_tail = [cgutils.alloca_once(builder, vw) for _ in range(n_r)]
        x_tail = [cgutils.alloca_once(builder, vf) for _ in range(n_t)]

        def accumulate(w_vecs, x_vecs):
            for i in range(n_r):
                for j in range(n_t):
                    acc = accs[i * n_t + j]
                    builder.store(_fma(builder, builder.load(acc), w_vecs[i], x_vecs[j]), acc)

        with cgutils.for_range(builder, n_groups, intp=intp) as group:
            k0 = builder.mul(group.index, bk_)
            k1 = builder.add(k0, bk_)
            n = builder.sub(builder.select(builder.icmp_signed("<", k_dim, k1), k_dim, k1), k0)  # columns
            n_full = builder.sdiv(n, intp(LANES))
            for acc in accs:
                builder.store(zero_f, acc)
            with cgutils.for_range(builder, n_full, intp=intp) as step:
                k = builder.add(k0, builder.mul(step.index, intp(LANES)))
                with builder.if_then(builder.icmp_signed("==", builder.srem(step.index, intp(every)), intp(0))):
                    for p in w_rows:  # once per cache line: the same row `ahead` bytes on, into L2
                        emit_prefetch_l2(builder, builder.gep(p, [builder.add(k, ahead_elems)]))
                w_vecs = [_decode(builder, _load(builder, p, k, vw, 1), wty.dtype) for p in w_rows]
                accumulate(w_vecs, [_load(builder, p, k, vf, 4) for p in x_rows])
            # the group's last n % LANES elements, zero-padded to one vector (0 * 0 adds nothing)
            done = builder.mul(n_full, intp(LANES))
            left = builder.sub(n, done)
            with builder.if_then(builder.icmp_signed(">", left, intp(0))):
                for p in w_tail:
                    builder.store(zero_w, p)
                for p in x_tail:
                    builder.store(zero_f, p)
                with cgutils.for_range(builder, left, intp=intp) as lane:
                    k = builder.add(k0, builder.add(done, lane.index))
                    at = builder.trunc(lane.index, _I32)
                    for src, dst in zip((*w_rows, *x_rows), (*w_tail, *x_tail), strict=True):
                        builder.store(
                            builder.insert_element(builder.load(dst), builder.load(builder.gep(src, [k])), at), dst
                        )
                accumulate(
                    [_decode(builder, builder.load(p), wty.dtype) for p in w_tail], [builder.load(p) for p in x_tail]
                )
            for i in range(n_r):
                scale = builder.load(builder.gep(s_rows[i], [group.index]))
                for j in range(n_t):
                    s = builder.fmul(_lane_sum(builder, builder.load(accs[i * n_t + j])), fold)
                    t = totals[i * n_t + j]
                    builder.store(
                        builder.fadd(builder.load(t), builder.fmul(s, scale, flags=_CONTRACT), flags=_CONTRACT), t
                    )
        return context.make_tuple(builder, signature.return_type, [builder.load(t) for t in totals])

    return sig, codegen
