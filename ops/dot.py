"""Scaled dot products of a few weight rows with a few float32 vectors, in explicit LLVM vectors.

`row_dots(w, sc, bk, rows, x, toks, ahead)` returns, for every row r of the tuple `rows` and token t of
`toks` (r-major), one linear's output element: the dot product of the decoded row w[r] with x[t], its
scales sc[r, g] (column k uses group g = k // bk) and the decode's power of two (`acc_scale`) applied.

Why not let the compiler vectorise a Python loop: an auto-vectorised reduction is summed in whatever
order the vectoriser picks (vector width, how many accumulators), and it picks differently for one
row x one token than for two rows x four tokens, where sixteen accumulators would not fit in registers.
Here the order is written down once and is the same for every number of rows and tokens: each
(row, token) pair sums in one vector of LANES float32 lanes, lane i taking elements i, i + LANES, ...
in turn (multiply and add, fused where the CPU has FMA), the tail zero-padded to a full vector; then
the lanes are added pairwise, halves first (a fixed tree). So a token's outputs are bit-identical
whether it is computed alone (decode), beside others (batched decode), or in a block of two rows: the
batched decode is batch-invariant by construction, and the kernel that runs it may block rows and
tokens for speed. Two ways to apply the scales, chosen per weight from its groups:
- per channel (one group), or groups that are not a whole number of vectors: each group is summed
  on its own as above, then scaled, then added to the row's total in group order;
- groups that are whole vectors (`block:32`, `block:64`, ... with bk % LANES == 0 tiling K,
  `scales_on_weights`): each decoded weight vector is multiplied by its group's scale, stored with the
  decode's whole power of two folded in (the code's value times the scale, rounded once, as
  DequantizeLinear gives it), before the multiply-add, and the row is one sum: one multiply per decoded
  vector, shared by every token of the block, and no lane sum per group.

Register blocks per vector ISA (hy_edge_ops.isa: what numba compiles for):
- avx512 (32 x 512 bits): LANES 32 (two registers per accumulator), batched blocks of 2 rows x 4 tokens
  (16 registers of accumulators);
- avx2 (16 x 256 bits): LANES 32 (four registers: one row x one token keeps four FMA chains in flight,
  where two left the one-token GEMV bound by the FMA latency), batched blocks of 1 row x 2 tokens
  (8 registers);
- neon (32 x 128 bits): LANES 16 (four registers), blocks of 1 row x 4 tokens (16 registers).

The FP8 decode: x86 sign-extends each code to 32 bits, shifts and masks (3 vector ops per vector of
weights, hy_edge_ops.half.as_f32). NEON shifts run on one of the Cortex-A76's two vector pipes, so there
the code is widened to 16 bits with its shift in one instruction (`sshll #4`), masked, and interleaved
with zeros into the high halves of 32-bit lanes (`zip1`/`zip2`): the same float32 bits, 8 instead of 14
instructions per 16 weights, 2 of them on the shift pipe. x86 keeps the 32-bit route: AVX2's unpacks
work within 128-bit halves and would reorder the lanes.

Each row is prefetched as it is read: once per 64-byte line, the line `ahead` bytes further on goes to
L2 (hy_edge_ops.prefetch: hardware prefetchers stop at 4 KiB pages). A steady stream, where a whole
row requested before reading it came in bursts that long rows overflowed: 48 matrices 1024 x 3584,
one token 8.1 -> 5.9 ms, four tokens 13.2 -> 9.5 ms; 3584 x 1024: 5.6 -> 5.4 and 9.3 -> 8.1 ms.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from .half import FP8_BITS, FP8_FOLD
from .isa import ISA
from .prefetch import emit_prefetch_l2

LANES = 16 if ISA in ("neon", "generic") else 32
BATCH_ROWS = 2 if ISA == "avx512" else 1  # rows per block of the batched kernel
BATCH_TOKENS = 2 if ISA == "avx2" else 4  # tokens per block of the batched kernel
_WIDEN16 = ISA == "neon"  # the FP8 decode through 16-bit lanes
_CONTRACT = ("contract",)  # a multiply feeding an add may become one FMA: the same in every kernel
_LINE = 64
_F32 = ir.FloatType()
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
# E4M3 viewed as int8, E5M2 as uint8 (sign-extended through int8): shift, then keep sign, exponent and
# mantissa (hy_edge_ops.half.as_f32); the fold puts the power of two back on each sum
_FP8 = {types.int8: (*FP8_BITS["e4m3"], FP8_FOLD["e4m3"]), types.uint8: (*FP8_BITS["e5m2"], FP8_FOLD["e5m2"])}
_STORED = (types.int8, types.uint8, types.uint16, types.float32)
# hy_edge_ops.blockq's codes as 3-D arrays (N, G, ...), typed by their storage (blockq._KERNEL_DTYPE)
_BLOCK_DTYPES = (
    types.int8, types.uint8, types.int16, types.int32, types.uint32,
    types.uint16, types.int64, types.float64, types.float32, types.boolean, types.complex64, types.uint64,
)  # fmt: skip
_INTEGER_INPUTS = (types.complex64, types.uint64)  # blockq's codes whose kernels take inputs rounded to int8


def _splat(value, ty, n=LANES):
    return ir.Constant(ir.VectorType(ty, n), [value] * n)


def signed_byte_floats(builder, codes, shift: int, mask: int):
    """<n x i8> bytes holding a minifloat with its sign in bit 7 and exponent and mantissa below it ->
    <n x float>: sign-extended, shifted by `shift`, masked by `mask` (a signed 32-bit int): the float32 is
    the code's value times a power of two (FP8 here, hy_edge_ops.blockq's FP4 / FP6 codes)."""
    n = codes.type.count
    vf = ir.VectorType(_F32, n)
    if _WIDEN16:  # the high 16 bits of the 32-bit route, then zeros below them
        half = builder.shl(builder.sext(codes, ir.VectorType(_I16, n)), _splat(shift - 16, _I16, n))
        half = builder.and_(half, _splat((mask >> 16) & 0xFFFF, _I16, n))
        zeros = ir.Constant(ir.VectorType(_I16, n), None)
        order = [j for i in range(n) for j in (i, n + i)]  # (0, v0, 0, v1, ...): v_i << 16
        pairs = builder.shuffle_vector(zeros, half, ir.Constant(ir.VectorType(_I32, 2 * n), order))
        return builder.bitcast(pairs, vf)
    bits = builder.shl(builder.sext(codes, ir.VectorType(_I32, n)), _splat(shift, _I32, n))
    return builder.bitcast(builder.and_(bits, _splat(mask, _I32, n)), vf)


def _decode(builder, codes, dtype):
    # <LANES x stored> -> <LANES x float>
    vf = ir.VectorType(_F32, LANES)
    if dtype in _FP8:
        shift, mask, _ = _FP8[dtype]
        return signed_byte_floats(builder, codes, shift, mask)
    if dtype == types.uint16:
        return builder.fpext(builder.bitcast(codes, ir.VectorType(ir.HalfType(), LANES)), vf)
    return codes


def _lane_sum(builder, v):
    # pairwise, halves first: (v[0..n/2) + v[n/2..n)) and again, to one lane
    width = v.type.count
    while width > 1:
        half = width // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half, width))))
        v = builder.fadd(lo, hi)
        width = half
    return builder.extract_element(v, _I32(0))


def load_vector(builder, base, k, vty, align):
    """The vector of `vty` at element k of `base` (the load names its type: no pointer bitcast)."""
    return builder.load(builder.gep(base, [k]), typ=vty, align=align)


def store_vector(builder, value, base, k, align) -> None:
    """`value` (a vector) at element k of `base`. llvmlite's check that a pointer's element type is the
    stored type predates opaque pointers; the store LLVM reads (`store <8 x float> %v, ptr %p`) is valid."""
    st = ir.instructions.StoreInstr(builder.block, value, builder.gep(base, [k]))
    st.align = align
    builder._insert(st)


def _fma(builder, acc, a, b):
    return builder.fadd(acc, builder.fmul(a, b, flags=_CONTRACT), flags=_CONTRACT)


@njit(cache=True)
def scales_on_weights(k_dim: int, n_groups: int, bk: int) -> bool:
    """Whether the kernels multiply each decoded weight vector by its group's scale (groups of whole
    vectors: block:32, block:64, ...) rather than each group's sum. Such scales are stored with the whole
    power of two of the FP8 decode folded in (hy_edge_ops.linear.prepare)."""
    return n_groups > 1 and bk % LANES == 0 and k_dim % bk == 0


def _splat_value(builder, value, vty):
    return builder.shuffle_vector(
        builder.insert_element(ir.Constant(vty, ir.Undefined), value, _I32(0)),
        ir.Constant(vty, ir.Undefined),
        ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count),
    )


@intrinsic
def row_dots(typingctx, w, sc, bk, rows, x, toks, ahead):
    """w (N, K) stored codes, sc f32 (N, G), bk columns per scale, rows: UniTuple of row indices,
    x f32 (T, K), toks: UniTuple of token indices, ahead: prefetch distance in bytes ->
    UniTuple(float32, R * T), row-major. Indices are not checked: the kernels clamp them."""
    blocks = isinstance(w, types.Array) and w.ndim == 3 and w.dtype in _BLOCK_DTYPES  # hy_edge_ops.blockq
    # weights that take their inputs rounded to integers (blockq.quantize_inputs' int8 rows) or float32
    x_dtype = types.int8 if blocks and w.dtype in _INTEGER_INPUTS else types.float32
    ok = (
        isinstance(w, types.Array) and w.layout == "C"
        and ((w.ndim == 2 and w.dtype in _STORED) or blocks)
        and isinstance(x, types.Array) and x.ndim == 2 and x.layout == "C" and x.dtype == x_dtype
        and isinstance(sc, types.Array) and sc.ndim == 2 and sc.layout == "C" and sc.dtype == types.float32
        and isinstance(rows, types.UniTuple) and isinstance(toks, types.UniTuple)
    )  # fmt: skip
    if not ok:
        raise TypingError(
            "row_dots: w (N, K) int8/uint8/uint16/float32 or block codes (N, G, ...) (hy_edge_ops.blockq), "
            "sc and x float32 2-D C arrays (x int8 rows of blockq.quantize_inputs for codes that take them), tuples"
        )
    n_r, n_t = rows.count, toks.count
    sig = types.UniTuple(types.float32, n_r * n_t)(w, sc, types.intp, rows, x, toks, types.intp)
    if blocks:
        from .blockq import emit_block_dots  # blockq's emitter uses this module's vector helpers

        return sig, lambda context, builder, signature, args: emit_block_dots(
            context, builder, signature, args, LANES, _lane_sum, _splat_value
        )

    def codegen(context, builder, signature, args):
        wty, scty, _, _, xty, _, _ = signature.args
        wa = context.make_array(wty)(context, builder, args[0])
        sa = context.make_array(scty)(context, builder, args[1])
        xa = context.make_array(xty)(context, builder, args[4])
        bk_, intp = args[2], args[2].type
        stored = context.get_data_type(wty.dtype)
        item = context.get_abi_sizeof(stored)
        ahead_elems = builder.sdiv(args[6], intp(item))
        line_elems = _LINE // item
        prefetch_every = max(line_elems, LANES)  # a step whose k is a multiple of this prefetches
        lines_per_step = max(1, LANES // line_elems)
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
        totals = [cgutils.alloca_once(builder, _F32) for _ in range(n_r * n_t)]
        accs = [cgutils.alloca_once(builder, vf) for _ in range(n_r * n_t)]
        w_tail = [cgutils.alloca_once(builder, vw) for _ in range(n_r)]
        x_tail = [cgutils.alloca_once(builder, vf) for _ in range(n_t)]

        def accumulate(w_vecs, x_vecs):
            for i in range(n_r):
                for j in range(n_t):
                    acc = accs[i * n_t + j]
                    builder.store(_fma(builder, builder.load(acc), w_vecs[i], x_vecs[j]), acc)

        def steps(k0, n_steps, s_at=None):
            # the products of n_steps whole vectors from column k0; with `s_at(step)`, each row's decoded
            # weights are multiplied by its scale for that step (stored with the decode's power of two)
            with cgutils.for_range(builder, n_steps, intp=intp) as step:
                k = builder.add(k0, builder.mul(step.index, intp(LANES)))
                at_line = builder.icmp_signed("==", builder.srem(k, intp(prefetch_every)), intp(0))
                with builder.if_then(at_line):
                    for p in w_rows:  # once per cache line: the same row `ahead` bytes on, into L2
                        for line in range(lines_per_step):
                            at = builder.add(k, builder.add(ahead_elems, intp(line * line_elems)))
                            emit_prefetch_l2(builder, builder.gep(p, [at]))
                ws = [_decode(builder, load_vector(builder, p, k, vw, 1), wty.dtype) for p in w_rows]
                if s_at is not None:
                    ws = [builder.fmul(v, s) for v, s in zip(ws, s_at(step.index), strict=True)]
                accumulate(ws, [load_vector(builder, p, k, vf, 4) for p in x_rows])

        def tail(k0, n):
            # columns k0 .. k0 + n (n < LANES), zero-padded to one vector (0 * 0 adds nothing)
            with builder.if_then(builder.icmp_signed(">", n, intp(0))):
                for p in w_tail:
                    builder.store(zero_w, p)
                for p in x_tail:
                    builder.store(zero_f, p)
                with cgutils.for_range(builder, n, intp=intp) as lane:
                    k = builder.add(k0, lane.index)
                    at = builder.trunc(lane.index, _I32)
                    for src, dst in zip((*w_rows, *x_rows), (*w_tail, *x_tail), strict=True):
                        builder.store(
                            builder.insert_element(builder.load(dst), builder.load(builder.gep(src, [k])), at), dst
                        )
                accumulate(
                    [_decode(builder, builder.load(p), wty.dtype) for p in w_tail], [builder.load(p) for p in x_tail]
                )

        for t in totals:
            builder.store(_F32(0.0), t)
        on_weights = builder.and_(
            builder.and_(
                builder.icmp_signed(">", n_groups, intp(1)),
                builder.icmp_signed("==", builder.srem(bk_, intp(LANES)), intp(0)),
            ),
            builder.icmp_signed("==", builder.srem(k_dim, bk_), intp(0)),
        )  # scales_on_weights
        with builder.if_else(on_weights) as (vector_scaled, per_group):
            with vector_scaled:  # one sum per (row, token), the scales on the weights, no tail
                for acc in accs:
                    builder.store(zero_f, acc)
                # one flat loop over the row's vectors, the group counted down beside it (a loop per group
                # of one vector ran at half the speed)
                per = builder.sdiv(bk_, intp(LANES))
                group, left = cgutils.alloca_once_value(builder, intp(0)), cgutils.alloca_once_value(builder, per)

                def s_at(step):
                    g = builder.load(group)
                    splats = [_splat_value(builder, builder.load(builder.gep(r, [g])), vf) for r in s_rows]
                    n = builder.sub(builder.load(left), intp(1))
                    wrap = builder.icmp_signed("==", n, intp(0))
                    builder.store(builder.add(g, builder.zext(wrap, intp)), group)
                    builder.store(builder.select(wrap, per, n), left)
                    return splats

                steps(intp(0), builder.sdiv(k_dim, intp(LANES)), s_at)
                for acc, t in zip(accs, totals, strict=True):
                    builder.store(_lane_sum(builder, builder.load(acc)), t)
            with per_group:  # a sum per group, then its scale, the groups added in order
                with cgutils.for_range(builder, n_groups, intp=intp) as group:
                    k0 = builder.mul(group.index, bk_)
                    k1 = builder.add(k0, bk_)
                    n = builder.sub(builder.select(builder.icmp_signed("<", k_dim, k1), k_dim, k1), k0)
                    for acc in accs:
                        builder.store(zero_f, acc)
                    n_full = builder.sdiv(n, intp(LANES))
                    steps(k0, n_full)
                    done = builder.mul(n_full, intp(LANES))
                    tail(builder.add(k0, done), builder.sub(n, done))
                    for i in range(n_r):
                        scale = builder.load(builder.gep(s_rows[i], [group.index]))
                        for j in range(n_t):
                            s = builder.fmul(_lane_sum(builder, builder.load(accs[i * n_t + j])), fold)
                            t = totals[i * n_t + j]
                            builder.store(
                                builder.fadd(builder.load(t), builder.fmul(s, scale, flags=_CONTRACT), flags=_CONTRACT),
                                t,
                            )
        return context.make_tuple(builder, signature.return_type, [builder.load(t) for t in totals])

    return sig, codegen
