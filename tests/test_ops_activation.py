import numpy as np
import pytest
from hy_edge_ops import reference as ref
from hy_edge_ops.activation import gelu_tanh_glu, relu6_glu, swiglu


@pytest.mark.parametrize("shape", [(1, 3584), (7, 33)])
def test_swiglu(shape):
    rng = np.random.default_rng(11)
    g = (rng.standard_normal(shape) * 8).astype(np.float32)
    g.flat[:3] = [-200.0, 200.0, 0.0]
    u = rng.standard_normal(shape).astype(np.float32)
    out = np.empty_like(g)
    swiglu(g, u, out)
    np.testing.assert_allclose(out, ref.swiglu(g, u), rtol=2e-6, atol=1e-7)  # silu(g) * u in float64
    swiglu(g, u, g)  # in place
    np.testing.assert_array_equal(g, out)


def test_relu6_glu():
    g = np.array([[-1.0, 0.0, 3.0, 6.0, 9.0]], np.float32)
    u = np.array([[2.0, 2.0, 2.0, 2.0, 2.0]], np.float32)
    out = np.empty_like(g)
    np.testing.assert_array_equal(relu6_glu(g, u, out), [[0, 0, 6, 12, 12]])
    np.testing.assert_array_equal(out, ref.relu6_glu(g, u))


@pytest.mark.parametrize("shape", [(1, 6912), (7, 33)])  # the parallel and the serial kernel
def test_gelu_tanh_glu_is_torchs(shape):
    """Gemma's GeGLU: torch's gelu(approximate="tanh") of the gate times up, in float32."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    g = (rng.standard_normal(shape) * 6).astype(np.float32)
    g.flat[:3] = [-200.0, 200.0, 0.0]
    u = rng.standard_normal(shape).astype(np.float32)
    want = (torch.nn.functional.gelu(torch.from_numpy(g), approximate="tanh") * torch.from_numpy(u)).numpy()
    out = np.empty_like(g)
    np.testing.assert_allclose(gelu_tanh_glu(g, u, out), want, rtol=3e-6, atol=1e-6)


def test_errors():
    g = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="up"):
        swiglu(g, np.zeros((3, 2), np.float32), g)
