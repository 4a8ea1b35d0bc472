"""Quantization policy: which tensors become FP8 (E4M3 or E5M2), with which scales, and which stay float.

The FP8 format itself (encode/decode, round-to-nearest-even, saturation) lives in `hy_edge_ops.fp8`;
this module only decides. Scales map the tensor's range onto the format's: scale = amax / FP8_MAX
per output channel (default), per tensor, or per block of N inputs. `auto` quantizes with both formats
and keeps the one with the lower reconstruction error (the seed's "dynamic exponent allocation").

Rounding: `nearest` rounds every weight to its nearest FP8 value (code-exact with hy_edge_ops.fp8); `gptq`
spreads each column's rounding error onto the columns not yet rounded, weighted by the calibration inputs
(convert/gptq.py, with the inputs from convert/calibrate.py). Scales: `amax` maps each channel's or block's
largest value onto the format's; `search` tries a few multiples of it and keeps the one with the least
(input-weighted) error. `auto` (the default of both) is gptq with searched scales where the conversion can run
the calibration text (the checkpoint has a tokenizer and some linear is rounded from floats), round-to-nearest
from amax otherwise: at the same bytes the calibrated rounding is the more faithful (bench/quality_race.py).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from dataclasses import dataclass

import numpy as np
from hy_edge_format.errors import HyEdgeError
from hy_edge_format.format import EMBED
from hy_edge_ops import blockq, minifloat
from hy_edge_ops.fp8 import FP8_MAX, dequantize_fp8, quantize_fp8

from .gptq import Hessian, gptq_round, search_scales

# source: quantized tensors as they are (an FP8 release's bytes, GGUF Q8_0/Q4_0/Q4_1 blocks), float ones
# as e4m3; e4m3 | e5m2 | auto: every float or block-quantized tensor (re)quantized to FP8
# e2m1 (FP4), e3m2 / e2m3 (FP6): every float or block-quantized linear to that sub-byte FP format, a half scale
# per block of 32 (hy_edge_ops.minifloat)
SUBBYTE = tuple(minifloat.FORMATS)
FORMATS = ("source", "e4m3", "e5m2", "auto", "none", *SUBBYTE)
TENSOR_FORMATS = ("e4m3", "e5m2", "auto", *SUBBYTE)  # what --tensor-format may give one linear
BLOCK = 32  # weights per GGUF block (hy_edge_ops.blockq.BLOCK)
ACTIVATIONS = ("none", "e4m3", "e5m2", "static", "q8")
ROUNDINGS = ("auto", "nearest", "gptq")
SCALES = ("auto", "amax", "search")
ROWS_PER_CHUNK = 4096  # bounds the fp32 temporaries of one tensor (4096 x K floats)


@dataclass(frozen=True)
class QuantPolicy:
    format: str = "source"  # source | e4m3 | e5m2 | auto | none (fp32 everywhere: the reference point)
    granularity: str = "channel"  # channel | tensor | block:N
    keep_fp16: tuple[str, ...] = (EMBED,)  # fnmatch patterns of 2-D weights that stay FP16
    # a tied lm_head gets its own FP8 copy (the embedding stays FP16 for the row gather): decode reads
    # the head every token, a third of Hunyuan-0.5B's bytes in FP16
    lm_head_fp8: bool = True
    # fake-quantize linear inputs: none | e4m3 | e5m2 | static (input_scale); q8: the inputs of the FP4 / FP6 E2M3
    # linears rounded to int8 per block of 32 (their kernels multiply in integers)
    activations: str = "none"
    rounding: str = "auto"  # auto | nearest | gptq (error-compensating, from the calibration text's inputs)
    scales: str = "auto"  # auto | amax | search (the multiple of amax with the least input-weighted error)
    # (fnmatch pattern, format) pairs: a linear matching a pattern takes that format instead (the first match)
    tensor_formats: tuple[tuple[str, str], ...] = ()
    # with format auto: the average bits per weight of the linears rounded from floats, each linear's format
    # chosen by measured sensitivity (convert/allocate.py)
    bits: float | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise HyEdgeError(f"--format: '{self.format}' is not one of {', '.join(FORMATS)}")
        if self.activations not in ACTIVATIONS:
            raise HyEdgeError(f"--activations: '{self.activations}' is not one of {', '.join(ACTIVATIONS)}")
        integer = tuple(blockq.INTEGER_INPUTS)  # formats whose linears can take q8 inputs
        makes = self.format in integer or (self.format == "auto" and self.bits is not None)
        if self.activations == "q8" and not makes and not any(f in integer for _, f in self.tensor_formats):
            shown = "auto without --bits" if self.format == "auto" else self.format
            raise HyEdgeError(
                f"--activations q8 rounds the inputs of FP4 / FP6 E2M3 linears: --format {shown} makes none "
                "(use --format e2m1 | e2m3, auto with --bits, or --tensor-format)"
            )
        if self.rounding not in ROUNDINGS:
            raise HyEdgeError(f"--rounding: '{self.rounding}' is not one of {', '.join(ROUNDINGS)}")
        if self.scales not in SCALES:
            raise HyEdgeError(f"--scales: '{self.scales}' is not one of {', '.join(SCALES)}")
        block_size(self.granularity)  # validates
        if self.bits is not None and (self.format != "auto" or not 4.5 <= self.bits <= 16):
            raise HyEdgeError(f"--bits {self.bits:g}: needs --format auto and a value from 4.5 to 16")
        for pattern, fmt in self.tensor_formats:
            if fmt not in TENSOR_FORMATS:
                raise HyEdgeError(f"--tensor-format {pattern}={fmt}: '{fmt}' is not one of {', '.join(TENSOR_FORMATS)}")
        if self.format in SUBBYTE and self.granularity not in ("channel", f"block:{BLOCK}"):
            raise HyEdgeError(f"--granularity: {self.format} weights are scaled per block of {BLOCK} (block:{BLOCK})")

    @property
    def calibrated(self) -> bool:
        """Whether the conversion runs the calibration text through the model (the inputs of each linear
        weigh its rounding and its scales). `auto` counts until `resolved` decides it."""
        return self.format != "none" and (self.rounding != "nearest" or self.scales != "amax")

    def resolved(self, calibratable: bool) -> QuantPolicy:
        """The policy with `auto` decided: gptq where the calibration text can run through the model and
        some linear is rounded from floats (`calibratable`), else round-to-nearest; scales searched with
        gptq, from amax with nearest. Explicit choices stay as they are."""
        rounding = self.rounding if self.rounding != "auto" else "gptq" if calibratable else "nearest"
        scales = self.scales if self.scales != "auto" else "search" if rounding == "gptq" else "amax"
        return dataclasses.replace(self, rounding=rounding, scales=scales)

    def for_tensor(self, name: str) -> QuantPolicy:
        """The policy of one linear: its format as the first matching `tensor_formats` entry says."""
        for pattern, fmt in self.tensor_formats:
            if fnmatch.fnmatchcase(name, pattern):
                granularity = f"block:{BLOCK}" if fmt in SUBBYTE else self.granularity
                # q8 inputs are the file's (the graph and the engine apply them by storage), not a tensor's
                acts = "none" if self.activations == "q8" else self.activations
                return dataclasses.replace(
                    self, format=fmt, granularity=granularity, tensor_formats=(), bits=None, activations=acts
                )
        return self

    def stays_float(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.keep_fp16)


def block_size(granularity: str) -> int | None:
    """None for channel/tensor, N for block:N."""
    if granularity in ("channel", "tensor"):
        return None
    if granularity.startswith("block:"):
        n = granularity[6:]
        if n.isdigit() and int(n) > 0:
            return int(n)
    raise HyEdgeError(f"--granularity: '{granularity}' is not channel, tensor or block:N")


@dataclass(frozen=True)
class Quantized:
    """One weight as it will be stored. `scale` has the ONNX DequantizeLinear shape: () per tensor,
    (N,) per channel, (N, G) per block."""

    storage: str  # e4m3 | e5m2 | int8 | uint4 | e2m1 | e3m2 | e2m3 | fp16 | fp32
    # uint8 FP8 codes (N, K) | int8 codes (N, K) | uint4: uint8 (N, K/32, 16), two codes a byte | sub-byte FP:
    # uint8 (N, K/32 * 16 | 24) packed (hy_edge_ops.minifloat) | float16 | float32
    data: np.ndarray
    scale: np.ndarray | None = None  # int8 / uint4 / sub-byte FP: float16 (N, K/32)
    granularity: str | None = None  # channel | tensor | block:N
    input_scale: np.ndarray | None = None  # float32 (), static activation scale
    rel_error: float = 0.0  # ||dequant(q) - w|| / ||w||
    carried: bool = False  # FP8 bytes taken over from the checkpoint unchanged
    note: str | None = None  # an option that could not be applied as asked (reported, never silent)
    offset: np.ndarray | None = None  # uint4 / uint5: float16 (N, K/32), added to each block's scaled codes
    # (q4k / q5k: float16 (N, K/256) dmin)
    subs: tuple = ()  # the K-quants' byte sub-scales (and sub-offsets): hy_edge_format.format.BLOCK_STORAGES

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.scale, self.offset, *self.subs) if a is not None)

    def report(self) -> dict:
        r = {"storage": self.storage, "shape": list(self.data.shape), "rel_error": float(self.rel_error)}
        if self.granularity:
            r["granularity"] = self.granularity
        if self.carried:
            r["carried"] = True
        if self.note:
            r["note"] = self.note
        return r


def _scales(w: np.ndarray, fmt: str, granularity: str) -> np.ndarray:
    """(N, G) float32 scales for w (N, K)."""
    N, K = w.shape
    amax_to_scale = np.float32(1.0 / FP8_MAX[fmt])
    # max(max, -min) rather than abs().max(): no temporary the size of the weight
    if granularity == "tensor":
        amax = np.full((N, 1), max(w.max(), -w.min()) if w.size else 0.0, np.float32)
    elif granularity == "channel":
        amax = np.maximum(w.max(axis=1, keepdims=True), -w.min(axis=1, keepdims=True))
    else:
        blocks = w.reshape(N, K // block_size(granularity), -1)
        amax = np.maximum(blocks.max(axis=2), -blocks.min(axis=2))
    scale = (amax * amax_to_scale).astype(np.float32)
    scale[~(scale > 0) | ~np.isfinite(scale)] = 1.0  # all-zero rows/blocks: any scale decodes to 0
    return scale


def _encode(
    w: np.ndarray, fmt: str, granularity: str, policy: QuantPolicy | None = None, hessian: Hessian | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Codes (N, K), scales (N, G), relative error — in row chunks so temporaries stay small. Round to
    nearest from amax scales unless the policy says otherwise; `hessian`: the calibration inputs (None:
    every input weighs the same)."""
    scales = _scales(w, fmt, granularity)
    if policy is not None and policy.scales == "search" and granularity != "tensor":  # per tensor: one scale
        scales = search_scales(w, scales, fmt, None if hessian is None else hessian.diag)
    gptq = policy is not None and policy.rounding == "gptq" and hessian is not None
    codes = gptq_round(w, hessian, scales, fmt) if gptq else np.empty(w.shape, np.uint8)
    err = ref = 0.0
    for r0 in range(0, w.shape[0], ROWS_PER_CHUNK):
        rows = slice(r0, r0 + ROWS_PER_CHUNK)
        chunk = np.ascontiguousarray(w[rows])
        if not gptq:
            codes[rows] = quantize_fp8(chunk, np.ascontiguousarray(scales[rows]), fmt)
        deq = dequantize_fp8(codes[rows], np.ascontiguousarray(scales[rows]), fmt)
        err += float(np.square(deq - chunk, dtype=np.float64).sum())
        ref += float(np.square(chunk, dtype=np.float64).sum())
    return codes, scales, (err / ref) ** 0.5 if ref > 0 else 0.0


def _onnx_scale(scales: np.ndarray, granularity: str) -> np.ndarray:
    if granularity == "tensor":
        return np.asarray(scales[0, 0], np.float32).reshape(())
    if granularity == "channel":
        return np.ascontiguousarray(scales[:, 0])
    return np.ascontiguousarray(scales)


def to_fp16(w: np.ndarray) -> Quantized:
    w16 = w.astype(np.float16)
    err = ref = 0.0
    for r0 in range(0, w.shape[0], ROWS_PER_CHUNK):  # chunked: no second full-size fp32 temporary
        chunk = w[r0 : r0 + ROWS_PER_CHUNK]
        err += float(np.square(w16[r0 : r0 + ROWS_PER_CHUNK].astype(np.float32) - chunk, dtype=np.float64).sum())
        ref += float(np.square(chunk, dtype=np.float64).sum())
    return Quantized("fp16", w16, rel_error=(err / ref) ** 0.5 if ref > 0 else 0.0)


def quantize_weight(name: str, w: np.ndarray, policy: QuantPolicy, hessian: Hessian | None = None) -> Quantized:
    """Quantize one float32 2-D weight as the policy says (linears only; callers keep norms float).
    `hessian`: X^T X of the inputs that reach this linear on the calibration text, for `rounding gptq` and
    `scales search` (None: every input weighs the same, and gptq rounds to nearest)."""
    if policy.format == "none":
        return Quantized("fp32", np.ascontiguousarray(w, np.float32))
    policy = policy.for_tensor(name)
    if policy.stays_float(name):
        return to_fp16(w)
    granularity = policy.granularity
    B = block_size(granularity)
    note = None
    if B is not None and w.shape[1] % B:
        granularity = "channel"  # blocks must tile K exactly
        note = f"{policy.granularity} does not divide the input size: scaled per channel instead"
    if policy.format in SUBBYTE and w.shape[1] % BLOCK:
        q = to_fp16(w)  # sub-byte FP needs whole blocks of 32
        return dataclasses.replace(q, note=f"{w.shape[1]} inputs are not whole blocks of {BLOCK}: kept FP16")
    if policy.format in SUBBYTE:
        return _encode_subbyte(w, policy.format, policy, hessian, note)
    fmts = {"auto": ("e4m3", "e5m2"), "source": ("e4m3",)}.get(policy.format, (policy.format,))
    best = None
    if len(fmts) > 1 and policy.calibrated:  # the format by round-to-nearest's error: one calibrated pass
        fmts = (min(fmts, key=lambda f: _encode(w, f, granularity)[2]),)
    for fmt in fmts:
        codes, scales, err = _encode(w, fmt, granularity, policy, hessian)
        if best is None or err < best[3]:
            best = (fmt, codes, scales, err)
    fmt, codes, scales, err = best
    return Quantized(fmt, codes, _onnx_scale(scales, granularity), granularity, rel_error=err, note=note)


# the sub-byte scale search: multiples of amax / max value, wider than FP8's (a coarse grid often fits a
# block better when its largest value clips a little)
SUBBYTE_SCALE_GRID = tuple(0.625 + i / 32 for i in range(15))


HALF_MAX = 65504.0


def _half_scales(d: np.ndarray) -> np.ndarray:
    """d f32 as the half the file stores, back in f32 (what the kernels multiply by); a searched scale above
    the largest half takes the largest half."""
    with np.errstate(over="ignore"):
        return np.minimum(d, np.float32(HALF_MAX)).astype(np.float16).astype(np.float32)


def _subbyte_roundtrip(w: np.ndarray, d: np.ndarray, fmt: str) -> np.ndarray:
    d = _half_scales(d)
    return minifloat.dequantize(minifloat.quantize(w, d, fmt), d, fmt)


def _encode_subbyte(
    w: np.ndarray, fmt: str, policy: QuantPolicy, hessian: Hessian | None, note: str | None
) -> Quantized:
    """Sub-byte FP codes, packed, with a half scale per block of 32: d = amax / max value (or the multiple of
    it with the least input-weighted error), rounded to nearest or by GPTQ."""
    N, K = w.shape
    blocks = w.reshape(N, K // BLOCK, BLOCK)
    amax = np.maximum(blocks.max(axis=2), -blocks.min(axis=2))
    top = minifloat.max_value(fmt)
    if float(amax.max()) > HALF_MAX * top:  # its block scale would not fit a half
        raise HyEdgeError(
            f"a weight holds {float(amax.max()):.4g}, beyond what {fmt} with a half scale holds "
            f"({HALF_MAX * top:.4g}): convert it with --format e4m3, or --tensor-format NAME=e4m3"
        )
    d = _half_scales(amax / np.float32(top))
    if policy.scales == "search":
        roundtrip = functools.partial(_subbyte_roundtrip, fmt=fmt)
        imp = None if hessian is None else hessian.diag
        d = _half_scales(search_scales(w, d, fmt, imp, roundtrip=roundtrip, grid=SUBBYTE_SCALE_GRID))
    if policy.rounding == "gptq" and hessian is not None:
        codes = gptq_round(w, hessian, d, fmt)
    else:
        codes = minifloat.quantize(np.ascontiguousarray(w, np.float32), d, fmt)
    err = ref = 0.0
    for r0 in range(0, N, ROWS_PER_CHUNK):  # chunked: no second full-size fp32 temporary
        rows = slice(r0, r0 + ROWS_PER_CHUNK)
        err += float(np.square(minifloat.dequantize(codes[rows], d[rows], fmt) - w[rows], dtype=np.float64).sum())
        ref += float(np.square(w[rows], dtype=np.float64).sum())
    rel = (err / ref) ** 0.5 if ref > 0 else 0.0
    packed = minifloat.pack(codes, fmt)
    return Quantized(fmt, packed, d.astype(np.float16), f"block:{BLOCK}", rel_error=rel, note=note)


def carry_fp8(codes: np.ndarray, weight_scale: np.ndarray, input_scale: np.ndarray | None) -> Quantized:
    """An FP8 checkpoint's bytes, taken over exactly (compressed-tensors: weight float8_e4m3fn,
    weight_scale [1] or [N, 1], input_scale [1])."""
    N = codes.shape[0]
    ws = np.asarray(weight_scale, np.float32)
    if ws.size == 1:
        scale, gran = ws.reshape(()), "tensor"
    elif ws.size == N:
        scale, gran = ws.reshape(N), "channel"
    else:
        raise HyEdgeError(f"weight_scale of shape {ws.shape} does not fit a weight with {N} rows")
    inp = None if input_scale is None else np.asarray(input_scale, np.float32).reshape(())
    return Quantized("e4m3", np.ascontiguousarray(codes), scale, gran, input_scale=inp, carried=True)


def keeps_blocks(policy: QuantPolicy, block_type: str | None) -> bool:
    """Whether a block-quantized source tensor is stored as it is (format source)."""
    return block_type is not None and policy.format == "source"


# GGUF's integer block types kept exactly: (weights per block, bytes per block) (ggml-common.h)
GGUF_BLOCKS = {
    "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
    "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
}  # fmt: skip
CARRIED_STORAGE = {
    "q8_0": "int8", "q4_0": "uint4", "q4_1": "uint4", "q5_0": "int5", "q5_1": "uint5",
    "q4_k": "q4k", "q5_k": "q5k", "q6_k": "q6k",
}  # fmt: skip


def carry_blocks(block_type: str, rows: np.ndarray, shape: tuple[int, int]) -> Quantized:
    """GGUF blocks taken over exactly (rows: uint8 (N, bytes per row) as the file holds them), their codes
    and scales re-laid out, never re-rounded (hy_edge_format.format, hy_edge_ops.blockq):
    Q8_0 (half d, 32 int8 q: d * q) -> int8; Q4_1 (half d, half m, 16 bytes of 4-bit q: d * q + m) and
    Q4_0 (half d, 16 bytes: d * (q - 8), i.e. offset -8d, exact in a half) -> uint4, the code bytes in
    GGUF's order (byte j: weight j low, weight j + 16 high); Q5_0 (d * (q - 16)) -> int5 and Q5_1
    (d * q + m) -> uint5, their 5-bit codes' bytes reordered (the nibbles, then the word of fifth bits);
    the K-quants, super-blocks of 256: Q4_K and Q5_K (half d and dmin, 6-bit sc and m per 32: q * (d * sc)
    - dmin * m) -> q4k / q5k, Q6_K (half d, int8 sc per 16: (q - 32) * (d * sc)) -> q6k."""
    N, K = shape
    if block_type not in GGUF_BLOCKS:
        raise HyEdgeError(f"{block_type} blocks cannot be kept")
    weights, per = GGUF_BLOCKS[block_type]
    n_blocks = K // weights
    if K % weights or rows.shape != (N, n_blocks * per):
        raise HyEdgeError(f"{block_type} data of shape {rows.shape} does not fit a weight of shape {shape}")
    b = rows.reshape(N, n_blocks, per)

    def half(at: int) -> np.ndarray:
        return np.ascontiguousarray(b[:, :, at : at + 2]).view("<f2").reshape(N, n_blocks).astype(np.float16)

    storage = CARRIED_STORAGE[block_type]
    kept = functools.partial(Quantized, storage, granularity=f"block:{BLOCK}", carried=True)
    if block_type == "q8_0":
        return kept(np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(N, K), half(0))
    if block_type in ("q4_0", "q4_1"):
        scale = half(0)
        if block_type == "q4_1":
            offset = half(2)
        else:
            with np.errstate(over="ignore"):
                offset = (scale * np.float16(-8)).astype(np.float16)  # exact: a power of two
        return kept(np.ascontiguousarray(b[:, :, per - 16 :]), scale, offset=offset)
    if block_type in ("q5_0", "q5_1"):  # [d, (m,)] the word of fifth bits, 16 bytes of nibbles
        at = 2 if block_type == "q5_0" else 4
        codes = np.concatenate([b[:, :, at + 4 :], b[:, :, at : at + 4]], axis=2).reshape(N, -1)
        return kept(np.ascontiguousarray(codes), half(0), offset=half(2) if block_type == "q5_1" else None)
    if block_type == "q6_k":  # ql (128), qh (64), 16 int8 scales, half d: weight w's scale is w // 16
        ql, qh = b[:, :, :128].reshape(N, n_blocks, 2, 2, 32), b[:, :, 128:192].reshape(N, n_blocks, 2, 1, 32)
        low = np.stack([ql & 15, ql >> 4], axis=3)  # (N, S, half, nibble, part, 32): weight 32 (2 nibble + part) + l
        high = np.stack([(qh >> 4 * n + 2 * k) & 3 for n in range(2) for k in range(2)], axis=3)  # (N, S, 2, 4, 1, 32)
        q = low.reshape(N, n_blocks, 2, 4, 32) | high.reshape(N, n_blocks, 2, 4, 32) << 4
        codes = minifloat.pack((q.reshape(N, K) ^ 32).astype(np.uint8), "e3m2")  # q - 32 in two's complement
        subs = (np.ascontiguousarray(b[:, :, 192:208]).view(np.int8).reshape(N, K // 16),)
        return kept(codes, half(208), subs=subs)
    # q4_k, q5_k: half d, half dmin, 12 bytes of 6-bit (sc, m) for the 8 blocks, [qh (32),] qs (128)
    sm = b[:, :, 4:16]
    sc = np.concatenate([sm[:, :, 0:4] & 63, (sm[:, :, 8:12] & 15) | (sm[:, :, 0:4] >> 6) << 4], axis=2)
    mins = np.concatenate([sm[:, :, 4:8] & 63, (sm[:, :, 8:12] >> 4) | (sm[:, :, 4:8] >> 6) << 4], axis=2)
    qs = b[:, :, per - 128 :].reshape(N, n_blocks, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=3)  # (N, S, 4, 2, 32): block 2c from the low nibbles, 2c + 1 high
    subs = (np.ascontiguousarray(sc.reshape(N, -1)), np.ascontiguousarray(mins.reshape(N, -1)))
    q = q.reshape(N, n_blocks * 8, 32)
    codes = (q[:, :, :16] | q[:, :, 16:] << 4).astype(np.uint8)  # uint4's byte order
    if block_type == "q5_k":  # block 2c's fifth bits are bit 2c of qh[0..31], block 2c + 1's bit 2c + 1
        qh = b[:, :, 16:48].reshape(N, n_blocks, 1, 32)
        bits = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1  # (N, S, block, weight)
        words = np.packbits(bits, axis=3, bitorder="little").reshape(N, n_blocks * 8, 4)
        codes = np.concatenate([codes, words], axis=2).reshape(N, -1)
    return kept(np.ascontiguousarray(codes), half(0), offset=half(2), subs=subs)


def dequantize_carried(codes: np.ndarray, weight_scale: np.ndarray) -> np.ndarray:
    """weight.float() * weight_scale, as the FP8 release defines it (for --format none)."""
    N = codes.shape[0]
    scales = np.broadcast_to(np.asarray(weight_scale, np.float32).reshape(-1, 1), (N, 1))
    return dequantize_fp8(codes, np.ascontiguousarray(scales), "e4m3")
