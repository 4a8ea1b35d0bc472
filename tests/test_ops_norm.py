import numpy as np
import pytest
from hy_edge_ops import reference as ref
from hy_edge_ops.norm import rms_norm


def hf_rms_norm(x, weight, eps):
    # transformers' HunYuanDenseV1RMSNorm / LlamaRMSNorm forward, in float32 as it runs there
    h = x.astype(np.float32)
    variance = (h * h).mean(-1, keepdims=True, dtype=np.float32)
    h = h * (np.float32(1) / np.sqrt(variance + np.float32(eps)))
    return weight * h


@pytest.mark.parametrize("t,c", [(1, 1024), (7, 333), (48, 128)])
def test_rms_norm(t, c):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((t, c)) * 3).astype(np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    out = np.empty_like(x)
    rms_norm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, hf_rms_norm(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(out, ref.rms_norm(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    rms_norm(x, w, 1e-5, x)  # in place
    np.testing.assert_array_equal(x, out)


def test_per_head_view():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, 6, 16)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    flat = q.reshape(-1, 16)  # (T*H, D) view of (T, H, D)
    want = ref.rms_norm(flat, w, 1e-6)
    rms_norm(flat, w, 1e-6, flat)
    np.testing.assert_allclose(q.reshape(-1, 16), want, rtol=1e-5, atol=1e-6)


def test_errors():
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, np.ones(3, np.float32), 1e-5, x)
    with pytest.raises(ValueError, match="out"):
        rms_norm(x, np.ones(4, np.float32), 1e-5, np.zeros((2, 4), np.float64))


def test_add_rms_norm_is_the_residual_step():
    from hy_edge_ops.norm import add_rms_norm

    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    y = rng.standard_normal((3, 200)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 200).astype(np.float32)
    want_x = x + y
    out = np.empty_like(x)
    add_rms_norm(x, y, w, 1e-5, out)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_allclose(out, hf_rms_norm(want_x, w, 1e-5), rtol=2e-6, atol=1e-6)
    add_rms_norm(x, None, w, 1e-5, out)  # no residual: just the norm
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_allclose(out, ref.rms_norm(want_x, w, 1e-5), rtol=2e-6, atol=1e-6)
