import decimal

import checkpoints as ck
import numpy as np
import pytest
from hy_edge_ops import reference as ref
from hy_edge_ops.rope import apply_rope, rope_inv_freq, rope_tables

HUNYUAN_BASE = 10000.0 * 1000.0 ** (128 / 126)  # dynamic alpha scaling as a static base


CASES = [(128, HUNYUAN_BASE), (64, 10000.0), (64, 100000.0), (10, 500.0)]


@pytest.mark.parametrize("d,base", CASES)
def test_inv_freq_is_float64_rounded_once(d, base):
    """Issue 11: the same float32 table on every CPU and in both backends."""
    inv = rope_inv_freq(d, base)
    want = (1.0 / np.power(np.float64(base), np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
    np.testing.assert_array_equal(inv, want)
    with decimal.localcontext() as ctx:  # 40 digits, then rounded: the correctly rounded table
        ctx.prec = 40
        exact = [float(1 / decimal.Decimal(base) ** (decimal.Decimal(i) / d)) for i in range(0, d, 2)]
    np.testing.assert_array_equal(inv, np.array(exact).astype(np.float32))


@pytest.mark.parametrize("d,base", CASES)
def test_tables_match_torch(d, base):
    torch = pytest.importorskip(
        "torch", reason="torch is not installed (the test extra pins it only on x86_64, where a CPU wheel exists)"
    )
    inv = rope_inv_freq(d, base)
    t_inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    np.testing.assert_allclose(inv, t_inv.numpy(), rtol=1e-6)
    cos, sin = rope_tables(inv, 4096)
    pos = torch.arange(4096, dtype=torch.float)
    freqs = torch.outer(pos, torch.from_numpy(inv))
    np.testing.assert_allclose(cos, freqs.cos().numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(sin, freqs.sin().numpy(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("t,h", [(1, 6), (11, 2)])
def test_apply_rope(t, h):
    d = 64
    rng = np.random.default_rng(6)
    inv = rope_inv_freq(d, 10000.0)
    cos, sin = rope_tables(inv, 100)
    x = rng.standard_normal((t, h, d)).astype(np.float32)
    positions = rng.integers(0, 100, t).astype(np.int64)
    want = ref.apply_rope(x, positions, inv)
    apply_rope(x, positions, cos, sin)
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)


def test_apply_rope_matches_transformers_rotate_half():
    d, t, h = 32, 5, 3
    rng = np.random.default_rng(7)
    x = rng.standard_normal((t, h, d)).astype(np.float32)
    inv = rope_inv_freq(d, 10000.0)
    cos, sin = rope_tables(inv, 16)
    positions = np.arange(3, 3 + t, dtype=np.int64)
    # transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, cos/sin tables repeated twice
    xt = x.copy().transpose(1, 0, 2)  # (H, T, D)
    emb_cos = np.concatenate([cos[positions]] * 2, -1)  # (T, D)
    emb_sin = np.concatenate([sin[positions]] * 2, -1)
    rot = np.concatenate((-xt[..., d // 2 :], xt[..., : d // 2]), axis=-1)
    want = (xt * emb_cos + rot * emb_sin).transpose(1, 0, 2)
    np.testing.assert_allclose(apply_rope(x, positions, cos, sin), want, rtol=1e-6, atol=1e-6)


def test_errors():
    cos, sin = rope_tables(rope_inv_freq(8, 10000.0), 4)
    x = np.zeros((2, 1, 8), np.float32)
    with pytest.raises(ValueError, match="positions"):
        apply_rope(x, np.array([0, 4], np.int64), cos, sin)
    with pytest.raises(ValueError, match="head_dim"):
        rope_inv_freq(7, 10000.0)


def test_llama3_scaled_frequencies_equal_transformers():
    """Llama 3.2's RoPE (base 500000, factor 32, low 1, high 4, 8192 original positions) and a table whose
    original context puts frequencies in all three bands: transformers' own llama3 initialiser, to a
    float32 ulp or two."""
    ck.need_torch()
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for d, base, params in ((64, 500000.0, (32.0, 1.0, 4.0, 8192)), (16, 10000.0, (8.0, 1.0, 4.0, 8))):
        factor, low, high, original = params
        rope = {"rope_type": "llama3", "rope_theta": base, "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": original}  # fmt: skip
        cfg = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d, rope_parameters=rope)
        want, scaling = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        got = rope_inv_freq(d, base, params)
        assert scaling == 1.0
        np.testing.assert_allclose(got, want.numpy(), rtol=3e-7)
        assert not np.allclose(got, rope_inv_freq(d, base), rtol=1e-3)  # the scaling changed the table
