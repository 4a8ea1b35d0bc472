"""exp in float32 that vectorises: a loop calling `expf` compiles to vector instructions, where np.exp
inside a Numba kernel is one libm call per element (~5 ns; the softmax of a 512-token prefill and
SiLU spent as long in it as in their arithmetic).

exp(x) = 2**n * exp(r), n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite; |r| <= ln 2 / 2),
exp(r) by Cephes' polynomial, 2**n built as float bits. Within 1 ulp of the exact result on
[-87.3, 88.7] (tests/test_ops_expf.py). x is clamped to that range: below, the result is ~1.2e-38 (what
a softmax or SiLU treats as 0), above, ~3.4e38 (finite, never inf); NaN stays NaN.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .half import bits_to_f32

_LO, _HI = np.float32(-87.33654), np.float32(88.72283)  # 2**-126, 2**128 (less half an ulp)
_LOG2E = np.float32(1.44269504088896341)
_C1, _C2 = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = C1 + C2, C1 exact in 9 bits
_P = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                   1.6666665459e-1, 5.0000001201e-1))  # fmt: skip


@njit(cache=True, fastmath={"contract"}, inline="always")
def expf(x):
    """e**x for a float32 x (see the module's note on range and accuracy)."""
    if x < _LO:
        x = _LO
    if x > _HI:
        x = _HI
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _C1 - n * _C2
    p = _P[0]
    p = p * r + _P[1]
    p = p * r + _P[2]
    p = p * r + _P[3]
    p = p * r + _P[4]
    p = p * r + _P[5]
    p = p * r * r + r + np.float32(1.0)
    e = np.int32(n)
    # 2**n as float bits; n = 128 (x just under _HI) is split into 2**127 * 2 to stay finite
    big = e > 127
    e = e - np.int32(big)
    return p * bits_to_f32((e + np.int32(127)) << 23) * (np.float32(2.0) if big else np.float32(1.0))
