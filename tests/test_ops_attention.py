import numpy as np
import pytest
from hy_edge_ops import reference as ref
from hy_edge_ops.attention import QB, attention, attention_chunk, attention_rows, rope_norm_store
from hy_edge_ops.rope import rope_inv_freq, rope_tables
from kv_reference import fp8_rows


def caches(kind, kf, vf):
    """The caches the kernels read for float32 keys and values kf, vf, and the values they hold."""
    if kind == "fp16":  # half bits; the reference gets the same rounded values
        kf, vf = kf.astype(np.float16).astype(np.float32), vf.astype(np.float16).astype(np.float32)
        return kf.astype(np.float16).view(np.uint16), vf.astype(np.float16).view(np.uint16), kf, vf
    if kind == "fp8":  # E4M3 rows with their scale (built with ml_dtypes)
        (kc, kf), (vc, vf) = fp8_rows(kf), fp8_rows(vf)
        return kc, vc, kf, vf
    return kf.copy(), vf.copy(), kf, vf


@pytest.mark.parametrize("h,hkv", [(6, 2), (4, 4)])
@pytest.mark.parametrize("t,start", [(1, 0), (1, 37), (9, 0), (5, 20)])
def test_attention(h, hkv, t, start):
    d, s_max = 24, 64
    rng = np.random.default_rng(8)
    q = rng.standard_normal((t, h, d)).astype(np.float32)
    k_cache = rng.standard_normal((hkv, s_max, d)).astype(np.float32)
    v_cache = rng.standard_normal((hkv, s_max, d)).astype(np.float32)
    k_cache[:, start + t :] = np.nan  # slots past the causal window must never be read
    v_cache[:, start + t :] = np.nan
    scale = d**-0.5
    want = ref.attention(q, k_cache, v_cache, start, scale)
    out = np.empty_like(q)
    attention(q, k_cache, v_cache, start, out, scale)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    attention(q, k_cache, v_cache, start, q, scale)  # out aliasing q
    np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", ["fp32", "fp8"])
@pytest.mark.parametrize("window", [1, 5, 64])
def test_sliding_window(cache, window):
    """A sliding window (Gemma 3's local layers): each query sees its last `window` positions, on the
    per-row and the chunk kernels; keys before the window are never used (NaN there changes nothing)."""
    h, hkv, d, s_max, t, start = 4, 2, 16, 80, QB + 7, 30
    rng = np.random.default_rng(12)
    q = rng.standard_normal((t, h, d)).astype(np.float32)
    kf = rng.standard_normal((1, hkv, s_max, d)).astype(np.float32)
    vf = rng.standard_normal((1, hkv, s_max, d)).astype(np.float32)
    kc, vc, kf, vf = caches(cache, kf, vf)
    want = ref.attention(q, kf[0], vf[0], start, d**-0.5, window)
    if window < 64:
        assert np.abs(want - ref.attention(q, kf[0], vf[0], start, d**-0.5)).max() > 1e-2
    pos = np.arange(start, start + t, dtype=np.int64)
    rows = np.empty_like(q)
    attention_rows(q, kc, vc, np.zeros(t, np.int64), pos, rows, d**-0.5, window=window)
    np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-5)
    out = np.empty_like(q)
    attention_chunk(q, kc, vc, 0, start, out, d**-0.5, window=window)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    if cache == "fp32" and window < start:  # the per-row kernel never reads a key before the window
        kc[0, :, : start - window + 1] = vc[0, :, : start - window + 1] = np.nan
        attention_rows(q, kc, vc, np.zeros(t, np.int64), pos, rows, d**-0.5, window=window)
        np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="window"):
        attention_rows(q, kc, vc, np.zeros(t, np.int64), pos, rows, d**-0.5, window=-1)


@pytest.mark.parametrize("cache", ["fp32", "fp16", "fp8"])
def test_rows_of_several_slots(cache):
    # one decode row per sequence slot, each at its own position, against the one-sequence reference
    h, hkv, d, s_max, n_slots = 8, 2, 32, 40, 5
    rng = np.random.default_rng(9)
    kf = rng.standard_normal((n_slots, hkv, s_max, d)).astype(np.float32) * 3
    vf = rng.standard_normal((n_slots, hkv, s_max, d)).astype(np.float32)
    kc, vc, kf, vf = caches(cache, kf, vf)
    slots = np.array([3, 0, 4], np.int64)
    pos = np.array([39, 0, 17], np.int64)
    q = rng.standard_normal((3, h, d)).astype(np.float32)
    out = np.empty_like(q)
    attention_rows(q, kc, vc, slots, pos, out, d**-0.5)
    for i in range(3):
        want = ref.attention(q[i : i + 1], kf[slots[i]], vf[slots[i]], int(pos[i]), d**-0.5)
        np.testing.assert_allclose(out[i : i + 1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", ["fp32", "fp16", "fp8"])
@pytest.mark.parametrize("h,hkv", [(6, 2), (9, 3), (4, 4)])
@pytest.mark.parametrize("t,start", [(1, 0), (3, 5), (QB, 0), (QB + 5, 0), (2 * QB + 3, 17)])
def test_chunk(cache, h, hkv, t, start):
    # one sequence's prefill chunk in (kv head, QB rows) items, 4 x 4 score blocks and 4-query P.V (with
    # their tails), in a slot other than 0, against the float64 reference and the per-row kernel
    d, s_max, slot = 40, 96, 2
    rng = np.random.default_rng(11)
    q = rng.standard_normal((t, h, d)).astype(np.float32)
    kf = rng.standard_normal((3, hkv, s_max, d)).astype(np.float32)
    vf = rng.standard_normal((3, hkv, s_max, d)).astype(np.float32)
    kc, vc, kf, vf = caches(cache, kf, vf)
    if cache != "fp16":  # positions past the chunk must never be read (FP8: their scales are NaN)
        past = (slot, slice(None), slice(start + t, None), slice(d, None) if cache == "fp8" else slice(None))
        kc[past] = vc[past] = np.array([np.nan], np.float32).view(np.int8) if cache == "fp8" else np.nan
    want = ref.attention(q, kf[slot], vf[slot], start, d**-0.5)
    out = np.full_like(q, np.nan)
    attention_chunk(q, kc, vc, slot, start, out, d**-0.5)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    rows = np.empty_like(q)
    attention_rows(q, kc, vc, np.full(t, slot, np.int64), np.arange(start, start + t, dtype=np.int64), rows, d**-0.5)
    np.testing.assert_allclose(out, rows, rtol=1e-5, atol=1e-6)
    attention_chunk(q, kc, vc, slot, start, q, d**-0.5)  # out aliasing q
    np.testing.assert_array_equal(q, out)


def test_rope_norm_store():
    t, h, hkv, d, s_max = 3, 4, 2, 16, 10
    rng = np.random.default_rng(10)
    q = rng.standard_normal((t, h, d)).astype(np.float32)
    k = rng.standard_normal((t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((t, hkv, d)).astype(np.float32)
    pos = np.array([4, 5, 6], np.int64)
    slots = np.array([1, 1, 1], np.int64)
    inv = rope_inv_freq(d, 10000.0)
    cos, sin = rope_tables(inv, s_max)
    qw, kw = rng.uniform(0.5, 1.5, d).astype(np.float32), rng.uniform(0.5, 1.5, d).astype(np.float32)
    want_q = ref.rms_norm(ref.apply_rope(q, pos, inv).reshape(-1, d), qw, 1e-5).reshape(q.shape)
    want_k = ref.rms_norm(ref.apply_rope(k, pos, inv).reshape(-1, d), kw, 1e-5).reshape(k.shape)
    kc = np.zeros((2, hkv, s_max, d), np.float32)
    vc = np.zeros_like(kc)
    rope_norm_store(q, k, v, pos, slots, cos, sin, qw, kw, 1e-5, kc, vc)
    np.testing.assert_allclose(q, want_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k, want_k, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(kc[1][:, 4:7], k.transpose(1, 0, 2))
    np.testing.assert_array_equal(vc[1][:, 4:7], v.transpose(1, 0, 2))
    assert not kc[0].any() and not kc[1][:, :4].any()
    half = np.zeros((2, hkv, s_max, d), np.uint16)  # an FP16 cache stores the rounded values
    rope_norm_store(q.copy(), k.copy(), v, pos, slots, cos, sin, None, None, 1e-5, half, half.copy())
    rotated = ref.apply_rope(k, pos, inv)
    np.testing.assert_array_equal(half[1][:, 4:7], rotated.transpose(1, 0, 2).astype(np.float16).view(np.uint16))
    fp8 = np.zeros((2, hkv, s_max, d + 4), np.int8)  # FP8 rows: codes and the row's scale
    fp8_v = fp8.copy()
    k_rot = k.copy()  # rotated in place: the values the kernel stores (its RoPE may fuse multiply-adds)
    rope_norm_store(q.copy(), k_rot, v, pos, slots, cos, sin, None, None, 1e-5, fp8, fp8_v)
    np.testing.assert_allclose(k_rot, rotated, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fp8[1][:, 4:7], fp8_rows(k_rot.transpose(1, 0, 2))[0])
    np.testing.assert_array_equal(fp8_v[1][:, 4:7], fp8_rows(v.transpose(1, 0, 2))[0])


@pytest.mark.parametrize("norm_first", [False, True])
def test_rope_norm_store_biases_and_norm_order(norm_first):
    """Qwen2's q/k/v biases are added before anything else; Qwen3 normalises before RoPE, Hunyuan after:
    both orders against numpy, and the two differ (RMSNorm with a non-uniform weight does not commute
    with the rotation)."""
    t, h, hkv, d, s_max = 3, 4, 2, 16, 10
    rng = np.random.default_rng(11)
    q = rng.standard_normal((t, h, d)).astype(np.float32)
    k = rng.standard_normal((t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((t, hkv, d)).astype(np.float32)
    qb, kb, vb = (rng.standard_normal(n * d).astype(np.float32) for n in (h, hkv, hkv))
    pos, slots = np.array([2, 3, 4], np.int64), np.zeros(3, np.int64)
    inv = rope_inv_freq(d, 10000.0)
    cos, sin = rope_tables(inv, s_max)
    qw, kw = rng.uniform(0.5, 1.5, d).astype(np.float32), rng.uniform(0.5, 1.5, d).astype(np.float32)

    def want(x, b, w, first=norm_first):
        x = x + b.reshape(x.shape[1:])
        if first:
            return ref.apply_rope(ref.rms_norm(x.reshape(-1, d), w, 1e-6).reshape(x.shape), pos, inv)
        return ref.rms_norm(ref.apply_rope(x, pos, inv).reshape(-1, d), w, 1e-6).reshape(x.shape)

    want_q, want_k, want_v = want(q, qb, qw), want(k, kb, kw), v + vb.reshape(hkv, d)
    assert np.abs(want(q, qb, qw, not norm_first) - want_q).max() > 1e-2  # the order matters: the check can fail
    kc = np.zeros((1, hkv, s_max, d), np.float32)
    vc = np.zeros_like(kc)
    rope_norm_store(q, k, v, pos, slots, cos, sin, qw, kw, 1e-6, kc, vc, (qb, kb, vb), norm_first)
    np.testing.assert_allclose(q, want_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k, want_k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vc[0][:, 2:5], want_v.transpose(1, 0, 2), rtol=1e-6)
    np.testing.assert_array_equal(kc[0][:, 2:5], k.transpose(1, 0, 2))
    with pytest.raises(ValueError, match="k bias"):
        rope_norm_store(q, k, v, pos, slots, cos, sin, qw, kw, 1e-6, kc, vc, (qb, qb, vb))


def test_errors():
    q = np.zeros((1, 6, 8), np.float32)
    kv = np.zeros((4, 8, 8), np.float32)
    q3, kv2 = np.zeros((3, 6, 8), np.float32), np.zeros((1, 2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="exceeds"):
        attention_chunk(q3, kv2, kv2, 0, 6, q3, 1.0)
    with pytest.raises(ValueError, match="slot"):
        attention_chunk(q3, kv2, kv2, 1, 0, q3, 1.0)
    with pytest.raises(ValueError, match="scratch"):
        attention_chunk(q3, kv2, kv2, 0, 0, q3, 1.0, scratch=np.zeros((1, 1, 8), np.float32))
    with pytest.raises(ValueError, match="k_cache"):
        attention(q, kv, kv, 0, q, 1.0)
    kv = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="capacity"):
        attention(q, kv, kv, 8, q, 1.0)
    with pytest.raises(ValueError, match="slots"):
        attention_rows(q, kv[None], kv[None], np.array([1], np.int64), np.array([0], np.int64), q, 1.0)
    rows = np.zeros((1, 2, 8, 8), np.int8)  # FP8 rows need D + 4 bytes
    with pytest.raises(ValueError, match="rows hold 8 elements, expected head_dim 8 \\+ 4"):
        attention_rows(q, rows, rows, np.array([0], np.int64), np.array([0], np.int64), q, 1.0)
    wide, zero = kv[None].astype(np.float64), np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="int8"):
        attention_rows(q, wide, wide, zero, zero, q, 1.0)
