"""Batched decode on the numba backend: B sequences in their own KV slots advance by one token in one
pass over the weights. A sequence's logits must not depend on what is decoded beside it (bit for bit),
and must equal the one-sequence path (to float32 rounding)."""

from __future__ import annotations

import numpy as np
import pytest
from hy_edge_format.errors import BudgetError, HyEdgeError
from runtime_helpers import PROMPT_IDS, allocations, cached_bytes_per_token, converted, make_seed_checkpoint

import edge_runtime
from edge_runtime.engine.buffers import KV_CACHE_TYPES
from edge_runtime.engine.numba_session import NumbaSession

PROMPTS = [PROMPT_IDS[:7], PROMPT_IDS[3:15], PROMPT_IDS[:2], PROMPT_IDS[5:9], PROMPT_IDS[1:12]]


@pytest.fixture(scope="module")
def hy_fp8(hunyuan_f32_dir):
    return converted(hunyuan_f32_dir, "e4m3", lm_head_fp8=True)


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory):
    src = make_seed_checkpoint(
        tmp_path_factory.mktemp("seed_batch"), layer_types=["dwconv", "attention", "dwconv", "attention"]
    )
    return converted(src, "e4m3")


def greedy_batched(model, prompts: list, slots_used: list[int], steps: int, n_slots: int) -> dict:
    """Prefill each prompt into its slot, then decode greedily in batched steps; per slot, the logits
    of every step."""
    s = model.session(slots=n_slots)
    tokens = {}
    for slot, p in zip(slots_used, prompts, strict=True):
        tokens[slot] = int(np.argmax(s.forward(np.asarray(p), slot=slot)))
    out = {slot: [] for slot in slots_used}
    for _ in range(steps):
        ids = [tokens[slot] for slot in slots_used]
        logits = s.decode_batch(ids, slots_used)
        for row, slot in enumerate(slots_used):
            out[slot].append(logits[row].copy())
            tokens[slot] = int(np.argmax(logits[row]))
    return out


@pytest.mark.parametrize("one_token_kernels", ["checked", "never"])
@pytest.mark.parametrize("which", ["hy_fp8", "conv_model"])
def test_batched_decode_is_batch_invariant_and_matches_one_sequence(which, one_token_kernels, request, monkeypatch):
    # "checked": a step with one sequence takes the one-token kernels when the session found them
    # bit-identical to the grouped ones on this CPU; "never": every step takes the grouped kernels
    if one_token_kernels == "never":
        monkeypatch.setattr(NumbaSession, "_one_token_kernels_match", lambda self: False)
    model = edge_runtime.load(request.getfixturevalue(which))
    steps = 6
    alone = {i: greedy_batched(model, [p], [0], steps, 1)[0] for i, p in enumerate(PROMPTS)}
    together = greedy_batched(model, PROMPTS, [0, 1, 2, 3, 4], steps, 5)
    shuffled = greedy_batched(model, [PROMPTS[4], PROMPTS[1], PROMPTS[2]], [2, 0, 3], steps, 4)
    for i in range(len(PROMPTS)):
        for a, b in zip(alone[i], together[i], strict=True):
            np.testing.assert_array_equal(a, b)  # bit-identical beside 4 other sequences
    for slot, i in ((2, 4), (0, 1), (3, 2)):
        for a, b in zip(alone[i], shuffled[slot], strict=True):
            np.testing.assert_array_equal(a, b)  # and in another slot, another order, another batch size
    # the batched kernels compute the same sums as the one-sequence path, in another order
    for i, p in enumerate(PROMPTS):
        s = model.session()
        tok = int(np.argmax(s.forward(np.asarray(p))))
        for step in range(steps):
            logits = s.forward(np.asarray([tok]))
            np.testing.assert_allclose(alone[i][step], logits, rtol=0, atol=1e-5)
            tok = int(np.argmax(logits))


@pytest.mark.parametrize("which", ["hy_fp8", "conv_model"])  # the compiled layer loop; the Python one (dwconv)
def test_a_piece_run_a_few_layers_at_a_time_equals_forward(which, request):
    # what a server does beside running streams: a prompt piece advanced some layers per step, other slots
    # decoding and prefilling in between; its logits and cache must be forward()'s, bit for bit
    model = edge_runtime.load(request.getfixturevalue(which))
    L = model.spec.num_hidden_layers
    head, piece_ids = np.asarray(PROMPT_IDS[:8]), np.asarray(PROMPT_IDS[8:18] * 2)  # a piece of 20 (prefill)
    ref = model.session(slots=1)
    ref.forward(head)
    want = ref.forward(piece_ids).copy()
    want_next = ref.forward(np.asarray([7])).copy()
    for layers in (1, 3, L):
        s = model.session(slots=3)
        s.forward(np.asarray(PROMPT_IDS[:5]), slot=0)
        s.forward(head, slot=2)
        abandoned = s.piece(piece_ids[::-1].copy(), 2)  # begun, then given up after one layer
        assert s.advance(abandoned, 1) is None
        s.truncate(8, slot=2)  # what a server's next request in that slot does first
        piece = s.piece(piece_ids, 2)
        got, steps = None, 0
        while got is None:
            got = s.advance(piece, layers)
            s.decode_batch([3, 4], [0, 1]) if steps == 0 else s.decode_batch([3], [0])
            s.forward(np.asarray(PROMPT_IDS[:9]), slot=1) if steps == 1 else None
            steps += 1
        assert steps == -(-L // layers) and piece.layer == L
        assert np.array_equal(got, want)
        assert s.positions[2] == 28
        assert np.array_equal(s.forward(np.asarray([7]), slot=2), want_next)  # the cache it left
        with pytest.raises(ValueError, match="finished"):
            s.advance(piece, 1)
    with pytest.raises(ValueError, match="1 .. 128"):
        s.piece(np.zeros(129, np.int64), 0)


def test_slots_are_independent_caches(hy_fp8):
    model = edge_runtime.load(hy_fp8)
    s = model.session(slots=3)
    s.forward(np.asarray(PROMPT_IDS[:9]), slot=2)
    assert list(s.positions) == [0, 0, 9] and s.n_cached == 0
    s.forward(np.asarray(PROMPT_IDS[:4]), slot=0)
    s.truncate(5, slot=2)
    assert list(s.positions) == [4, 0, 5]
    want = model.session().forward(np.asarray(PROMPT_IDS[:6]))
    np.testing.assert_allclose(s.forward(np.asarray(PROMPT_IDS[5:6]), slot=2), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="distinct"):
        s.decode_batch([1, 2], [1, 1])
    with pytest.raises(ValueError, match="slot"):
        s.forward(np.asarray([1]), slot=3)
    s.reset()
    assert not s.positions.any()


def test_slots_multiply_the_kv_budget(hy_fp8, monkeypatch):
    model = edge_runtime.load(hy_fp8)
    kv_token = cached_bytes_per_token(model.spec)  # one slot's K and V per position, from the spec
    with allocations(monkeypatch) as got_one:
        one = model.session(max_context=64)
    with allocations(monkeypatch) as got_four:
        four = model.session(max_context=64, slots=4)
    # what was mapped (and a byte for each of the two empty dwconv caches: this model has no dwconv layer)
    assert got_one.mapped == 64 * kv_token + 2 and got_four.mapped == 4 * 64 * kv_token + 2
    assert four.plan.per_token - one.plan.per_token == 3 * kv_token  # the plan counts every slot's KV
    budget = model.session(max_context=64, slots=2).plan.total(64)  # exactly two slots' worth
    model.session(max_context=64, slots=2, max_memory=budget)
    with pytest.raises(BudgetError):
        model.session(max_context=64, slots=4, max_memory=budget)


def test_fp16_kv_cache(hy_fp8):
    # FP16 KV halves the cache; the logits move by the half rounding of k and v (relative 2**-11 per
    # element, averaged over the attention sum): well inside 1e-3 of the logit range on this model
    model = edge_runtime.load(hy_fp8)
    ids = np.asarray(PROMPT_IDS)
    s32, s16 = model.session(max_context=64), model.session(max_context=64, kv_cache="fp16")
    assert s16.buf.k_cache.nbytes * 2 == s32.buf.k_cache.nbytes
    a, b = s32.forward(ids, all_logits=True), s16.forward(ids, all_logits=True)
    assert 0 < np.abs(a - b).max() < 1e-3 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9
    assert edge_runtime.load(hy_fp8, kv_cache="fp16", max_context=64).session().kv_cache == "fp16"
    with pytest.raises(HyEdgeError, match="kv cache type 'int4' is not one of fp32, fp16, fp8"):
        edge_runtime.load(hy_fp8, kv_cache="int4")
    with pytest.raises(HyEdgeError, match="numba"):
        edge_runtime.load(hy_fp8, kv_cache="fp16", backend="onnxruntime")


def test_fp8_kv_cache(hy_fp8, monkeypatch):
    # FP8 KV: each key and value row as E4M3 codes and its scale, D + 4 bytes against 4 D. The logits
    # move by E4M3's rounding of k and v (3 mantissa bits, relative 2**-4 per element at most)
    assert edge_runtime.KV_CACHES == tuple(KV_CACHE_TYPES)  # what load accepts = what sessions allocate
    model = edge_runtime.load(hy_fp8)
    spec = model.spec
    ids = np.asarray(PROMPT_IDS)
    s32, s8 = model.session(max_context=64), model.session(max_context=64, kv_cache="fp8")
    assert s8.buf.k_cache.shape[-1] == spec.head_dim + 4 and s8.buf.k_cache.dtype == np.int8
    # D + 4 bytes a row against 4 D: in the plan, and in what a session maps
    rows = 2 * len(spec.attention_layers) * spec.num_key_value_heads  # K and V rows per position
    assert s32.plan.per_token - s8.plan.per_token == rows * (4 * spec.head_dim - (spec.head_dim + 4))
    with allocations(monkeypatch) as got:
        s8_again = model.session(max_context=64, kv_cache="fp8")
    assert s8_again.kv_cache == "fp8"
    assert got.mapped == 64 * rows * (spec.head_dim + 4) + 2  # + 2: a byte for each empty dwconv cache
    a, b = s32.forward(ids, all_logits=True), s8.forward(ids, all_logits=True)  # a prefill chunk
    assert 0 < np.abs(a - b).max() < 0.03 * np.abs(a).max()  # 1.2% here
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9
    # token by token (the decode kernels) reads the same FP8 cache: the same logits but for float32 order
    s8.reset()
    steps = np.stack([s8.forward(ids[t : t + 1]).copy() for t in range(len(ids))])
    np.testing.assert_allclose(steps, b, rtol=0, atol=1e-5 * np.abs(b).max())
    # batched decode with the FP8 cache stays batch-invariant
    together = greedy_batched(edge_runtime.load(hy_fp8, kv_cache="fp8"), PROMPTS[:3], [0, 1, 2], 3, 3)
    for i, p in enumerate(PROMPTS[:3]):
        alone = greedy_batched(edge_runtime.load(hy_fp8, kv_cache="fp8"), [p], [0], 3, 1)[0]
        for x, y in zip(alone, together[i], strict=True):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(HyEdgeError, match="an fp8 KV cache is a numba-backend option"):
        edge_runtime.load(hy_fp8, kv_cache="fp8", backend="onnxruntime")
