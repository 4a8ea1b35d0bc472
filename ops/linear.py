"""Linear layers on HF-layout weights (N, K): y = x @ W^T with the weight decode fused into the dot.

Weights stay in their stored form and are decoded in registers, once per row block:
- FP8 (E4M3 viewed as int8, E5M2 as uint8): sign-extended to 32 bits, shifted and masked into a
  float32 bit pattern that is the code's value times 2**-120 (E5M2: 2**-112), subnormal codes as
  float32 subnormals — 3 integer vector ops per vector of weights on x86, no conversion instruction
  (hy_edge_ops.half.as_f32; NEON widens through 16-bit lanes, hy_edge_ops.dot). Each dot product's sum
  is multiplied by 2**60 (2**56) and the rest of the power of two is folded into the row scales, so
  neither overflows. Any code distribution runs at one
  speed (this CPU reads subnormals at full speed; `subnormals_work` checks the process does not flush
  them to zero).
- FP16: raw half bits, widened by the CPU's half→float instruction (x86 `vcvtph2ps`, ARM `fcvtl`);
  FP32: read as is.
The FP8 NaN codes (E4M3 0x7F/0xFF, E5M2 exponent 31) are not decoded as NaN: the converter never
writes them and the loader refuses files that contain them (`fp8.has_nan_codes`).

Kernels, parallel over output rows:
- `_mv`: one token (decode). One row at a time: each thread reads one sequential stream, which the
  hardware prefetcher follows (4 interleaved rows read half as fast from memory), helped across page
  boundaries by a software prefetch 8 KiB ahead in the row being read (hy_edge_ops.dot). Each weight
  is decoded once and multiplied with x.
- `_mm`: T tokens in groups of BATCH_TOKENS (batched decode, short chunks), BATCH_ROWS rows at a time
  (both per vector ISA, hy_edge_ops.dot). A block's weights are decoded once per group and used for
  its tokens, each x load shared by the block's rows.
  `_mv` and `_mm` sum through hy_edge_ops.dot, whose order is the same for every number of rows and
  tokens: a token's outputs are bit-identical for every T and equal to `_mv`'s, so the batched decode
  step is batch-invariant. Four tokens cost 1.5x one (Zen 4, from memory; 2.4x before the blocks of 2
  rows, which an auto-vectorised loop could not have without changing the one-token sums).
- `gemm.mm_prefill`: a prefill chunk: each row dequantized once into float32, then multiplied with
  every token by a register-blocked microkernel (hy_edge_ops.gemm).
Each takes a tuple of up to 3 weights sharing one input (q/k/v, gate/up) and runs them in one
parallel region. Scales are (N, G): column k of row n uses scales[n, k // bk].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from . import blockq, gemm
from .checks import need_array as _need
from .dot import BATCH_ROWS, BATCH_TOKENS, LANES, row_dots, scales_on_weights
from .fp8 import E4M3, E5M2, block_size
from .half import FP8_FOLD
from .half import acc_scale as _acc
from .half import as_f32 as _weight
from .prefetch import AHEAD

_FM = {"reassoc", "contract"}  # lets LLVM vectorise the reductions; keeps inf/NaN semantics
STORAGES = ("e4m3", "e5m2", "fp16", "fp32", *blockq.STORAGES)
# stored dtype the kernels see per storage (a distinct type selects each decode; E4M3 as int8 decodes
# in fewer vector ops, see hy_edge_ops.half.as_f32)
_VIEW = {E4M3: np.int8, E5M2: np.uint8, "fp16": np.uint16, "fp32": np.float32}
PREFILL_MIN = 8  # tokens of one sequence from which the row-blocked prefill kernel is faster
ONE, GROUPED, PREFILL = 0, 1, 2  # the kernel for a number of rows: `_mv`, `_mm`, gemm.mm_prefill


def kernel_for(n_rows: int, batched: bool) -> int:
    """The kernel FusedLinear runs on n_rows rows (and the attention beside it): one token, tokens of
    several sequences or a short chunk, or a prefill chunk of at least PREFILL_MIN tokens."""
    if batched or 1 < n_rows < PREFILL_MIN:
        return GROUPED
    return ONE if n_rows == 1 else PREFILL


_POW2 = {E4M3: FP8_FOLD[E4M3], E5M2: FP8_FOLD[E5M2], "fp16": 1.0, "fp32": 1.0}  # folded into the scales


@njit(cache=True, inline="always")
def _batch_block(x, w, sc, out, n, t, bk):
    # out[t.., n..]: BATCH_ROWS rows from n x up to BATCH_TOKENS tokens from t (x f32 (T, K), out f32
    # (T, N)), both clamped, duplicates not written; 1, 2 or 4 tokens per call, each with the same sums
    # (hy_edge_ops.dot)
    n_rows, n_tok = w.shape[0], x.shape[0]
    rows = (n, min(n + 1, n_rows - 1)) if BATCH_ROWS == 2 else (n,)
    left = n_tok - t
    if left == 1:
        _put(out, n, t, row_dots(w, sc, bk, rows, x, (t,), AHEAD), len(rows), 1)
    elif left == 2 or BATCH_TOKENS == 2:
        _put(out, n, t, row_dots(w, sc, bk, rows, x, (t, min(t + 1, n_tok - 1)), AHEAD), len(rows), 2)
    else:
        toks = (t, t + 1, t + 2, min(t + 3, n_tok - 1))
        _put(out, n, t, row_dots(w, sc, bk, rows, x, toks, AHEAD), len(rows), 4)


@njit(cache=True, inline="always")
def _put(out, n, t, sums, n_r, n_t):
    # sums row-major (n_r, n_t) -> out[t + j, n + i] where both exist
    n_tok, n_rows = out.shape
    for i in range(n_r):
        for j in range(n_t):
            if n + i < n_rows and t + j < n_tok:
                out[t + j, n + i] = sums[i * n_t + j]


@njit(cache=True, inline="always")
def _locate(blk, starts, size):
    # which matrix of the tuple owns block `blk` of `size` units, and the block's first unit there;
    # starts: cumulative units (rows, or 4-row blocks for the prefill kernel)
    m = 0
    first = 0
    while True:
        n_blocks = (starts[m + 1] - starts[m] + size - 1) // size
        if blk < first + n_blocks:
            return m, (blk - first) * size
        first += n_blocks
        m += 1


@njit(cache=True, nogil=True, parallel=True)
def _mv(x, ws, scs, outs, bks, starts):
    # x f32 (1, K); ws: tuple of (N_m, K); scs: tuple of f32 (N_m, G_m); outs: tuple of f32 (1, N_m)
    xk = blockq.kernel_input(x, ws[0])  # rounded to int8 once for weights that take integer inputs
    for blk in prange(starts[-1]):
        m, n = _locate(blk, starts, 1)
        outs[m][0, n] = row_dots(ws[m], scs[m], bks[m], (n,), xk, (0,), AHEAD)[0]


@njit(cache=True, nogil=True, parallel=True)
def _mm(x, ws, scs, outs, bks, starts):
    # x f32 (T, K); outs: tuple of f32 (T, N_m). Blocks of BATCH_ROWS rows run all token groups (blocks
    # of 4 rows read as two 2-row passes ran 40% slower: 12.8 against 9.0 ms on 176 MB, 4 tokens)
    n_tok = x.shape[0]
    xk = blockq.kernel_input(x, ws[0])  # each token rounded as `_mv` rounds it
    n_blocks = 0
    for m in range(len(starts) - 1):
        n_blocks += (starts[m + 1] - starts[m] + BATCH_ROWS - 1) // BATCH_ROWS
    for blk in prange(n_blocks):
        m, n = _locate(blk, starts, BATCH_ROWS)
        w, sc, out, bk = ws[m], scs[m], outs[m], bks[m]
        for t in range(0, n_tok, BATCH_TOKENS):
            _batch_block(xk, w, sc, out, n, t, bk)


@njit(cache=True, parallel=True, fastmath=_FM)
def _decode_rows(w, fold, out):
    # out[n] = the decoded code w[n, 0] with its power of two put back, on the thread pool
    for n in prange(w.shape[0]):
        out[n] = (_weight(w[n, 0]) * _acc(w)) * fold


def subnormals_work() -> bool:
    """True if FP8 subnormal codes decode exactly on numba's threads. A library built with -ffast-math
    can switch on flush-to-zero / denormals-are-zero for the whole process; the FP8 kernels would then
    read every subnormal code as 0."""
    codes = np.arange(1, 8, dtype=np.uint8)  # the E4M3 subnormals m / 8 * 2**-6
    out = np.empty(codes.shape[0], np.float32)
    _decode_rows(codes.reshape(-1, 1).view(np.int8), np.float32(_POW2[E4M3]), out)
    return bool(np.array_equal(out, codes.astype(np.float32) * np.float32(2.0**-9)))


# -- prepared linears: checked and laid out once, called without checks on the hot path -----------


@dataclass(frozen=True)
class LinearOp:
    """One weight ready for the kernels: `w` viewed as the kernels' dtype, `scales` (N, G) float32 with
    the format's power of two folded in, `bk` columns per scale block."""

    storage: str
    activations: str  # "none", or "q8": inputs rounded to int8 per block of 32 (blockq.INTEGER_INPUTS)
    # (N, K) int8 E4M3 | uint8 E5M2 | uint16 half bits | float32; block codes (N, K/32, ...):
    # blockq.code_view's int8 | uint8 | int16 | int32 | uint32 per storage (hy_edge_ops.blockq)
    w: np.ndarray
    scales: np.ndarray  # (N, G) float32; block codes: their half scales packed (blockq.pack_scales)
    bk: int

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight (block codes: 32 columns per block)."""
        if self.w.ndim == 3:
            return self.w.shape[0], self.w.shape[1] * blockq.BLOCK
        return self.w.shape


def prepare(
    w: np.ndarray,
    storage: str,
    scales: np.ndarray | None = None,
    offsets: np.ndarray | None = None,
    sub_scales: np.ndarray | None = None,
    sub_offsets: np.ndarray | None = None,
    activations: str = "none",
) -> LinearOp:
    """Check a stored weight once and lay it out for the kernels (no copy of `w`).

    storage e4m3 | e5m2: w uint8 (N, K) codes, scales float32 (N, G); fp16: w uint16 half bits;
    fp32: w float32; block storages (hy_edge_ops.blockq.STORAGES): w int8 (N, K) | uint8
    (N, K/32 * blockq.CODE_BYTES) codes, and the scales blockq.scale_shapes names: scales and offsets
    uint16 half bits, sub_scales and sub_offsets bytes (the K-quants). activations "q8" (the storages of
    blockq.INTEGER_INPUTS): the kernels take x rounded to int8 per block of 32 (blockq.quantize_inputs) and
    multiply in integers. Raises ValueError naming the bad argument."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if activations != "none" and storage not in blockq.INTEGER_INPUTS:
        raise ValueError(f"activations {activations!r}: only {', '.join(blockq.INTEGER_INPUTS)} weights take q8 inputs")
    if storage in blockq.STORAGES:
        return _prepare_blocks(w, storage, scales, offsets, sub_scales, sub_offsets, activations)
    raw = {E4M3: np.uint8, E5M2: np.uint8, "fp16": np.uint16, "fp32": np.float32}[storage]
    _need("w", w, raw, 2)
    n_rows, k_dim = w.shape
    if n_rows == 0 or k_dim == 0:
        raise ValueError(f"w has shape {w.shape}: both dimensions must be positive")
    if storage in (E4M3, E5M2):
        _need("scales", scales, np.float32, 2)
        if scales.shape[0] != n_rows or not 1 <= scales.shape[1] <= k_dim:
            raise ValueError(f"scales has shape {scales.shape}, expected ({n_rows}, G) with 1 <= G <= {k_dim}")
        with np.errstate(over="ignore"):
            s = scales * np.float32(_POW2[storage])
        if not np.isfinite(s).all():
            limit = float(np.finfo(np.float32).max) / _POW2[storage]
            raise ValueError(f"scales must be finite and below {limit:.3g} in magnitude")
        bk = block_size(k_dim, s.shape[1])
        if scales_on_weights(k_dim, s.shape[1], bk):  # the decode's whole power of two in the scales
            with np.errstate(over="ignore"):
                whole = s * np.float32(_POW2[storage])
            if np.isfinite(whole).all():
                s = whole
            else:  # scales beyond ~2**8 (weights beyond ~1e5): the same scales in groups the sums take
                s, bk = _split_groups(s, bk)
    else:
        s = np.ones((n_rows, 1), np.float32)
        bk = k_dim
    return LinearOp(storage, "none", w.view(_VIEW[storage]), np.ascontiguousarray(s, np.float32), bk)


def _prepare_blocks(w, storage, scales, offsets, sub_scales=None, sub_offsets=None, activations="none") -> LinearOp:
    _need("w", w, np.int8 if storage == "int8" else np.uint8, 2)
    n_rows = w.shape[0]
    if n_rows == 0 or w.shape[1] == 0 or w.shape[1] % blockq.CODE_BYTES[storage]:
        raise ValueError(f"w has shape {w.shape}: rows must be whole blocks of {blockq.BLOCK} weights")
    n_groups = w.shape[1] // blockq.CODE_BYTES[storage]
    parts = {"scales": scales, "offsets": offsets, "sub_scales": sub_scales, "sub_offsets": sub_offsets}
    blockq.check_scales(storage, n_rows, n_groups, **parts)
    packed = blockq.pack_scales(storage, scales, offsets, sub_scales, sub_offsets)
    return LinearOp(storage, activations, blockq.code_view(w, storage, activations), packed, blockq.BLOCK)


def _split_groups(s: np.ndarray, bk: int) -> tuple[np.ndarray, int]:
    """The same scales over groups of fewer columns that are not whole vectors (each repeated), so that
    the kernels apply them to each group's sum (hy_edge_ops.dot)."""
    part = bk
    while part % LANES == 0:
        part //= 2
    return np.ascontiguousarray(np.repeat(s, bk // part, axis=1)), part


def _starts(row_counts) -> np.ndarray:
    return np.cumsum([0, *row_counts]).astype(np.int64)


FUSE = 3  # the tuples every kernel takes: fewer linears are padded with empty ones (see FusedLinear)


def pad(items: tuple, empty) -> tuple:
    """`items` followed by `empty` up to FUSE entries."""
    return tuple(items) + (empty,) * (FUSE - len(items))


class FusedLinear:
    """Up to 3 linears sharing one input (q/k/v, gate/up), run in one parallel region.

    `__call__(x, outs, batched)`: x f32 (T, K) C-contiguous, outs f32 (T, N_m) C-contiguous (checked
    by the caller once per session). Rows of x are tokens of one sequence unless `batched`:
    - one token: `_mv`;
    - `batched` (one token of each of T sequences): `_mm`, whose per-token arithmetic is the same for
      every T, so a token's result does not depend on the batch around it;
    - a prefill chunk of >= PREFILL_MIN tokens: hy_edge_ops.gemm.mm_prefill.
    The kernels always take FUSE weights (empty ones, zero rows, after the real): one compiled
    specialization per weight type instead of one per tuple size. Each parallel function costs numba
    ~2.5 s to compile (Zen 5), nine of them a third of a first run."""

    def __init__(self, ops: list[LinearOp]):
        if not 1 <= len(ops) <= FUSE:
            raise ValueError(f"FusedLinear takes 1 to {FUSE} linears")
        if len({(op.w.dtype, op.w.ndim) for op in ops}) != 1 or len({op.shape[1] for op in ops}) != 1:
            raise ValueError("fused linears need one storage and one input size")
        self.ops = tuple(ops)
        self.ws = pad([op.w for op in ops], ops[0].w[:0])
        self.scs = pad([op.scales for op in ops], ops[0].scales[:0])
        self.bks = np.array(pad([op.bk for op in ops], 1), np.int64)
        self.starts = _starts(pad([op.w.shape[0] for op in ops], 0))
        self.tasks = gemm.task_starts(pad([op.w.shape[0] for op in ops], 0))
        self.k_dim = ops[0].shape[1]

    def __call__(self, x: np.ndarray, outs: tuple, batched: bool = False) -> None:
        kernel = kernel_for(x.shape[0], batched)
        outs = pad(outs, outs[0][:0])
        if kernel == GROUPED:
            _mm(x, self.ws, self.scs, outs, self.bks, self.starts)
        elif kernel == ONE:
            _mv(x, self.ws, self.scs, outs, self.bks, self.starts)
        else:
            gemm.mm_prefill(x, self.ws, self.scs, outs, self.bks, self.tasks)


def _kind(op: LinearOp) -> tuple:
    return op.w.dtype, op.w.ndim


def fuse(ops: list[LinearOp]) -> list[FusedLinear]:
    """Group linears that can share a parallel region (same dtype and K), in order, up to 3 each."""
    groups: list[list[LinearOp]] = []
    for op in ops:
        g = groups[-1] if groups else None
        if g and len(g) < 3 and _kind(g[0]) == _kind(op) and g[0].shape[1] == op.shape[1]:
            g.append(op)
        else:
            groups.append([op])
    return [FusedLinear(g) for g in groups]


# -- checked entry points (tests, tools): one linear, arguments validated on every call -------------


def _run(op: LinearOp, x: np.ndarray, out: np.ndarray, batched: bool = False) -> np.ndarray:
    n_rows, k_dim = op.shape
    if x.ndim == 1:
        _need("x", x, np.float32, 1, (k_dim,))
        _need("out", out, np.float32, 1, (n_rows,))
        FusedLinear([op])(x.reshape(1, -1), (out.reshape(1, -1),), batched)
        return out
    _need("x", x, np.float32, 2)
    if x.shape[1] != k_dim:
        raise ValueError(f"x has shape {x.shape}, expected (T, {k_dim})")
    _need("out", out, np.float32, 2, (x.shape[0], n_rows))
    if x.shape[0]:
        FusedLinear([op])(x, (out,), batched)
    return out


def gemv_fp8(x: np.ndarray, w: np.ndarray, scales: np.ndarray, fmt: str, out: np.ndarray) -> np.ndarray:
    """out (N,) = dequant(w) @ x; x f32 (K,), w u8 (N, K) FP8 codes of `fmt`, scales f32 (N, G)."""
    if fmt not in (E4M3, E5M2):
        raise ValueError(f"fmt must be 'e4m3' or 'e5m2', got {fmt!r}")
    return _run(prepare(w, fmt, scales), x, out)


def matmul_fp8(
    x: np.ndarray, w: np.ndarray, scales: np.ndarray, fmt: str, out: np.ndarray, batched: bool = False
) -> np.ndarray:
    """out (T, N) = x (T, K) @ dequant(w)^T; `batched` forces the grouped kernel for T == 1."""
    if fmt not in (E4M3, E5M2):
        raise ValueError(f"fmt must be 'e4m3' or 'e5m2', got {fmt!r}")
    return _run(prepare(w, fmt, scales), x, out, batched)


def matmul_blocks(
    x: np.ndarray,
    w: np.ndarray,
    storage: str,
    scales: np.ndarray,
    offsets: np.ndarray | None,
    out: np.ndarray,
    batched: bool = False,
    sub_scales: np.ndarray | None = None,
    sub_offsets: np.ndarray | None = None,
) -> np.ndarray:
    """out (T, N) | (N,) = x @ dequant(w)^T for block codes (hy_edge_ops.blockq.STORAGES), with the
    scales blockq.scale_shapes names (`prepare`)."""
    if storage not in blockq.STORAGES:
        raise ValueError(f"storage must be one of {', '.join(blockq.STORAGES)}, got {storage!r}")
    return _run(prepare(w, storage, scales, offsets, sub_scales, sub_offsets), x, out, batched)


def gemv_f16(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (N,) = decode(w) @ x for raw IEEE half bits w u16 (N, K)."""
    return _run(prepare(w, "fp16"), x, out)


def matmul_f16(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (T, N) = x (T, K) @ decode(w)^T for raw half bits w u16 (N, K)."""
    return _run(prepare(w, "fp16"), x, out)


def gemv_f32(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (N,) = w (N, K) @ x (K,) for unquantized weights (a Numba kernel, not BLAS: OpenBLAS's
    threads and Numba's workers fight over the cores)."""
    return _run(prepare(w, "fp32"), x, out)


def matmul_f32(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (T, N) = x (T, K) @ w (N, K)^T for unquantized weights."""
    return _run(prepare(w, "fp32"), x, out)


# -- embedding -----------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _gather(table, ids, out):
    # table: u16 half bits | f32 (V, C), ids: i64 (T,), out: f32 (T, C); a few rows: no thread hand-off
    for t in range(ids.shape[0]):
        row = table[ids[t]]
        o = out[t]
        for c in range(row.shape[0]):
            o[c] = _weight(row[c])


def embedding_rows(table: np.ndarray, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[t] = table[ids[t]]; table f32 (V, C) or u16 half bits (V, C)."""
    if not isinstance(table, np.ndarray) or table.ndim != 2 or table.dtype not in (np.float32, np.uint16):
        raise ValueError("table must be a 2-D float32 or uint16 (half bits) array")
    if not table.flags.c_contiguous:
        raise ValueError("table must be C-contiguous")
    _need("ids", ids, np.int64, 1)
    _need("out", out, np.float32, 2, (ids.shape[0], table.shape[1]))
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise ValueError(f"ids must lie in [0, {table.shape[0]})")
    _gather(table, ids, out)
    return out
