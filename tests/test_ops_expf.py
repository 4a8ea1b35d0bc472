import numpy as np
from hy_edge_ops.expf import expf
from numba import njit


@njit(cache=True)
def _exp_all(x, out):
    for i in range(x.shape[0]):  # the vectorised loop the kernels use
        out[i] = expf(x[i])


def run(x):
    x = np.asarray(x, np.float32)
    out = np.empty_like(x)
    _exp_all(x, out)
    return out


def test_within_one_ulp_of_the_exact_result():
    x = np.linspace(-87.3, 88.7, 3_000_001, dtype=np.float32)
    x = np.concatenate([x, np.float32(np.random.default_rng(0).standard_normal(100_000) * 4)])
    want = np.exp(x.astype(np.float64))
    err = np.abs(run(x).astype(np.float64) - want) / np.spacing(want.astype(np.float32)).astype(np.float64)
    assert err.max() <= 1.0


def test_exact_points_and_the_ends_of_the_range():
    assert run([0.0, -0.0]).tolist() == [1.0, 1.0]
    got = run([-np.inf, -1000.0, -87.4, 88.8, 1000.0, np.inf, np.nan])
    assert np.all(got[:3] > 0) and np.all(got[:3] < 1.2e-38)  # clamped, never a denormal
    assert np.all(np.isfinite(got[3:6])) and np.all(got[3:6] > 3.3e38)  # clamped, never inf
    assert np.isnan(got[6])
