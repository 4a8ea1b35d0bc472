"""Stored numbers to float32 inside Numba kernels, as few vector instructions as the CPU allows.

- IEEE half: exact half→float32 widening and float32→half rounding (round-to-nearest-even) as single
  LLVM casts, one instruction per vector (x86 F16C `vcvtph2ps` / `vcvtps2ph`, ARM `fcvtl` / `fcvtn`).
- FP8 codes (`as_f32`): integer shifts into a float32 bit pattern (`bits_to_f32`, a bitcast).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload


@intrinsic
def _half_bits_to_f32(typingctx, bits):
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width != 16:
            v = builder.trunc(v, ir.IntType(16))
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_half_bits(typingctx, value):
    sig = types.uint16(value)

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type != ir.FloatType():
            v = builder.fptrunc(v, ir.FloatType()) if isinstance(v.type, ir.DoubleType) else v
        return builder.bitcast(builder.fptrunc(v, ir.HalfType()), ir.IntType(16))

    return sig, codegen


@njit(cache=True, inline="always")
def half_to_f32(bits):
    """float32 value of a half bit pattern (uint16)."""
    return _half_bits_to_f32(np.uint16(bits))


@njit(cache=True, inline="always")
def f32_to_half(value):
    """Half bit pattern (uint16) of a float32, rounded to nearest even (overflow gives inf)."""
    return _f32_to_half_bits(np.float32(value))


def as_f32(c):
    """A stored element as float32: an E4M3 code viewed as int8 (its value times 2**-120), an E5M2 code
    as uint8 (times 2**-112), uint16 half bits, or a float. Compiled per dtype (an overload), so each
    storage gets its own vector code. `acc_scale` and the scales (FP8_FOLD) put the power of two back."""


# FP8 → float32 without a conversion instruction: sign-extended to 32 bits and shifted so that exponent
# and mantissa land where a float32 keeps them, the sign copies above the exponent cleared: the float32
# is the code's value times 2**-120 (E4M3) or 2**-112 (E5M2), subnormal codes included (as float32
# subnormals, which these CPUs read at full speed). 3 integer vector ops per 16 weights (x86: vpmovsxbd,
# vpslld, vpandd); the half route (shift into a half, then vcvtph2ps) ran at 15-19 against 22-25 GB/s per
# core (bench/bench_ops.py). The power of two comes back in two halves: FP8_FOLD on each dot product's sum
# before its scale (`acc_scale`), FP8_FOLD folded into the scales, so no scale overflows.
FP8_FOLD = {"e4m3": 2.0**60, "e5m2": 2.0**56}  # 2**120 = 2**60 * 2**60, 2**112 = 2**56 * 2**56
# (shift, mask) of the sign-extended code: sign, then 4 exponent and 3 mantissa bits (E4M3) or 5 and 2
# (E5M2); hy_edge_ops.dot emits the same two ops on whole vectors
FP8_BITS = {"e4m3": (20, 0x87F00000 - (1 << 32)), "e5m2": (21, 0x8FE00000 - (1 << 32))}
_E4M3_SHIFT, _E4M3_MASK = FP8_BITS["e4m3"][0], np.int32(FP8_BITS["e4m3"][1])
_E5M2_SHIFT, _E5M2_MASK = FP8_BITS["e5m2"][0], np.int32(FP8_BITS["e5m2"][1])


@overload(as_f32, inline="always")
def _as_f32_impl(c):
    if c == types.int8:  # E4M3 viewed as int8

        def e4m3(c):
            return _bits_to_f32((np.int32(c) << _E4M3_SHIFT) & _E4M3_MASK)

        return e4m3
    if c == types.uint8:  # E5M2

        def e5m2(c):
            return _bits_to_f32((np.int32(np.int8(c)) << _E5M2_SHIFT) & _E5M2_MASK)

        return e5m2
    if c == types.uint16:
        return lambda c: _half_bits_to_f32(c)
    if isinstance(c, types.Float):
        return lambda c: np.float32(c)
    return None


def acc_scale(w):
    """The power of two a dot product over `w`'s decoded elements is multiplied by before its scale."""


@overload(acc_scale, inline="always")
def _acc_scale_impl(w):
    dtype = w.dtype if isinstance(w, types.Array) else w
    value = {types.int8: FP8_FOLD["e4m3"], types.uint8: FP8_FOLD["e5m2"]}.get(dtype, 1.0)
    return lambda w: np.float32(value)


def put(a, i, value):
    """a[i] = value, rounded to half bits when `a` is a uint16 (FP16) array."""


@overload(put, inline="always")
def _put_impl(a, i, value):
    if isinstance(a, types.Array) and a.dtype == types.uint16:

        def put_half(a, i, value):
            a[i] = _f32_to_half_bits(np.float32(value))

        return put_half

    def put_plain(a, i, value):
        a[i] = value

    return put_plain


@intrinsic
def _bits_to_f32(typingctx, bits):
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width != 32:
            v = builder.trunc(v, ir.IntType(32)) if v.type.width > 32 else builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return sig, codegen


@njit(cache=True, inline="always")
def bits_to_f32(bits):
    """The float32 whose IEEE bit pattern is the low 32 bits of the integer `bits` (a vectorisable cast)."""
    return _bits_to_f32(np.int32(bits))
