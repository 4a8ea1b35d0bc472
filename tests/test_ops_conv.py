import numpy as np
import pytest
from hy_edge_ops import reference as ref
from hy_edge_ops.conv import dwconv_causal


@pytest.mark.parametrize("t,k", [(1, 3), (2, 4), (13, 4), (5, 1)])
def test_dwconv_matches_reference_and_conv1d(t, k):
    c = 11
    rng = np.random.default_rng(9)
    x = rng.standard_normal((t, c)).astype(np.float32)
    w = rng.standard_normal((c, k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    state = rng.standard_normal((c, k - 1)).astype(np.float32)
    want, want_state = ref.dwconv_causal(x, w, state, b)
    out = np.empty_like(x)
    s = state.copy()
    dwconv_causal(x, w, s, out, b)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s, want_state.astype(np.float32))
    if k > 1:  # torch's Conv1d(groups=C, padding=k-1) truncated to the first T outputs, zero state:
        # per channel, a cross-correlation of the left-padded input with the kernel
        y = np.stack([np.correlate(np.pad(x[:, ch], (k - 1, 0)), w[ch], mode="valid") for ch in range(c)], 1)
        np.testing.assert_allclose(dwconv_causal(x, w, np.zeros((c, k - 1), np.float32), out), y, rtol=1e-5, atol=1e-5)


def test_streaming_equals_full():
    c, k, t = 7, 4, 10
    rng = np.random.default_rng(10)
    x = rng.standard_normal((t, c)).astype(np.float32)
    w = rng.standard_normal((c, k)).astype(np.float32)
    full = np.empty_like(x)
    dwconv_causal(x, w, np.zeros((c, k - 1), np.float32), full)
    state = np.zeros((c, k - 1), np.float32)
    out = np.empty((1, c), np.float32)
    for i in range(t):
        dwconv_causal(x[i : i + 1], w, state, out)
        np.testing.assert_allclose(out[0], full[i], rtol=1e-6, atol=1e-6)


def test_errors():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="state"):
        dwconv_causal(x, np.zeros((3, 4), np.float32), np.zeros((3, 2), np.float32), np.empty_like(x))
    with pytest.raises(ValueError, match="out"):
        dwconv_causal(x, np.zeros((3, 4), np.float32), np.zeros((3, 3), np.float32), x)
