"""The ONNX graph: standard ops only (opset 21), so stock onnxruntime runs the file as it is.

One graph serves prefill and decode: the past KV (B, Hkv, P, D) and conv state (B, C, k-1) come in, the
present ones (P + T along time) go out, and the causal mask is built from the cache length. FP8 weights
are float8 initializers feeding DequantizeLinear; emitters are named make_* and nodes get path-style
names (/model/layers.3/attn/q_proj/MatMul), as onnxruntime-genai's builders do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from hy_edge_format import format as F
from hy_edge_format.spec import ModelSpec
from hy_edge_ops import blockq, minifloat
from hy_edge_ops.activation import GELU_C, GELU_CUBIC
from hy_edge_ops.fp8 import FP8_MAX
from hy_edge_ops.rope import rope_inv_freq
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
IR_VERSION = 10
FP8_TYPES = {"e4m3": TensorProto.FLOAT8E4M3FN, "e5m2": TensorProto.FLOAT8E5M2}
_UINT8 = F.BLOCK_STORAGES["e2m1"]  # any storage of packed UINT8 codes


@dataclass(frozen=True)
class StoredWeight:
    """How one weight sits in the file: what the graph needs to read it back."""

    storage: str  # e4m3 | e5m2 | fp16 | fp32 | a block storage (format.BLOCK_STORAGES)
    shape: tuple[int, ...]
    scale_shape: tuple[int, ...] = ()  # FP8: () per tensor, (N,) per channel, (N, G) per block


class GraphBuilder:
    """Collects nodes; `weights` says how each weight is stored (the initializers are written apart)."""

    def __init__(self, spec: ModelSpec, weights: dict[str, StoredWeight], activations: str):
        self.spec = spec
        self.weights = weights
        self.activations = activations
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[onnx.TensorProto] = []
        self._const_cache: dict[tuple, str] = {}
        self._dequant_cache: dict[str, str] = {}
        self._names: set[str] = set()

    # -- plumbing ---------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], path: str, n_out: int = 1, **attrs) -> str | list[str]:
        name, n = f"{path}/{op}", 1
        while name in self._names:  # a second op of the same kind on one path: /Div, /Div_1, ...
            name, n = f"{path}/{op}_{n}", n + 1
        self._names.add(name)
        outs = [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_cache:
            name = f"/const/{len(self._const_cache)}"
            self.consts.append(numpy_helper.from_array(arr, name))
            self._const_cache[key] = name
        return self._const_cache[key]

    def i64(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    # -- weights ----------------------------------------------------------------------------
    def make_weight(self, name: str) -> str:
        """The fp32 value of a weight, dequantized once however many layers share it."""
        if name not in self._dequant_cache:
            w, value, path = self.weights[name], name, "/" + name.replace(".weight", "")
            if w.storage in FP8_TYPES:
                attrs = {}
                if len(w.scale_shape) == 1:
                    attrs = {"axis": 0}
                elif len(w.scale_shape) == 2:
                    attrs = {"axis": 1, "block_size": w.shape[1] // w.scale_shape[1]}
                value = self.node("DequantizeLinear", [name + F.QWEIGHT, name + F.SCALE], path, **attrs)
            elif F.BLOCK_STORAGES.get(w.storage, _UINT8).codes != "uint8":  # int8, uint4, q4k
                value = self.make_block_weight(name, w, path)
            elif w.storage in F.BLOCK_STORAGES:
                value = self.make_subbyte_weight(name, w, path)
            elif w.storage == "fp16":
                value = self.node("Cast", [value], path, to=TensorProto.FLOAT)
            self._dequant_cache[name] = value
        return self._dequant_cache[name]

    def make_block_weight(self, name: str, w: StoredWeight, path: str) -> str:
        """code * scale per block of 32, in float32 (the half scales widened first, so that code * scale is
        exact, as the numba kernels compute). uint4 codes keep GGUF's byte order (byte j of a block holds
        weights j and j + 16), which onnx unpacks as columns 2j and 2j + 1: the value returned has its
        columns in that order (`uint4_columns`) and no offset; make_linear and make_model put both back.
        One DequantizeLinear per weight, so that onnxruntime folds it as it folds FP8."""
        scale, block = self.make_block_scales(name, w, path)
        return self.node("DequantizeLinear", [name + F.QWEIGHT, scale], path, axis=1, block_size=block)

    def make_block_scales(self, name: str, w: StoredWeight, path: str, fold: float = 1.0) -> tuple[str, int]:
        """A block weight's scales in float32 and the weights each covers: its halves per block of 32, or
        for the K-quants d per super-block times the byte sub-scales (exact in float32, as the numba
        kernels compute), times `fold` (a power of two)."""
        d = self.node("Cast", [name + F.SCALE], path + "/scale", to=TensorProto.FLOAT)
        kind = blockq.SCALES[w.storage]
        block = blockq.BLOCK
        if kind in ("k", "k16"):
            block = blockq.BLOCK if kind == "k" else 16
            d = self.times_subs(name, d, F.SUB_SCALE, blockq.SUPER // block, path + "/scale")
        if fold != 1.0:
            d = self.node("Mul", [d, self.const(fold)], path + "/scale")
        return d, block

    def make_subbyte_weight(self, name: str, w: StoredWeight, path: str) -> str:
        """Sub-byte FP codes (hy_edge_ops.minifloat's packed layout) decoded with standard ops, as
        onnxruntime's DequantizeLinear has no FP4 / FP6: each code's value times a power of two (an integer:
        2 x E2M1, 8 x E2M3, 16 x E3M2) looked up in a table (Gather), then DequantizeLinear by the block's
        scale over that power of two (exact: as the numba kernels compute). E2M1 looks up whole bytes in a
        table of value pairs; FP6 assembles each code from its nibble and its top bits (BitwiseAnd,
        BitShift) first. GGUF's integer codes go the same way, each code's integer from a table: q6k's 6-bit
        codes in FP6's layout, and the 5-bit ones (int5, uint5, q5k) from their nibbles and the bits of the
        word after them. All from initializers: onnxruntime folds it at load, its temporaries included
        (bench figures in edge_runtime.engine.ort_session.ort_memory_plan)."""
        N, K = w.shape
        G, fmt = K // minifloat.BLOCK, w.storage
        if fmt in minifloat.FORMATS:
            mult = {"e2m1": 2, "e2m3": 8, "e3m2": 16}[fmt]
            ints = np.rint(minifloat.values(fmt) * mult)
        else:  # GGUF's integer codes: each its integer
            mult, ints = 1, blockq.integer_values(fmt)
        table_type = np.int8 if np.abs(ints).max() <= 127 else np.int16
        codes = self.node("Reshape", [name + F.QWEIGHT, self.i64(N, G, blockq.CODE_BYTES[fmt])], path + "/codes")

        def part(x: str, lo: int, hi: int, what: str) -> str:
            return self.node("Slice", [x, self.i64(lo), self.i64(hi), self.i64(2)], path + what)

        def looked_up(table: np.ndarray, x: str, what: str) -> str:  # table[x], x uint8
            index = self.node("Cast", [x], path + what, to=TensorProto.INT32)
            return self.node("Gather", [self.const(table, table.dtype), index], path + what, axis=0)

        def in_order(pairs: str, what: str) -> str:  # (N, G, n, k): element i of byte j is weight j + n i
            t = self.node("Transpose", [pairs], path + what, perm=[0, 1, 3, 2])
            return self.node("Reshape", [t, self.i64(N, G, minifloat.BLOCK)], path + what)

        byte = np.arange(256)
        low_nibbles = np.stack([byte & 15, byte >> 4], 1).astype(np.uint8)
        if fmt == "e2m1":  # each byte: the values of its two codes (weights j and j + 16)
            value = in_order(
                looked_up(ints.astype(table_type)[np.stack([byte & 15, byte >> 4], 1)], codes, "/value"), "/value"
            )
        elif blockq.CODE_BYTES[fmt] == 20:  # 5-bit: nibbles as uint4's, then bit i of bytes 16..19 (little-endian)
            low = in_order(looked_up(low_nibbles, part(codes, 0, 16, "/low"), "/low"), "/low")
            fifths = np.stack([(byte >> s) & 1 for s in range(8)], 1).astype(np.uint8) << 4  # (256, 8)
            high = looked_up(fifths, part(codes, 16, 20, "/high"), "/high")  # (N, G, 4, 8): weight 8 j + s
            high = self.node("Reshape", [high, self.i64(N, G, minifloat.BLOCK)], path + "/high")
            value = looked_up(ints.astype(table_type), self.node("BitwiseOr", [low, high], path + "/code"), "/value")
        else:  # the low 4 bits of weights j, j + 16 in byte j; the top 2 of j, j + 8, j + 16, j + 24 in byte 16 + j
            low = in_order(looked_up(low_nibbles, part(codes, 0, 16, "/low"), "/low"), "/low")
            tops = np.stack([(byte >> s) & 3 for s in (0, 2, 4, 6)], 1).astype(np.uint8) << 4
            high = in_order(looked_up(tops, part(codes, 16, 24, "/high"), "/high"), "/high")
            value = looked_up(ints.astype(table_type), self.node("BitwiseOr", [low, high], path + "/code"), "/value")
        value = self.node("Reshape", [value, self.i64(N, K)], path + "/value")
        scale, block = self.make_block_scales(name, w, path, 1.0 / mult)
        return self.node("DequantizeLinear", [value, scale], path, axis=1, block_size=block)

    def make_offsets(self, name: str) -> str:
        """The offsets per block (N, G) in float32 of a weight whose storage has them (uint4, uint5: its
        halves; q4k, q5k: -dmin per super-block times the byte sub-offsets, exact)."""
        key = name + F.OFFSET
        if key not in self._dequant_cache:
            path = "/" + name.replace(".weight", "") + "/offset"
            m = self.node("Cast", [key], path, to=TensorProto.FLOAT)
            if blockq.SCALES[self.weights[name].storage] == "k":
                sub = self.times_subs(name, m, F.SUB_OFFSET, blockq.SUPER // blockq.BLOCK, path)
                m = self.node("Neg", [sub], path)
            self._dequant_cache[key] = m
        return self._dequant_cache[key]

    def times_subs(self, name: str, top: str, suffix: str, per: int, path: str) -> str:
        """A K-quant weight's halves per super-block `top` (N, S), in float32, times its byte sub-scales
        `name + suffix` (N, S * per): float32 (N, S * per), exact (11 and at most 8 significant bits)."""
        N, K = self.weights[name].shape
        S = K // blockq.SUPER
        sub = self.node("Cast", [name + suffix], path + "/sub", to=TensorProto.FLOAT)
        sub = self.node("Reshape", [sub, self.i64(N, S, per)], path + "/sub")
        top = self.node("Reshape", [top, self.i64(N, S, 1)], path)
        return self.node("Reshape", [self.node("Mul", [top, sub], path), self.i64(N, -1)], path)

    def has_offsets(self, name: str) -> bool:
        storage = self.weights[name].storage
        return storage in blockq.SCALES and blockq.SCALES[storage] in ("dm", "k")

    def nibbles(self, name: str) -> bool:
        """Codes in uint4's byte order, which onnx unpacks out of column order (uint4_columns)."""
        return F.BLOCK_STORAGES.get(self.weights[name].storage, _UINT8).codes == "uint4"

    def make_linear(self, x: str, name: str, path: str) -> str:
        """x (B, T, K) @ W^T with W (N, K) in the Hugging Face layout."""
        w = self.make_weight(name)
        stored = self.weights[name]
        if self.activations in ("e4m3", "e5m2", "static") and stored.storage in FP8_TYPES:
            x = self.make_fake_quant(x, name, path)
        if self.activations == "q8" and stored.storage in blockq.INTEGER_INPUTS:
            x = self.make_q8_inputs(x, stored.shape[1], path)
        wt = self.node("Transpose", [w], path + "/weight", perm=[1, 0])
        if not self.has_offsets(name):
            return self.node("MatMul", [x, wt], path)
        # sum_k (d q_k + m) x_k = (x in the codes' column order) @ (d q)^T + (x summed per block) @ m^T
        K = stored.shape[1]
        shuffled = x
        if self.nibbles(name):
            shuffled = self.node("Gather", [x, self.const(uint4_columns(K), np.int64)], path + "/x", axis=2)
        y = self.node("MatMul", [shuffled, wt], path)
        blocks = self.node("Reshape", [x, self.i64(0, 0, K // 32, 32)], path + "/x_blocks")
        sums = self.node("ReduceSum", [blocks, self.i64(-1)], path + "/x_blocks", keepdims=0)  # (B, T, G)
        offsets = self.node("Transpose", [self.make_offsets(name)], path + "/offset", perm=[1, 0])
        return self.node("Add", [y, self.node("MatMul", [sums, offsets], path + "/offset")], path)

    def make_q8_inputs(self, x: str, K: int, path: str) -> str:
        """x (B, T, K) rounded to int8 per block of 32, back in float32: round(x / s) * s with s = max(amax(|x|)
        / 127, float32's smallest normal) per block, round half to even: what the numba kernels multiply
        (hy_edge_ops.blockq.quantize_inputs, computed in the same float32 steps)."""
        path += "/q8_inputs"
        blocks = self.node("Reshape", [x, self.i64(0, 0, K // 32, 32)], path)
        amax = self.node("ReduceMax", [self.node("Abs", [blocks], path), self.i64(-1)], path, keepdims=1)
        s = self.node("Div", [amax, self.const(blockq.Q8_MAX)], path)
        s = self.node("Max", [s, self.const(np.finfo(np.float32).tiny)], path + "/floor")
        q = self.node("Round", [self.node("Div", [blocks, s], path)], path)
        return self.node("Reshape", [self.node("Mul", [q, s], path), self.i64(0, 0, K)], path + "/back")

    def make_fake_quant(self, x: str, name: str, path: str) -> str:
        """x -> fp8(x / s) * s: s = input_scale (static) or amax(|x|) / FP8_MAX per token (dynamic)."""
        path += "/act_quant"
        if self.activations == "static":
            fmt = "e4m3"
            s = name + F.INPUT_SCALE
        else:
            fmt = self.activations
            amax = self.node("ReduceMax", [self.node("Abs", [x], path), self.i64(-1)], path, keepdims=1)
            s = self.node("Div", [amax, self.const(FP8_MAX[fmt])], path)
            s = self.node("Max", [s, self.const(np.finfo(np.float32).tiny)], path + "/floor")
        q = self.node("Cast", [self.node("Div", [x, s], path)], path + "/to_fp8", to=FP8_TYPES[fmt], saturate=1)
        back = self.node("Cast", [q], path + "/to_float", to=TensorProto.FLOAT)
        return self.node("Mul", [back, s], path)

    # -- blocks -----------------------------------------------------------------------------
    def make_rms_norm(self, x: str, weight: str, path: str) -> str:
        """weight * x * rsqrt(mean(x^2) + eps) over the last axis ((1 + weight) for spec.norm_plus_one)."""
        var = self.node("ReduceMean", [self.node("Mul", [x, x], path + "/sq"), self.i64(-1)], path, keepdims=1)
        inv = self.node(
            "Reciprocal",
            [self.node("Sqrt", [self.node("Add", [var, self.const(self.spec.rms_norm_eps)], path)], path)],
            path,
        )
        w = self.make_weight(weight)
        if self.spec.norm_plus_one:  # Gemma
            w = self.node("Add", [w, self.const(1.0)], path + "/plus_one")
        return self.node("Mul", [w, self.node("Mul", [x, inv], path)], path + "/scale")

    def make_rope(self, x: str, cos: str, sin: str, path: str) -> str:
        """NeoX rotate-half on x (B, heads, T, D); cos/sin (B, 1, T, D/2)."""
        half = self.spec.head_dim // 2
        x1, x2 = self.node("Split", [x, self.i64(half, half)], path, n_out=2, axis=-1)
        out1 = self.node(
            "Sub", [self.node("Mul", [x1, cos], path + "/x1c"), self.node("Mul", [x2, sin], path + "/x2s")], path
        )
        out2 = self.node(
            "Add", [self.node("Mul", [x2, cos], path + "/x2c"), self.node("Mul", [x1, sin], path + "/x1s")], path
        )
        return self.node("Concat", [out1, out2], path, axis=-1)

    def make_rope_tables(self, local: bool = False) -> tuple[str, str]:
        """cos, sin (B, 1, T, D/2) from position_ids x rope_inv_freq (the engine's table), in float32; `local`:
        the sliding layers' (spec.rope_local_theta)."""
        s, p = self.spec, "/model/rope_local" if local else "/model/rope"
        if local:
            inv = rope_inv_freq(s.head_dim, s.rope_local_theta)
        else:
            inv = rope_inv_freq(s.head_dim, s.rope_theta, s.rope_llama3, s.rope_freq_factors, s.rope_linear)
        pos = self.node("Cast", [F.POSITION_IDS], p, to=TensorProto.FLOAT)
        freqs = self.node("Mul", [self.node("Unsqueeze", [pos, self.i64(-1)], p), self.const(inv)], p)
        freqs = self.node("Unsqueeze", [freqs, self.i64(1)], p + "/heads")
        return self.node("Cos", [freqs], p), self.node("Sin", [freqs], p)

    def split_heads(self, x: str, heads: int, path: str) -> str:
        """(B, T, heads*D) -> (B, heads, T, D)."""
        x = self.node("Reshape", [x, self.i64(0, 0, heads, self.spec.head_dim)], path)
        return self.node("Transpose", [x], path, perm=[0, 2, 1, 3])

    def make_attention(self, i: int, h: str, rope: tuple[str, str], mask: str) -> str:
        s, p = self.spec, f"/model/layers.{i}/attn"
        w = F.layer_prefix(s.shared_layers[i]) + ".self_attn"
        H, Hkv, D = s.num_attention_heads, s.num_key_value_heads, s.head_dim

        def proj(x: str, heads: int) -> str:
            y = self.make_linear(h, f"{w}.{x}_proj.weight", f"{p}/{x}_proj")
            if s.qkv_bias:  # Qwen2
                y = self.node("Add", [y, self.make_weight(f"{w}.{x}_proj.bias")], f"{p}/{x}_proj/bias")
            return self.split_heads(y, heads, f"{p}/{x}")

        def qk_norm(q: str, k: str) -> tuple[str, str]:
            qn, kn = F.qk_norm_names(s)
            return (
                self.make_rms_norm(q, f"{w}.{qn}.weight", p + "/q_norm"),
                self.make_rms_norm(k, f"{w}.{kn}.weight", p + "/k_norm"),
            )

        q, k, v = proj("q", H), proj("k", Hkv), proj("v", Hkv)
        if s.use_qk_norm and s.qk_norm_before_rope:  # Qwen3Attention
            q, k = qk_norm(q, k)
        q, k = self.make_rope(q, *rope, p + "/q_rope"), self.make_rope(k, *rope, p + "/k_rope")
        if s.use_qk_norm and not s.qk_norm_before_rope:  # after RoPE: HunYuanDenseV1Attention
            q, k = qk_norm(q, k)
        k = self.node("Concat", [F.past_key(i), k], p + "/k_cache", axis=2)  # (B, Hkv, P+T, D)
        v = self.node("Concat", [F.past_value(i), v], p + "/v_cache", axis=2)
        self.nodes.append(helper.make_node("Identity", [k], [F.present_key(i)], name=p + "/present_key"))
        self.nodes.append(helper.make_node("Identity", [v], [F.present_value(i)], name=p + "/present_value"))
        if H != Hkv:  # GQA: (B, Hkv, S, D) -> (B, Hkv, H/Hkv, S, D) -> (B, H, S, D)
            k, v = (self.make_repeat_kv(t, H // Hkv, p + f"/repeat_{n}") for t, n in ((k, "k"), (v, "v")))
        kt = self.node("Transpose", [k], p + "/kT", perm=[0, 1, 3, 2])
        scale = self.const(s.softmax_scale)
        scores = self.node("Mul", [self.node("MatMul", [q, kt], p + "/qk"), scale], p + "/qk")
        scores = self.node("Where", [mask, self.const(-np.inf), scores], p + "/mask")  # (B, H, T, S)
        probs = self.node("Softmax", [scores], p, axis=-1)
        out = self.node("Transpose", [self.node("MatMul", [probs, v], p + "/pv")], p + "/out", perm=[0, 2, 1, 3])
        out = self.node("Reshape", [out, self.i64(0, 0, H * D)], p + "/out")
        return self.make_linear(out, f"{w}.o_proj.weight", p + "/o_proj")

    def make_repeat_kv(self, x: str, n_rep: int, path: str) -> str:
        s = self.spec
        x = self.node("Unsqueeze", [x, self.i64(2)], path)
        shape = self.node("Shape", [x], path)
        target = self.node(
            "Concat",
            [
                self.node("Slice", [shape, self.i64(0), self.i64(2)], path + "/bh"),
                self.i64(n_rep),
                self.node("Slice", [shape, self.i64(3), self.i64(5)], path + "/sd"),
            ],
            path + "/shape",
            axis=0,
        )
        x = self.node("Expand", [x, target], path)
        return self.node("Reshape", [x, self.i64(0, s.num_attention_heads, -1, s.head_dim)], path)

    def make_dwconv(self, i: int, h: str) -> str:
        """Depthwise causal conv over time (state: the last k-1 inputs) then a pointwise projection."""
        s, p = self.spec, f"/model/layers.{i}/mixer"
        w = F.layer_prefix(s.shared_layers[i]) + ".mixer"
        C, k = s.hidden_size, s.conv_kernel_size
        x = self.node("Transpose", [h], p + "/in", perm=[0, 2, 1])  # (B, C, T)
        x = self.node("Concat", [F.past_conv(i), x], p + "/state", axis=2)  # (B, C, k-1+T)
        self.nodes.append(
            helper.make_node(
                "Slice",
                [x, self.i64(-(k - 1)), self.i64(np.iinfo(np.int64).max), self.i64(2)],
                [F.present_conv(i)],
                name=p + "/present_conv",
            )
        )
        kernel = self.node("Reshape", [self.make_weight(f"{w}.conv.weight"), self.i64(C, 1, k)], p + "/kernel")
        y = self.node("Conv", [x, kernel], p + "/conv", group=C, kernel_shape=[k])  # (B, C, T)
        y = self.node("Transpose", [y], p + "/out", perm=[0, 2, 1])
        return self.make_linear(y, f"{w}.out_proj.weight", p + "/out_proj")

    def make_mlp(self, i: int, h: str) -> str:
        s, p = self.spec, f"/model/layers.{i}/mlp"
        w = F.layer_prefix(s.shared_layers[i]) + ".mlp"
        gate = self.make_linear(h, f"{w}.gate_proj.weight", p + "/gate_proj")
        up = self.make_linear(h, f"{w}.up_proj.weight", p + "/up_proj")
        if s.hidden_act == "relu6":
            act = self.node("Clip", [gate, self.const(0.0), self.const(6.0)], p + "/act")
        elif s.hidden_act == "gelu_tanh":  # x * sigmoid(GELU_C (x + GELU_CUBIC x^3)): tanh GELU
            cube = self.node("Mul", [self.node("Mul", [gate, gate], p + "/x2"), gate], p + "/x3")
            z = self.node("Add", [gate, self.node("Mul", [cube, self.const(float(GELU_CUBIC))], p + "/x3")], p + "/z")
            z = self.node("Mul", [z, self.const(float(GELU_C))], p + "/z")
            act = self.node("Mul", [gate, self.node("Sigmoid", [z], p + "/act")], p + "/act")
        else:
            act = self.node("Mul", [gate, self.node("Sigmoid", [gate], p + "/act")], p + "/act")
        return self.make_linear(self.node("Mul", [act, up], p + "/gated"), f"{w}.down_proj.weight", p + "/down_proj")

    def make_causal_mask(self, window: int = 0) -> str:
        """(T, S) bool, True where key j lies after query i's position P + i (S = P + T), or with a sliding
        `window`, `window` positions or more before it."""
        p = "/model/mask"
        past = self.node("Shape", [F.past_key(self.spec.attention_layers[0])], p + "/P")
        P = self.node("Gather", [past, self.i64(2)], p + "/P", axis=0)
        T = self.node("Gather", [self.node("Shape", [F.INPUT_IDS], p + "/T"), self.i64(1)], p + "/T", axis=0)
        zero, one = self.const(0, np.int64), self.const(1, np.int64)
        kpos = self.node("Range", [zero, self.node("Add", [P, T], p + "/S"), one], p + "/kpos")  # (S,)
        qpos = self.node("Add", [self.node("Range", [zero, T, one], p + "/qpos"), P], p + "/qpos")  # (T,)
        qpos = self.node("Unsqueeze", [qpos, self.i64(1)], p + "/qpos")  # (T, 1)
        after = self.node("Greater", [kpos, qpos], p)
        if not window:
            return after
        oldest = self.node("Sub", [qpos, self.const(window, np.int64)], p + "/window")  # keys <= it are out
        return self.node("Or", [after, self.node("LessOrEqual", [kpos, oldest], p + "/window")], p + "/window")

    def make_block_rows(self, rows: str) -> str:
        """Gathered rows (B, T, K) of a block embedding with offsets, columns in the codes' order (uint4's
        for nibbles) -> the weights."""
        K, G, p = self.spec.hidden_size, self.spec.hidden_size // 32, "/model/embed_tokens"
        if self.nibbles(F.EMBED):
            order = np.argsort(uint4_columns(K))
            rows = self.node("Gather", [rows, self.const(order, np.int64)], p + "/columns", axis=2)
        offsets = self.node("Gather", [self.make_offsets(F.EMBED), F.INPUT_IDS], p + "/offset", axis=0)
        blocks = self.node("Reshape", [rows, self.i64(0, 0, G, 32)], p + "/blocks")
        blocks = self.node("Add", [blocks, self.node("Unsqueeze", [offsets, self.i64(-1)], p + "/offset")], p)
        return self.node("Reshape", [blocks, self.i64(0, 0, K)], p)

    def make_model(self) -> None:
        s = self.spec
        table = self.make_weight(F.EMBED) if self.weights[F.EMBED].storage in F.BLOCK_STORAGES else F.EMBED
        x = self.node("Gather", [table, F.INPUT_IDS], "/model/embed_tokens", axis=0)
        if self.has_offsets(F.EMBED):  # the rows' columns back in order, plus their offsets
            x = self.make_block_rows(x)
        if self.weights[F.EMBED].storage == "fp16":  # gather the fp16 rows, then widen only those
            x = self.node("Cast", [x], "/model/embed_tokens", to=TensorProto.FLOAT)
        if s.embed_scale != 1.0:  # Gemma
            x = self.node("Mul", [x, self.const(s.embed_scale)], "/model/embed_tokens/scale")
        rope = mask = local = None
        if s.attention_layers:
            rope, mask = self.make_rope_tables(), self.make_causal_mask()
        if s.sliding_layers:
            local = self.make_rope_tables(local=True), self.make_causal_mask(s.sliding_window)
        for i in range(s.num_hidden_layers):
            w, p = F.layer_prefix(s.shared_layers[i]), f"/model/layers.{i}"
            h = self.make_rms_norm(x, f"{w}.input_layernorm.weight", f"{p}/input_layernorm")
            if s.layer_types[i] == "attention":
                y = self.make_attention(i, h, *(local if s.window(i) else (rope, mask)))
            else:
                y = self.make_dwconv(i, h)
            if s.sandwich_norms:  # Gemma: post_attention_layernorm on the attention's output
                y = self.make_rms_norm(y, f"{w}.post_attention_layernorm.weight", f"{p}/post_attention_layernorm")
                x = self.node("Add", [x, y], f"{p}/attn_residual")
                h = self.make_rms_norm(x, f"{w}.pre_feedforward_layernorm.weight", f"{p}/pre_feedforward_layernorm")
                y = self.make_mlp(i, h)
                y = self.make_rms_norm(y, f"{w}.post_feedforward_layernorm.weight", f"{p}/post_feedforward_layernorm")
                x = self.node("Add", [x, y], f"{p}/mlp_residual")
                continue
            x = self.node("Add", [x, y], f"{p}/attn_residual")
            h = self.make_rms_norm(x, f"{w}.post_attention_layernorm.weight", f"{p}/post_attention_layernorm")
            x = self.node("Add", [x, self.make_mlp(i, h)], f"{p}/mlp_residual")
        x = self.make_rms_norm(x, F.FINAL_NORM, "/model/norm")
        head = F.LM_HEAD if F.LM_HEAD in self.weights else F.EMBED
        logits = self.make_linear(x, head, "/lm_head")
        self.nodes.append(helper.make_node("Identity", [logits], [F.LOGITS], name="/lm_head/logits"))


def uint4_columns(n_cols: int) -> np.ndarray:
    """Which weight each column of a uint4 weight holds as onnx unpacks it (element 2i from the low nibble
    of byte i): block g's byte j holds weights j and j + 16, so column 32g + 2j + h is weight 32g + j + 16h."""
    k = np.arange(n_cols)
    r = k % 32
    return k - r + r // 2 + 16 * (r % 2)


def io_value_infos(spec: ModelSpec) -> tuple[list, list]:
    """Graph inputs and outputs with symbolic dims: batch, sequence, past_sequence, total_sequence."""
    Hkv, D, C, k = spec.num_key_value_heads, spec.head_dim, spec.hidden_size, spec.conv_kernel_size
    vi = helper.make_tensor_value_info
    inputs = [
        vi(F.INPUT_IDS, TensorProto.INT64, ["batch", "sequence"]),
        vi(F.POSITION_IDS, TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [vi(F.LOGITS, TensorProto.FLOAT, ["batch", "sequence", spec.vocab_size])]
    for i in range(spec.num_hidden_layers):
        if spec.layer_types[i] == "attention":
            for past, present in ((F.past_key(i), F.present_key(i)), (F.past_value(i), F.present_value(i))):
                inputs.append(vi(past, TensorProto.FLOAT, ["batch", Hkv, "past_sequence", D]))
                outputs.append(vi(present, TensorProto.FLOAT, ["batch", Hkv, "total_sequence", D]))
        else:
            inputs.append(vi(F.past_conv(i), TensorProto.FLOAT, ["batch", C, k - 1]))
            outputs.append(vi(F.present_conv(i), TensorProto.FLOAT, ["batch", C, k - 1]))
    return inputs, outputs
