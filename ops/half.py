"""IEEE half precision inside Numba kernels: exact half→float32 widening and float32→half rounding
(round-to-nearest-even) as single LLVM casts, which the CPU runs as one instruction per vector (x86 F16C
`vcvtph2ps` / `vcvtps2ph`, ARM `fcvtl` / `fcvtn`)."""

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
    """A stored element as float32: int8 E4M3 code (times 2**-8), uint8 E5M2 code, uint16 half bits,
    or a float. Compiled per dtype (an overload), so each storage gets its own vector code."""


@overload(as_f32, inline="always")
def _as_f32_impl(c):
    if c == types.int8:  # E4M3, viewed as int8: sign-extended and shifted by 7, the sign lands in bit 15
        # (and a copy in bit 14, cleared); exponent and mantissa land where a half keeps them, so the
        # half is the E4M3 value times 2**-8, subnormals included: 3 vector ops per 16 weights

        def e4m3(c):
            return _half_bits_to_f32(np.uint16((np.int16(c) << 7) & 0xBFFF))

        return e4m3
    if c == types.uint8:  # E5M2: the high byte of a half
        return lambda c: _half_bits_to_f32(np.uint16(np.uint16(c) << 8))
    if c == types.uint16:
        return lambda c: _half_bits_to_f32(c)
    if isinstance(c, types.Float):
        return lambda c: np.float32(c)
    return None


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
