"""A layer's weights with their kernels chosen, once per session (mlx-lm's QuantizedLinear idea): each linear
made kernel-ready (`prepare_op`: FP8 scales folded, block halves packed), linears sharing an input fused into
one parallel region (`group`), and a layer's norms, biases and groups as one `Block`, which the numba session's
layer loops (numba_session.py, layers.py) run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hy_edge_format.spec import ModelSpec
from hy_edge_ops import blockq, linear

from .model_file import FAKE_QUANT
from .weights import BLOCK_STORAGES, Linear, Weights, read_blocks, read_scales


@dataclass(frozen=True)
class Block:
    """One layer's weights with their kernels chosen (mlx-lm's QuantizedLinear idea): `qkv` and `gate_up`
    are fused groups of (FusedLinear, indices of the outputs it writes)."""

    kind: str  # attention | dwconv
    input_norm: np.ndarray  # (C,)
    post_norm: np.ndarray  # (C,) before the MLP
    qkv: tuple  # ((FusedLinear, (out indices into (q, k, v))), ...)
    o: linear.FusedLinear | None
    q_norm: np.ndarray  # (D,) or (0,) when the model has no q/k norm
    k_norm: np.ndarray
    conv: np.ndarray | None  # (C, k)
    out_proj: linear.FusedLinear | None
    gate_up: tuple  # ((FusedLinear, (out indices into (gate, up))), ...)
    down: linear.FusedLinear
    linears: dict  # id(FusedLinear) -> [Linear] (input scales for activation fake-quant)
    biases: tuple = ()  # the q/k/v projections' biases (H*D,), (Hkv*D,), (Hkv*D,), each (0,) when none
    # sandwich norms (Gemma): on the attention's (or conv's) output and on the MLP's, before each is added
    mixer_out_norm: np.ndarray | None = None
    mlp_out_norm: np.ndarray | None = None


def prepare_op(lin: Linear, prepared: dict, activations: str = "none") -> linear.LinearOp:
    """The kernel-ready form of a linear, made once per linear (`prepared`: id -> it); with the file's
    activations "q8", weights whose kernels take integer inputs get them (blockq.INTEGER_INPUTS)."""
    if id(lin) not in prepared:  # shared layers reuse their owner's prepared weights
        if lin.storage in BLOCK_STORAGES:
            q8 = activations == "q8" and lin.storage in blockq.INTEGER_INPUTS
            blocks = read_blocks(lin)  # packs their halves
            prepared[id(lin)] = linear.prepare(lin.w, lin.storage, *blocks, activations="q8" if q8 else "none")
        else:
            scales = None if lin.scales is None else read_scales(lin)
            prepared[id(lin)] = linear.prepare(lin.w, lin.storage, scales)  # folds them into its own copy
    return prepared[id(lin)]


def group(lins: list[Linear], prepared: dict, linears: dict, activations: str) -> tuple:
    """Fuse linears that share an input into parallel regions; with activation fake-quant each runs
    alone (each may have its own input scale)."""
    ops = [prepare_op(lin, prepared, activations) for lin in lins]
    if activations in FAKE_QUANT:
        groups = [linear.FusedLinear([op]) for op in ops]
    else:
        groups = linear.fuse(ops)
    out, n = [], 0
    for g in groups:
        idx = tuple(range(n, n + len(g.ops)))
        linears[id(g)] = [lins[i] for i in idx]
        out.append((g, idx))
        n += len(g.ops)
    return tuple(out)


def prepare_block(spec: ModelSpec, weights: Weights, i: int, prepared: dict, activations: str) -> Block:
    """Layer i's weights with their kernels chosen (the owner's tensors when the layer is shared)."""
    w = weights.layers[i]  # the owner's tensors when shared (spec.shared_layers)
    linears: dict = {}
    empty = np.zeros(0, np.float32)
    gate_up = group([w.gate_proj, w.up_proj], prepared, linears, activations)
    ((down, _),) = group([w.down_proj], prepared, linears, activations)
    if spec.layer_types[i] == "attention":
        qkv = group([w.q_proj, w.k_proj, w.v_proj], prepared, linears, activations)
        ((o, _),) = group([w.o_proj], prepared, linears, activations)
        qn = w.query_layernorm if spec.use_qk_norm else empty
        kn = w.key_layernorm if spec.use_qk_norm else empty
        biases = (w.q_bias, w.k_bias, w.v_bias) if spec.qkv_bias else (empty,) * 3
        if spec.sandwich_norms:  # HF's post_attention_layernorm is then the attention's output norm
            return Block(
                "attention", w.input_layernorm, w.pre_feedforward_layernorm, qkv, o, qn, kn, None, None,
                gate_up, down, linears, biases, w.post_attention_layernorm, w.post_feedforward_layernorm,
            )  # fmt: skip
        return Block(
            "attention",
            w.input_layernorm,
            w.post_attention_layernorm,
            qkv,
            o,
            qn,
            kn,
            None,
            None,
            gate_up,
            down,
            linears,
            biases,
        )
    ((out_proj, _),) = group([w.out_proj], prepared, linears, activations)
    return Block(
        "dwconv",
        w.input_layernorm,
        w.post_attention_layernorm,
        (),
        None,
        empty,
        empty,
        w.conv,
        out_proj,
        gate_up,
        down,
        linears,
    )
