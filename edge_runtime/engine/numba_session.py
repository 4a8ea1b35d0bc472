"""Backend "numba": the forward pass on memory-mapped weights with hy_edge_ops kernels.

Every buffer the forward pass touches is allocated once per session, in `buffers.allocate_buffers` (the
one documented place, shapes beside the fields, as llama2.c's RunState). A decode step allocates no
arrays. The kernel of every linear is chosen once, when the session starts (`blocks.Block`): FP8 weights stay
FP8 bytes, decoded in registers inside the GEMV / GEMM; q/k/v and gate/up run as one parallel region.

A session holds `slots` sequences, each with its own KV cache region and position. `forward` runs one
sequence (prefill in chunks, or a decode step); `decode_batch` advances several sequences by one token
in a single pass over the weights, through kernels whose per-row arithmetic does not depend on the
batch: a sequence's logits are bit-identical whether it is decoded alone or beside others.

Semantics follow transformers' HunYuanDenseV1 / Llama (and the converter's graph, convert/graph.py):
pre-norm residual blocks; q, k, v → RoPE (NeoX) → per-head RMSNorm of q and k (Hunyuan, after RoPE)
→ causal GQA; or, in dwconv layers, a depthwise causal conv then a pointwise projection; gated MLP
with SiLU or ReLU6; final norm; logits = h @ lm_head^T (the embedding when tied).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import numpy as np
from hy_edge_format.errors import BudgetError, HyEdgeError, ModelFileError
from hy_edge_format.heap import trim_heap
from hy_edge_format.spec import ModelSpec
from hy_edge_ops import activation, attention, conv, fp8, linear, norm

from .backend import PythonLayerLoop
from .blocks import Block, prepare_block, prepare_op
from .buffers import KV_CACHE_TYPES, allocate_buffers, memory_plan
from .layers import CompiledLayers
from .memory import DEFAULT_BUDGET, plan_context, release_library_pages
from .model_file import FAKE_QUANT
from .weights import Linear, Weights

FP8_FORMATS = ("e4m3", "e5m2")
DEFAULT_PREFILL_CHUNK = 128


@dataclass(eq=False)
class Piece:
    """A prompt piece of one slot, part way through the layers (NumbaSession.piece / advance): the next
    layer to run and the residual stream x and its normed h as the previous layer left them."""

    ids: np.ndarray  # (T,) token ids
    slot: int
    start: int  # the slot's position when the piece began (its first token's)
    x: np.ndarray  # (T, C)
    h: np.ndarray  # (T, C)
    layer: int = 0  # layers done


_CHECKED: dict[int, weakref.ref] = {}  # Weights objects whose FP8 codes were scanned, by id


def check_fp8_codes(weights: Weights) -> None:
    """Refuse FP8 weights holding NaN codes: the fused kernels do not decode NaN (ops/linear.py) and the
    converter never writes them, so such a file is corrupt. Scanned once per loaded model. Refuse, too,
    a process whose threads flush float32 subnormals to zero (FP8 subnormal codes decode to them)."""
    seen = _CHECKED.get(id(weights))
    if seen is not None and seen() is weights:  # the same object, not a new one at a reused address
        return
    if any(lin.storage in FP8_FORMATS for lin in weights.unique_linears()) and not linear.subnormals_work():
        raise HyEdgeError(
            "this process flushes float32 subnormals to zero (a library set FTZ/DAZ): FP8 weights would "
            "decode wrongly; run without that library or use --backend onnxruntime"
        )
    for lin in weights.unique_linears():
        if lin.storage in FP8_FORMATS and fp8.has_nan_codes(lin.w, lin.storage):
            raise ModelFileError(f"weight '{lin.name}' holds FP8 NaN codes: the model file is corrupt")
        weights.release_padding(lin)  # the pass made the pages around it resident too
    _CHECKED[id(weights)] = weakref.ref(weights)


class NumbaSession:
    """Sequences on the numba backend: caches, positions, buffers.

    Interface shared with OrtSession: `spec`, `max_context`, `n_cached`, `forward(ids, all_logits)`,
    `truncate(n)`, `reset()`. Beyond it: `slots`, `positions`, `decode_batch(ids, slots)`, and a `slot`
    argument on forward / truncate / reset.
    """

    def __init__(
        self,
        spec: ModelSpec,
        weights: Weights,
        *,
        activations: str = "none",
        max_context: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_memory: int = DEFAULT_BUDGET,
        threads: int | None = None,
        slots: int = 1,
        kv_cache: str = "fp32",
        adaptive_threads: bool = False,
        compiled: bool = True,
        warm_up: bool = True,
    ):
        from .threads import ThreadGovernor, set_threads

        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk should be >= 1, got {prefill_chunk}")
        if not isinstance(slots, int) or slots < 1:
            raise HyEdgeError(f"slots should be a positive integer, got {slots!r}")
        if kv_cache not in KV_CACHE_TYPES:
            raise HyEdgeError(f"kv cache type '{kv_cache}' is not one of {', '.join(KV_CACHE_TYPES)}")
        self.spec = spec
        self.weights = weights
        self.threads = set_threads(threads)
        # threads chosen by default (not by the user) give way to other busy processes (threads.py)
        self._governor = ThreadGovernor(self.threads) if adaptive_threads and self.threads > 1 else None
        self.activations = activations  # none | e4m3 | e5m2 | static (see _fake_quant) | q8 (in the kernels)
        act_quant = activations in FAKE_QUANT
        self.prefill_chunk = prefill_chunk
        self.slots = slots
        self.kv_cache = kv_cache
        self.plan = memory_plan(spec, weights.resident_nbytes, prefill_chunk, act_quant, slots, kv_cache)
        self.max_context = plan_context(self.plan, max_memory, max_context, spec.max_position_embeddings)
        self.buf = allocate_buffers(spec, prefill_chunk, self.max_context, act_quant, slots, kv_cache)
        self.positions = np.zeros(slots, np.int64)  # positions cached per slot
        # a forward's token rows are read into b.rows: fp16 bits or fp32 as stored, block codes decoded to fp32
        self._rows = self.buf.rows.view(weights.embed_rows.dtype)[: self.buf.x.size].reshape(self.buf.x.shape)
        # per-layer index into k_cache / conv_state
        self._slot = {i: n for n, i in enumerate(spec.attention_layers)}
        self._slot.update({i: n for n, i in enumerate(spec.conv_layers)})
        prepared: dict[int, linear.LinearOp] = {}
        self._blocks = [prepare_block(spec, weights, i, prepared, activations) for i in range(spec.num_hidden_layers)]
        self._head = linear.FusedLinear([prepare_op(weights.output, prepared, activations)])
        self._scale = np.float32(spec.softmax_scale)
        self._act = activation.KINDS[spec.hidden_act]
        self._single_step_is_grouped = False  # set by _warm_up: see _one_token_kernels_match
        # the layer loop as one compiled call where the model allows it (layers.py); otherwise said once
        why_not = CompiledLayers.why_not(spec, self._blocks, activations) if compiled else "not asked for"
        self._compiled = CompiledLayers(spec, self._blocks, weights.norm, self.buf) if why_not is None else None
        if compiled and why_not is not None:
            warnings.warn(PythonLayerLoop(f"the compiled layer loop cannot run this model ({why_not}): the Python "
                                          "layer loop does, about 1.3 ms slower per token"), stacklevel=2)  # fmt: skip
        if warm_up:
            self._warm_up()
        else:  # a warm-up's twin (its own weights are zeros), or a caller that warms up itself
            check_fp8_codes(weights)

    def _warm_up(self) -> None:
        """Load each kernel specialization a generation uses from the JIT cache here, at start-up, and not
        inside the first answer's time to first token (as llama.cpp's warm-up run does); then scan the
        FP8 codes and check the one-token kernels on the real weights.

        The kernels load while a twin session runs them on `Weights.blank()` (zeros of the same types,
        so the same specializations; their pages are never resident): loading holds ~70 MB of LLVM's
        code resident, which goes (`release_library_pages`) before the real weights are first touched,
        so that the two never count in the peak RSS together."""
        twin = NumbaSession(
            self.spec,
            self.weights.blank(),
            activations=self.activations,
            max_context=self.max_context,
            prefill_chunk=self.prefill_chunk,
            max_memory=1 << 62,  # this session checked the budget; the twin's weights are never resident
            threads=self.threads,
            slots=self.slots,
            kv_cache=self.kv_cache,
            compiled=self._compiled is not None,
            warm_up=False,
        )
        twin._run_each_kernel()
        del twin
        release_library_pages()  # every kernel a generation uses is loaded: LLVM's pages can go
        trim_heap()
        check_fp8_codes(self.weights)  # on the session's threads
        if self.max_context >= 2:
            self._single_step_is_grouped = self._one_token_kernels_match()
        self.weights.release_padding()  # every matrix has been read: the pages beside them can go

    def _run_each_kernel(self) -> None:
        """Each kernel specialization a generation uses, once (the FP8 code scan ran in __init__): a
        prefill chunk, a decode step, a batched step."""
        n = min(linear.PREFILL_MIN, self.max_context - 1)
        if n >= 1:
            self.forward(np.zeros(n, np.int64))
            self.forward(np.zeros(1, np.int64))
        self.reset()
        if self.max_context >= 2:
            self._one_token_kernels_match()

    def _one_token_kernels_match(self) -> bool:
        """Whether, on this CPU, the one-token kernels give a sequence's logits bit-identical to the
        grouped kernels of a batched step. The linears sum in one order by construction
        (hy_edge_ops.dot); the whole step is checked here, on this model, rather than assumed. When
        they match, a batched step with one sequence takes the one-token kernels (4x less arithmetic)
        and stays batch-invariant; otherwise every batched step takes the grouped kernels."""
        ids = np.array([1, 2], np.int64) % self.spec.vocab_size
        self.forward(ids[:1], slot=0)
        grouped = self._step(ids[1:], np.array([0], np.int64), batched=True).copy()
        self.truncate(1, slot=0)  # the same step again, from the same history
        one = self._step(ids[1:], np.array([0], np.int64), batched=False).copy()
        self.reset()
        return bool(np.array_equal(grouped, one))

    @property
    def n_cached(self) -> int:
        """Positions cached in slot 0 (the single-sequence interface)."""
        return int(self.positions[0])

    # -- cache control ----------------------------------------------------------------------------
    def reset(self, slot: int | None = None) -> None:
        """Forget every position of `slot` (all slots when None)."""
        for s in range(self.slots) if slot is None else (slot,):
            self.truncate(0, s)

    def truncate(self, n: int, slot: int = 0) -> int:
        """Forget every position >= n of `slot` (prefix reuse); returns the positions kept (n). KV
        entries past n are simply overwritten later; conv states are rebuilt from the stored conv
        inputs of positions n-k+1 .. n-1."""
        self._check_slot(slot)
        n = max(0, min(int(n), int(self.positions[slot])))
        self.positions[slot] = n
        km1 = self.spec.conv_kernel_size - 1
        for c in range(self.buf.conv_state.shape[0]):
            state = self.buf.conv_state[c, slot]  # (C, k-1)
            state[...] = 0.0
            lo = max(0, n - km1)
            if n > lo:
                state[:, km1 - (n - lo) :] = self.buf.conv_hist[c, slot, lo:n].T
        return n

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not in 0..{self.slots - 1}")

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        V = self.spec.vocab_size
        if ids.shape[0] and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"token id out of range 0..{V - 1}")
        return ids

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, ids, all_logits: bool = False, slot: int = 0) -> np.ndarray:
        """Run `ids` (T,) of the sequence in `slot` at its next positions and append them to its cache.
        Returns the last token's logits (V,) — a view into the session's buffer, valid until the next
        call — or, with all_logits, a new (T, V) array."""
        self._check_slot(slot)
        ids = self._check_ids(ids)
        T = ids.shape[0]
        if T == 0:
            raise ValueError("forward() needs at least one token")
        start = int(self.positions[slot])
        if self._governor is not None:
            self._governor.tick()
        if start + T > self.max_context:
            raise BudgetError(
                f"context full: {start} cached + {T} new tokens exceed the context length {self.max_context}"
            )
        out = np.empty((T, self.spec.vocab_size), np.float32) if all_logits else None
        b = self.buf
        for s in range(0, T, self.prefill_chunk):
            chunk = ids[s : s + self.prefill_chunk]
            n = chunk.shape[0]
            b.row_slots[:n] = slot
            np.add(b.ramp[:n], self.positions[slot], out=b.positions[:n])
            wanted = n if out is not None else 1 if s + n == T else 0  # rows whose logits are used
            h = self._forward_rows(chunk, batched=False, n_out=wanted)
            if out is not None:
                self._head(h, (out[s : s + n],))
            elif s + n == T:
                self._head(h[n - 1 : n], (b.logits[slot : slot + 1],))
            self.positions[slot] += n
        if out is not None:
            b.logits[slot] = out[T - 1]
            return out
        return b.logits[slot]

    def decode_batch(self, ids, slots) -> np.ndarray:
        """One decode step for B sequences: token ids[i] of the sequence in slots[i] (distinct slots), at
        that slot's next position; every weight is read once for all of them. Returns logits (B, V), a
        view valid until the next call. Row i is bit-identical to what the same call gives with any
        other set of sequences beside it."""
        ids = self._check_ids(ids)
        slots = np.ascontiguousarray(slots, dtype=np.int64).reshape(-1)
        B = ids.shape[0]
        if B == 0 or slots.shape[0] != B:
            raise ValueError(f"decode_batch needs one slot per token, got {B} tokens and {slots.shape[0]} slots")
        if B > self.slots or slots.min() < 0 or slots.max() >= self.slots or np.unique(slots).shape[0] != B:
            raise ValueError(f"slots must be distinct and lie in 0..{self.slots - 1}")
        full = slots[self.positions[slots] >= self.max_context]
        if full.shape[0]:
            raise BudgetError(f"context full in slot {int(full[0])}: {self.max_context} tokens cached")
        if self._governor is not None:
            self._governor.tick()
        return self._step(ids, slots, batched=B > 1 or not self._single_step_is_grouped)

    def piece(self, ids, slot: int = 0) -> Piece:
        """A prompt piece to run a few layers at a time (`advance`): what forward(ids, slot=slot) does, cut
        between layers, so that a server can decode other sequences in between. ids: at most prefill_chunk
        tokens."""
        self._check_slot(slot)
        ids = self._check_ids(ids)
        T = ids.shape[0]
        if not 1 <= T <= self.prefill_chunk:
            raise ValueError(f"a piece has 1 .. {self.prefill_chunk} tokens, got {T}")
        if int(self.positions[slot]) + T > self.max_context:
            raise BudgetError(
                f"context full: {int(self.positions[slot])} cached + {T} new tokens exceed the context length "
                f"{self.max_context}"
            )
        C = self.spec.hidden_size
        return Piece(ids, slot, int(self.positions[slot]), np.empty((T, C), np.float32), np.empty((T, C), np.float32))

    def advance(self, piece: Piece, layers: int) -> np.ndarray | None:
        """Run the next `layers` layers of `piece`. Returns None while layers remain; after the last, the
        piece is in its slot's cache and this returns its last token's logits (V,), a view valid until the
        next call: bit for bit what forward(piece.ids, slot=piece.slot) returns, however the layers were
        cut and whatever ran on the session in between (other slots' steps and pieces)."""
        b, T, L = self.buf, piece.ids.shape[0], len(self._blocks)
        if piece.layer >= L or int(self.positions[piece.slot]) != piece.start:
            raise ValueError("this piece is finished, or its slot has moved on")
        if self._governor is not None:
            self._governor.tick()
        b.row_slots[:T] = piece.slot
        np.add(b.ramp[:T], piece.start, out=b.positions[:T])
        if piece.layer:  # what the previous call's last layer left
            b.x[:T], b.h[:T] = piece.x, piece.h
        l1 = min(L, piece.layer + max(1, int(layers)))
        h = self._forward_rows(piece.ids, batched=False, n_out=1, layers=(piece.layer, l1))
        piece.layer = l1
        if l1 < L:
            piece.x[...], piece.h[...] = b.x[:T], b.h[:T]
            return None
        self._head(h[T - 1 : T], (b.logits[piece.slot : piece.slot + 1],))
        self.positions[piece.slot] += T
        return b.logits[piece.slot]

    def _step(self, ids: np.ndarray, slots: np.ndarray, batched: bool) -> np.ndarray:
        B, b = ids.shape[0], self.buf
        b.row_slots[:B] = slots
        b.positions[:B] = self.positions[slots]
        h = self._forward_rows(ids, batched)
        logits = b.logits[:B]
        self._head(h, (logits,), batched)
        self.positions[slots] += 1
        return logits

    def _forward_rows(
        self, ids: np.ndarray, batched: bool, n_out: int | None = None, layers: tuple[int, int] | None = None
    ) -> np.ndarray:
        """The model on T rows (b.row_slots / b.positions say whose and where); returns the final-normed
        hidden states h (T, C), a view into the buffers. With n_out < T only h's last n_out rows are
        computed: a prompt chunk's last layer, once its keys and values are cached, runs on the rows
        whose logits are wanted (llama.cpp does the same), 1/L of a prompt's arithmetic. `layers` (l0, l1):
        only layers l0 .. l1 - 1, from what layer l0 - 1 left in b.x and b.h (`advance`); h is final only
        when l1 is the last layer."""
        spec, b, T = self.spec, self.buf, ids.shape[0]
        l0, l1 = layers or (0, len(self._blocks))
        n_out = T if n_out is None or self._blocks[-1].kind != "attention" else n_out
        mode, tail_mode = linear.kernel_for(T, batched), linear.kernel_for(n_out, batched)
        # token t's embedding is rows[t] (past layer 0 unused: one row read, for the compiled call's types)
        rows = self.weights.embed_rows.read(ids if l0 == 0 else ids[:1], self._rows)
        if self._compiled is not None:
            return self._compiled(mode, b.ramp[:T], rows, T, n_out, tail_mode, (l0, l1))
        eps = spec.rms_norm_eps
        x, h = b.x[:T], b.h[:T]
        if l0 == 0:
            linear._gather(rows, b.ramp[:T], x)  # widen to f32 (weights.py allows fp16 or fp32 only)
            if spec.embed_scale != 1.0:  # Gemma
                np.multiply(x, np.float32(spec.embed_scale), out=x)
            norm._add_rms_norm(x, b.y[:0], self._blocks[0].input_norm, eps, h)
        for i in range(l0, l1):
            blk = self._blocks[i]
            last = i + 1 == len(self._blocks)
            if blk.kind == "attention":
                r = T - n_out if last else 0  # the first row whose output is needed
                y = self._attention(i, blk, h, batched, r)
                if r == T:
                    break  # the chunk's keys and values are cached: nothing else of it is used
            else:
                r, y = 0, self._dwconv(i, blk, h, batched)
            xr, hr = x[r:], h[r:]
            if blk.mixer_out_norm is not None:
                norm._rms_norm(y, blk.mixer_out_norm, eps, y)
            norm._add_rms_norm(xr, y, blk.post_norm, eps, hr)  # x += y; h = norm(x)
            y = self._mlp(blk, hr, batched)
            if blk.mlp_out_norm is not None:
                norm._rms_norm(y, blk.mlp_out_norm, eps, y)
            norm._add_rms_norm(xr, y, self.weights.norm if last else self._blocks[i + 1].input_norm, eps, hr)
        return h

    def _attention(self, i: int, blk: Block, h: np.ndarray, batched: bool, r: int = 0) -> np.ndarray:
        """q/k/v of every row and their KV write; attention and o_proj for rows r.. (their y)."""
        spec, b, T = self.spec, self.buf, h.shape[0]
        H, Hkv, D = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        q, k, v = b.q[:T], b.k[:T], b.v[:T]
        self._linears(blk, blk.qkv, h, (q, k, v), batched)
        q3, k3, v3 = q.reshape(T, H, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
        pos, rows = b.positions[:T], b.row_slots[:T]
        a = self._slot[i]
        kc, vc = b.k_cache[a], b.v_cache[a]  # (B, Hkv, S, D)
        window = np.int64(spec.window(i))
        cos, sin = (b.cos_local, b.sin_local) if window else (b.cos, b.sin)  # Gemma's sliding layers: their own base
        # biases (Qwen2); RoPE and q/k norm, in the family's order (Hunyuan: RoPE first); the KV write
        attention._rope_norm_store(
            q3, k3, v3, pos, rows, cos, sin, blk.q_norm, blk.k_norm, *blk.biases, spec.qk_norm_before_rope,
            spec.rms_norm_eps, kc, vc,
        )  # fmt: skip
        if r == T:
            return b.y[:0]
        q, q3 = q[r:], q3[r:]
        if linear.kernel_for(T - r, batched) == linear.PREFILL:  # one sequence's chunk, as forward_layers' PREFILL mode
            attention._attention_chunk(
                q3, kc, vc, rows[r], pos[r], q3, self._scale, b.scores, b.values_t, window
            )  # output over q
        else:
            attention._attention_rows(q3, kc, vc, rows[r:], pos[r:], q3, self._scale, b.scores, window)
        y = b.y[r:T]
        self._linears(blk, ((blk.o, (0,)),), q, (y,), batched)
        return y

    def _dwconv(self, i: int, blk: Block, h: np.ndarray, batched: bool) -> np.ndarray:
        b, T = self.buf, h.shape[0]
        c = self._slot[i]
        mix = b.mix[:T]
        rows, pos = b.row_slots[:T], b.positions[:T]
        if T > 1 and rows[0] == rows[T - 1] and pos[T - 1] == pos[0] + T - 1:  # one sequence's chunk
            s, p = int(rows[0]), int(pos[0])
            b.conv_hist[c, s, p : p + T] = h  # kept so truncate() can rebuild the state
            conv.dwconv_causal(h, blk.conv, b.conv_state[c, s], mix)
        else:  # a decode step: one row per sequence, each with its own state
            for t in range(T):
                s, p = int(rows[t]), int(pos[t])
                b.conv_hist[c, s, p] = h[t]
                conv.dwconv_causal(h[t : t + 1], blk.conv, b.conv_state[c, s], mix[t : t + 1])
        y = b.y[:T]
        self._linears(blk, ((blk.out_proj, (0,)),), mix, (y,), batched)
        return y

    def _mlp(self, blk: Block, h: np.ndarray, batched: bool) -> np.ndarray:
        b, T = self.buf, h.shape[0]
        gate, up, act = b.gate[:T], b.up[:T], b.act[:T]
        self._linears(blk, blk.gate_up, h, (gate, up), batched)
        activation.glu(gate, up, act, self._act)
        y = b.y[:T]
        self._linears(blk, ((blk.down, (0,)),), act, (y,), batched)
        return y

    def _linears(self, blk: Block, groups: tuple, x: np.ndarray, outs: tuple, batched: bool) -> None:
        """outs[j] (T, N_j) = x (T, K) @ W_j^T for each fused group."""
        for g, idx in groups:
            xin = self._fake_quant(x, blk.linears[id(g)][0]) if self.activations in FAKE_QUANT else x
            g(xin, tuple(outs[j] for j in idx), batched)

    # -- weights -----------------------------------------------------------------------------------

    def _fake_quant(self, x: np.ndarray, lin: Linear) -> np.ndarray:
        """x → decode(encode(x / s)) · s before an FP8 linear, as the converter's graph does:
        s = input_scale (static, E4M3) or amax(|x|) / FP8_MAX per token (dynamic, floored at the
        smallest normal float32). Emulation mode: encode_fp8 allocates its codes array."""
        T, K = x.shape
        xq = self.buf.xq[: T * K].reshape(T, K)
        if self.activations == "static":
            fmt_, s = "e4m3", np.float32(lin.input_scale if lin.input_scale is not None else 1.0)
            np.divide(x, s, out=xq)
        else:
            fmt_ = self.activations
            s = np.abs(x).max(axis=1, keepdims=True) / np.float32(fp8.FP8_MAX[fmt_])
            s = np.maximum(s, np.finfo(np.float32).tiny).astype(np.float32)
            np.divide(x, s, out=xq)
        np.take(fp8.fp8_lut(fmt_), fp8.encode_fp8(xq, fmt_), out=xq, mode="clip")
        xq *= s
        return xq
