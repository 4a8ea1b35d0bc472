"""`--format auto --bits B`: each linear's format chosen under a budget of B bits per weight, by measured
sensitivity.

The formats, cheapest first: FP4 E2M1 (4.5 bits a weight with its half scale per 32), FP6 E2M3 (6.5) and
FP8 E4M3 per channel (8 and a float32 scale per row). Sensitivity is measured on the calibration text, per
kind of linear (q_proj, ..., down_proj, lm_head: llama.cpp's mixes are per kind too): the model runs in
float32 but for every linear of one kind rounded to one format (to nearest), and the mean KL divergence of
its next-token distributions from the float model's is that kind's cost in that format. Starting from FP4
everywhere, the kind whose move to a larger format buys the most KL per byte moves, while the budget allows; the
last move that does not fit whole moves as many of the kind's tensors as fit, those with the largest
relative weight error first. The KLs of kinds add only roughly, but their order is what the choice needs.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
from hy_edge_format import format as F
from hy_edge_format.errors import HyEdgeError
from hy_edge_format.spec import ModelSpec

from .calibrate import Calibration, Load, rms_norm
from .quantize import Quantized, QuantPolicy, quantize_weight

LADDER = ("e2m1", "e2m3", "e4m3")
PROBE_SEQUENCES = 2  # of the calibration text's sequences: their log-probs are held (S * T * V floats)
_LAYER = re.compile(r"^model\.layers\.\d+\.")


def bits_per_weight(fmt: str, shape: tuple[int, int]) -> float:
    """Stored bits per weight of a (N, K) linear in `fmt`, its scales included."""
    if fmt == "e2m1":
        return 4.5
    if fmt in ("e2m3", "e3m2"):
        return 6.5
    return 8.0 + 32.0 / shape[1]  # FP8 per channel: a float32 scale per row


def kind(name: str) -> str:
    """q_proj, ... down_proj or lm_head: the name without its layer."""
    return _LAYER.sub("", name)


def _rounded(name: str, w: np.ndarray, fmt: str) -> Quantized:
    return quantize_weight(name, w, QuantPolicy(format=fmt, rounding="nearest", scales="amax", keep_fp16=()))


def _dequantized(q: Quantized) -> np.ndarray:
    from .calibrate import dequantized

    return dequantized(q)


class _Probe:
    """Log-probabilities of the next token on a few calibration sequences, the model in float32 except
    the linears of one kind, rounded to one format."""

    def __init__(self, spec: ModelSpec, ids: np.ndarray, load: Load, linears: list[str]):
        self.spec, self.ids, self.linears = spec, ids, linears
        self.load = functools.cache(load)  # every pass reads the same float weights
        self.base = self.log_probs(None, None)

    def log_probs(self, which: str | None, fmt: str | None) -> np.ndarray:
        def quantize(name: str, w: np.ndarray, _H) -> Quantized:
            if which is not None and kind(name) == which:
                return _rounded(name, w, fmt)
            return Quantized("fp32", w)

        calib = Calibration(self.spec, self.ids, self.load, quantize, moments=False)
        head = None
        for name in self.linears:
            q = calib.take(name)
            if name == F.LM_HEAD:
                head = _dequantized(q)
        if head is None:  # tied and not decided here: the embedding, as the float model has it
            head = self.load(F.EMBED)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            h = rms_norm(calib.x, calib.norm(F.FINAL_NORM), self.spec.rms_norm_eps)
            z = h.reshape(-1, h.shape[-1]) @ head.T
            z = z - z.max(axis=1, keepdims=True)
            return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def kl(self, which: str, fmt: str) -> float:
        lp = self.log_probs(which, fmt)
        kl = (np.exp(self.base) * (self.base - lp)).sum(axis=1)
        return float(np.mean(kl[np.isfinite(kl)])) if np.isfinite(kl).any() else float("inf")


def allocate(
    spec: ModelSpec, ids: np.ndarray | None, load: Load, decide: dict[str, tuple[int, int]], bits: float
) -> tuple[dict[str, str], dict]:
    """The format of each linear in `decide` (name -> shape, in the file's order) under `bits` per weight on
    average, and a report of the measurements behind it. `ids`: the calibration text's token ids (S, T)."""
    params = {n: s[0] * s[1] for n, s in decide.items()}
    total = sum(params.values())
    budget = bits * total

    def cost(names, fmt):
        return sum(bits_per_weight(fmt, decide[n]) * params[n] for n in names)

    floor = cost(decide, LADDER[0])
    if budget < floor:
        raise HyEdgeError(f"--bits {bits:g}: below {floor / total:.2f}, what FP4 everywhere takes")
    if ids is None:
        raise HyEdgeError("--bits needs the calibration text run through the model: the checkpoint has no tokenizer")
    kinds: dict[str, list[str]] = {}
    for n in decide:
        kinds.setdefault(kind(n), []).append(n)
    probe = _Probe(spec, ids[:PROBE_SEQUENCES], load, list(decide))
    kl = {k: {fmt: probe.kl(k, fmt) for fmt in LADDER} for k in kinds}
    level = dict.fromkeys(kinds, 0)
    chosen = dict.fromkeys(decide, LADDER[0])
    spent, done = floor, set()
    while True:
        moves = []  # (KL saved per byte, kind, its new level, the bytes it adds), to any format above
        for k, i in level.items():
            for j in range(i + 1, len(LADDER) if k not in done else i + 1):
                extra = cost(kinds[k], LADDER[j]) - cost(kinds[k], LADDER[i])
                gain = kl[k][LADDER[i]] - kl[k][LADDER[j]]
                if gain > 0:
                    moves.append((gain / max(extra, 1.0), k, j, extra))
        if not moves:
            break
        _, k, j, extra = max(moves)
        if spent + extra <= budget:
            level[k] = j
            for n in kinds[k]:
                chosen[n] = LADDER[j]
            spent += extra
            continue
        # the best move does not fit whole: as many of its tensors as fit, the largest relative error first;
        # the kind moves no further, the others still may
        cur = LADDER[level[k]]
        for _, n in sorted((-_rounded(n, load(n), cur).rel_error, n) for n in kinds[k]):
            step = (bits_per_weight(LADDER[j], decide[n]) - bits_per_weight(cur, decide[n])) * params[n]
            if spent + step <= budget:
                chosen[n] = LADDER[j]
                spent += step
        done.add(k)
    report = {
        "bits": bits,
        "bits_used": round(spent / total, 4),
        "kl": kl,
        "probe_tokens": int(np.prod(ids[:PROBE_SEQUENCES].shape)),
    }
    return chosen, report


def with_formats(policy: QuantPolicy, chosen: dict[str, str]) -> QuantPolicy:
    """The policy with each chosen linear's format as an exact-name entry of tensor_formats."""
    return dataclasses.replace(policy, tensor_formats=tuple(chosen.items()) + policy.tensor_formats)
