import numpy as np
import pytest
from hy_edge_ops import reference as ref
from hy_edge_ops.attention import attention


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
    scores = np.empty((h, s_max), np.float32)
    attention(q, k_cache, v_cache, start, q, scale, scores)  # out aliasing q, caller scratch
    np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-5)


def test_errors():
    q = np.zeros((1, 6, 8), np.float32)
    kv = np.zeros((4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="k_cache"):
        attention(q, kv, kv, 0, q, 1.0)
    kv = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="capacity"):
        attention(q, kv, kv, 8, q, 1.0)
    with pytest.raises(ValueError, match="scores"):
        attention(q, kv, kv, 3, q, 1.0, np.zeros((6, 3), np.float32))
