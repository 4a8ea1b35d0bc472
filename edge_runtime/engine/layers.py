"""The layer loop of an attention-only model as one compiled call.

`NumbaSession._forward_rows` walks the layers in Python: about 10 kernel calls per layer, each paying
the interpreter and Numba's argument checks (~1.3 ms per token on Hunyuan-0.5B, a fifth of a SmolLM2
decode step). For the common case — every layer attention, one storage per kind of linear, no
activation fake-quant — `forward_layers` runs the same kernels in the same order from compiled code,
so its results are bit-identical to the Python loop (tests/test_runtime_step.py) and Python costs one
call per forward. Other models keep the Python loop.
"""

from __future__ import annotations

import numpy as np
from hy_edge_ops import activation, attention, gemm, linear, norm
from numba import njit, typed

from .model_file import FAKE_QUANT

ONE, GROUPED, PREFILL = linear.ONE, linear.GROUPED, linear.PREFILL  # linear.kernel_for's choice


@njit(cache=True, inline="always")
def _lin(mode, x, w0, w1, w2, s0, s1, s2, o0, o1, o2, bk, st, stp):
    # the kernels take 3 weights (linear.FUSE): one compiled specialization each
    if mode == ONE:
        linear._mv(x, (w0, w1, w2), (s0, s1, s2), (o0, o1, o2), bk, st)
    elif mode == GROUPED:
        linear._mm(x, (w0, w1, w2), (s0, s1, s2), (o0, o1, o2), bk, st)
    else:
        gemm.mm_prefill(x, (w0, w1, w2), (s0, s1, s2), (o0, o1, o2), bk, stp)


@njit(cache=True, inline="always")
def _lin1(mode, x, w, s, out, bk, st, stp):
    _lin(mode, x, w, w[:0], w[:0], s, s[:0], s[:0], out, out[:0], out[:0], bk, st, stp)


@njit(cache=True, inline="always")
def _lin2(mode, x, w0, w1, s0, s1, o0, o1, bk, st, stp):
    _lin(mode, x, w0, w1, w0[:0], s0, s1, s0[:0], o0, o1, o0[:0], bk, st, stp)


@njit(cache=True, inline="always")
def _lin3(mode, x, w0, w1, w2, s0, s1, s2, o0, o1, o2, bk, st, stp):
    _lin(mode, x, w0, w1, w2, s0, s1, s2, o0, o1, o2, bk, st, stp)


@njit(cache=True, nogil=True)
def forward_layers(
    mode, ids, rows, pos, embed, x, h, y, q, k, v, gate, up, act,
    k_cache, v_cache, scores, values_t, cos, sin, cos_local, sin_local, windows, embed_scale,
    in_norm, post_norm, final_norm, q_norm, k_norm, q_bias, k_bias, v_bias, norm_first, mixer_out_norm, mlp_out_norm,
    wq, wk, wv, wo, wg, wu, wd, sq, sk, sv, so, sg, su, sd,
    bk3, bko, bk2, bkd, st3, st3_4, st2, st2_4, st1o, st1o_4, st1d, st1d_4,
    n_heads, n_kv, eps, scale, act_kind, n_out, tail_mode, l0, l1,
):  # fmt: skip
    # ids, rows, pos: i64 (T,); x, h, y: f32 (T, C); q (T, H*D), k, v (T, Hkv*D); gate, up, act (T, F);
    # k/v_cache (L, B, Hkv, S, D); per-layer typed lists of weights (N, K) and scales (N, G); bk3, bko,
    # bk2, bkd (L, m): columns per scale block of q k v | o | gate up | down; windows i64 (L,): a layer's
    # sliding window (0: none), on the RoPE tables cos_local / sin_local; embed_scale: the embedding's
    # factor (Gemma: sqrt(C)); mixer_out_norm / mlp_out_norm: sandwich norms (Gemma), each (0,) when none.
    # Returns h = the final-normed hidden states; only its last n_out rows are computed, the last layer
    # running past its KV write on those rows alone, with the kernels of tail_mode. Runs layers l0 .. l1 - 1
    # only: from l0 > 0, x and h hold what layer l0 - 1 left there (a prompt piece run a few layers at a time).
    n_tok = ids.shape[0]
    d = q.shape[1] // n_heads
    if l0 == 0:
        linear._gather(embed, ids, x)
        if embed_scale != 1.0:
            x *= embed_scale
        norm._add_rms_norm(x, y[:0], in_norm[0], eps, h)
    n_layers = len(wq)
    for i in range(l0, l1):
        _lin3(mode, h, wq[i], wk[i], wv[i], sq[i], sk[i], sv[i], q, k, v, bk3[i], st3, st3_4)
        q3 = q.reshape(n_tok, n_heads, d)
        k3 = k.reshape(n_tok, n_kv, d)
        v3 = v.reshape(n_tok, n_kv, d)
        window = windows[i]
        cs, sn = (cos_local, sin_local) if window > 0 else (cos, sin)
        attention._rope_norm_store(
            q3, k3, v3, pos, rows, cs, sn, q_norm[i], k_norm[i], q_bias[i], k_bias[i], v_bias[i], norm_first, eps,
            k_cache[i], v_cache[i],
        )  # fmt: skip
        r, m = 0, mode  # the first row whose output is needed, and the kernels for rows r..
        if i + 1 == n_layers and n_out < n_tok:
            r, m = n_tok - n_out, tail_mode
            if n_out == 0:
                break  # the chunk's keys and values are cached: nothing else of it is used
        qr, xr, hr, yr = q[r:], x[r:], h[r:], y[r:]
        q3r = q3[r:]
        if m == PREFILL:  # one sequence's chunk (output over q)
            attention._attention_chunk(
                q3r, k_cache[i], v_cache[i], rows[r], pos[r], q3r, scale, scores, values_t, window
            )  # fmt: skip
        else:
            attention._attention_rows(q3r, k_cache[i], v_cache[i], rows[r:], pos[r:], q3r, scale, scores, window)
        _lin1(m, qr, wo[i], so[i], yr, bko[i], st1o, st1o_4)
        if mixer_out_norm[i].shape[0]:
            norm._rms_norm(yr, mixer_out_norm[i], eps, yr)
        norm._add_rms_norm(xr, yr, post_norm[i], eps, hr)  # x += y; h = norm(x)
        gr, ur, ar = gate[r:], up[r:], act[r:]
        _lin2(m, hr, wg[i], wu[i], sg[i], su[i], gr, ur, bk2[i], st2, st2_4)
        g, u, a = gr.reshape(-1), ur.reshape(-1), ar.reshape(-1)
        if g.shape[0] <= activation._CHUNK:
            activation.glu_serial(g, u, a, act_kind)
        else:
            activation._glu(g, u, a, act_kind)
        _lin1(m, ar, wd[i], sd[i], yr, bkd[i], st1d, st1d_4)
        if mlp_out_norm[i].shape[0]:
            norm._rms_norm(yr, mlp_out_norm[i], eps, yr)
        if i + 1 < n_layers:
            norm._add_rms_norm(xr, yr, in_norm[i + 1], eps, hr)
        else:
            norm._add_rms_norm(xr, yr, final_norm, eps, hr)
    return h


@njit(cache=True)
def _as_list(arrays):
    # a numba typed List of a tuple's arrays. `typed.List([...])` from Python compiles its helpers in
    # every process (they are not cached): ~0.3 s per element type and LLVM's optimizer at each start.
    out = typed.List()
    for a in arrays:
        out.append(a)
    return out


def _starts(*sizes: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative row counts for `_mv` and `_mm`, task counts for `gemm.mm_prefill`, padded to
    linear.FUSE weights (as linear.FusedLinear keeps them)."""
    sizes = linear.pad(sizes, 0)
    return np.cumsum([0, *sizes]).astype(np.int64), gemm.task_starts(sizes)


class CompiledLayers:
    """The per-session arguments of `forward_layers`, built once from the prepared blocks and the
    session's buffers."""

    def __init__(self, spec, blocks: list, final_norm: np.ndarray, buf):
        def vec(a):
            return np.array(a, np.float32, copy=True)  # one array type for every list (writable, C)

        ops = [[op for g, _ in b.qkv for op in g.ops] + list(b.o.ops) + [op for g, _ in b.gate_up for op in g.ops]
               + list(b.down.ops) for b in blocks]  # fmt: skip
        self.lists = [_as_list(tuple(layer[j].w for layer in ops)) for j in range(7)]
        self.lists += [_as_list(tuple(layer[j].scales for layer in ops)) for j in range(7)]
        # one contiguous (L, FUSE) array per group, padded as FusedLinear pads its bks: row i is then typed
        # exactly as FusedLinear.bks is, so the kernels are the same specializations (and give the same
        # bits) as from the Python loop
        self.bk = tuple(
            np.array([linear.pad([layer[j].bk for j in cols], 1) for layer in ops], np.int64)
            for cols in ((0, 1, 2), (3,), (4, 5), (6,))
        )
        first = ops[0]
        self.starts = (
            *_starts(first[0].shape[0], first[1].shape[0], first[2].shape[0]),  # q, k, v
            *_starts(first[4].shape[0], first[5].shape[0]),  # gate, up
            *_starts(first[3].shape[0]),  # o
            *_starts(first[6].shape[0]),  # down
        )
        self.in_norm = _as_list(tuple(vec(b.input_norm) for b in blocks))
        self.post_norm = _as_list(tuple(vec(b.post_norm) for b in blocks))
        self.q_norm = _as_list(tuple(vec(b.q_norm) for b in blocks))
        self.k_norm = _as_list(tuple(vec(b.k_norm) for b in blocks))
        self.biases = tuple(_as_list(tuple(vec(b.biases[j]) for b in blocks)) for j in range(3))
        empty = np.zeros(0, np.float32)
        self.sandwich = tuple(
            _as_list(tuple(vec(empty if n is None else n) for n in norms))
            for norms in ([b.mixer_out_norm for b in blocks], [b.mlp_out_norm for b in blocks])
        )
        self.windows = np.array([spec.window(i) for i in range(len(blocks))], np.int64)
        self.final_norm = vec(final_norm)
        self.spec = spec
        self.buf = buf
        self._rows: dict[int, tuple] = {}  # T -> the buffers' first T rows (views made once, not per token)

    @staticmethod
    def why_not(spec, blocks: list, activations: str) -> str | None:
        """None when forward_layers can run the model: attention-only, no activation fake-quant, and each kind
        of linear in one storage with fused q/k/v and gate/up groups (the layout it expects); else why not."""
        if activations in FAKE_QUANT:  # q8 rounds inside the kernels
            return f"activation fake-quant ({activations})"
        if any(b.kind != "attention" for b in blocks):
            return "dwconv layers"
        if any(len(b.qkv) != 1 or len(b.gate_up) != 1 for b in blocks):
            return "q/k/v or gate/up projections in different storages"

        def kind(op):
            return op.w.dtype, op.w.ndim  # ndim 3: block codes (hy_edge_ops.blockq)

        kinds = [
            [kind(op) for g, _ in b.qkv for op in g.ops] + [kind(b.o.ops[0])]
            + [kind(op) for g, _ in b.gate_up for op in g.ops] + [kind(b.down.ops[0])]
            for b in blocks
        ]  # fmt: skip
        if any(k != kinds[0] for k in kinds):
            return "layers whose linears are stored in different formats"
        writable = {op.w.flags.writeable for b in blocks for g, _ in (*b.qkv, *b.gate_up) for op in g.ops}
        return None if len(writable) == 1 else "weights both mapped and in memory"

    def __call__(
        self, mode: int, ids, embed, n_tok: int, n_out: int, tail_mode: int, layers: tuple[int, int]
    ) -> np.ndarray:
        spec, b, T = self.spec, self.buf, n_tok
        views = self._rows.get(T)
        if views is None:
            views = self._rows[T] = (
                b.row_slots[:T], b.positions[:T], b.x[:T], b.h[:T], b.y[:T], b.q[:T], b.k[:T], b.v[:T],
                b.gate[:T], b.up[:T], b.act[:T],
            )  # fmt: skip
        rows, pos, x, h, y, q, k, v, gate, up, act = views
        return forward_layers(
            mode, ids, rows, pos, embed, x, h, y, q, k, v, gate, up, act,
            b.k_cache, b.v_cache, b.scores, b.values_t, b.cos, b.sin, b.cos_local, b.sin_local, self.windows,
            np.float32(spec.embed_scale), self.in_norm, self.post_norm, self.final_norm, self.q_norm, self.k_norm,
            *self.biases, spec.qk_norm_before_rope, *self.sandwich, *self.lists, *self.bk, *self.starts,
            spec.num_attention_heads, spec.num_key_value_heads,
            float(spec.rms_norm_eps), np.float32(spec.softmax_scale), activation.KINDS[spec.hidden_act],
            n_out, tail_mode, layers[0], layers[1],
        )  # fmt: skip
