"""Sub-byte FP weights (FP4 E2M1, FP6 E3M2 / E2M3 with a half scale per block of 32): the encoder against
ml_dtypes, the packed layout, GPTQ onto their grids, and converted files on both backends against
transformers loading the file's own weights."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from hy_edge_ops import minifloat
from runtime_helpers import PROMPT_IDS, hf_logits, hf_model, hf_model_with_file_weights, rel_err

import edge_runtime
from edge_runtime.cli import main

ML = {"e2m1": ml_dtypes.float4_e2m1fn, "e3m2": ml_dtypes.float6_e3m2fn, "e2m3": ml_dtypes.float6_e2m3fn}
FORMATS = tuple(ML)


@pytest.mark.parametrize("fmt", FORMATS)
def test_encoder_matches_ml_dtypes(fmt):
    n_codes = 1 << minifloat.BITS[fmt]
    codes = np.arange(n_codes, dtype=np.uint8)
    assert np.array_equal(minifloat.values(fmt), codes.view(ML[fmt]).astype(np.float32))
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 96)) * 4).astype(np.float32)
    mags = np.unique(np.abs(minifloat.values(fmt)))
    ties = ((mags[1:] + mags[:-1]) / 2).astype(np.float32)  # halfway: ties go to the even code
    w[0, : len(ties)] = ties
    w[1, : len(ties)] = -ties
    w[2, :4] = [1e6, -1e6, 0.0, -0.0]  # saturating; zeros
    d = (rng.uniform(0.5, 2.0, (8, 3)).astype(np.float16)).astype(np.float32)
    d[0] = d[1] = 1.0
    d[3, 1] = 0.0  # a zero scale: zero codes
    got = minifloat.quantize(w, d, fmt)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = w / np.repeat(d, 32, axis=1)
    want = scaled.astype(ML[fmt]).view(np.uint8) & (n_codes - 1)
    want[3, 32:64] = 0
    got[2, 3] &= n_codes // 2 - 1  # -0.0: either zero code is zero
    want[2, 3] &= n_codes // 2 - 1
    assert np.array_equal(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_layout(fmt):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 1 << minifloat.BITS[fmt], (3, 64), dtype=np.uint8)
    packed = minifloat.pack(codes, fmt)
    assert packed.shape == (3, 2 * minifloat.BLOCK_BYTES[fmt])
    block = packed[2, minifloat.BLOCK_BYTES[fmt] :]  # row 2, block 1: codes 32 .. 63
    c = codes[2, 32:].astype(np.int64)
    assert block[5] == (c[5] & 15) | ((c[21] & 15) << 4)
    if fmt != "e2m1":
        assert block[16 + 3] == (c[3] >> 4) | ((c[11] >> 4) << 2) | ((c[19] >> 4) << 4) | ((c[27] >> 4) << 6)
    assert np.array_equal(minifloat.unpack(packed, fmt), codes)


def test_compensated_rounding():
    """With no correlation between inputs (u diagonal) GPTQ's loop is round-to-nearest; with correlated
    inputs it lowers the output error tr(E H E^T) below round-to-nearest's."""
    rng = np.random.default_rng(2)
    K = 64
    w = rng.standard_normal((16, K)).astype(np.float32)
    d = (np.abs(w).reshape(16, 2, 32).max(axis=2) / 6).astype(np.float16).astype(np.float32)
    order = np.arange(K, dtype=np.int64)
    u = np.diag(rng.uniform(0.5, 2, K)).astype(np.float32)
    assert np.array_equal(minifloat.quantize_compensated(w, d, u, order, "e2m1"), minifloat.quantize(w, d, "e2m1"))
    x = rng.standard_normal((512, K)) @ rng.standard_normal((K, K)) * 0.3 + rng.standard_normal((512, K))
    from hy_edge_convert.gptq import Hessian

    h = Hessian(x.T @ x)
    order, U = h.factor
    gptq = minifloat.quantize_compensated(w, d, U, order, "e2m1")

    def out_err(codes):
        e = minifloat.dequantize(codes, d, "e2m1") - w
        return float(np.einsum("nk,kl,nl->", e, h.H, e))

    assert out_err(gptq) < 0.8 * out_err(minifloat.quantize(w, d, "e2m1"))


def test_bad_arguments_raise():
    w = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="fmt"):
        minifloat.quantize(w, np.ones((2, 2), np.float32), "e1m2")
    with pytest.raises(ValueError, match="d must be"):
        minifloat.quantize(w, np.ones((2, 3), np.float32), "e2m1")
    with pytest.raises(ValueError, match="K a multiple"):
        minifloat.quantize(np.zeros((2, 48), np.float32), np.ones((2, 1), np.float32), "e2m1")


def _convert(src, out, fmt, *extra):
    result = CliRunner().invoke(
        main,
        ["convert", str(src), "-o", str(out), "--format", fmt, "--rounding", "nearest", "--scales", "amax", *extra],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_subbyte_file_on_both_backends(llama_dir, tmp_path, fmt):
    """Every linear of the tiny Llama (K = 64 or 96: whole blocks) in `fmt`: numba and onnxruntime give the
    logits transformers gives with the file's weights, and those approximate the original model."""
    path = _convert(llama_dir, tmp_path / "m.onnx", fmt)
    model = edge_runtime.load(path)
    layer = model.weights.layers[0]
    assert {lin.storage for lin in (layer.q_proj, layer.down_proj, model.weights.lm_head)} == {fmt}
    nb = model.session("numba").forward(PROMPT_IDS, all_logits=True)
    ort = model.session("onnxruntime").forward(PROMPT_IDS, all_logits=True)
    ref = hf_logits(hf_model_with_file_weights(llama_dir, path), PROMPT_IDS)
    assert rel_err(nb, ref) < 1e-4
    assert rel_err(ort, ref) < 1e-4
    assert rel_err(nb, hf_logits(hf_model(llama_dir), PROMPT_IDS)) < (0.5 if fmt == "e2m1" else 0.2)


def _q8_hooks(model, torch) -> None:
    """Round every linear's input to int8 per block of 32 (torch.round: half to even), in float32."""
    tiny = float(np.finfo(np.float32).tiny)

    def round_input(module, args):
        (x,) = args
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        s = torch.clamp(blocks.abs().amax(-1, keepdim=True) / 127.0, min=tiny)
        return (torch.round(blocks / s) * s).reshape(x.shape)

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(round_input)


@pytest.mark.parametrize("fmt", ["e2m1", "e2m3"])
def test_q8_inputs_on_both_backends(llama_dir, tmp_path, fmt):
    """--activations q8: every linear's input rounded to int8 per block of 32. numba (integer dots, in the
    compiled layer loop; prefill and one token at a time) and onnxruntime (the rounding in the graph's
    float32 ops) agree, and give transformers' logits with the file's weights and inputs rounded the same
    way, which differ from float inputs'. An input that lands within float32 noise of a rounding tie can
    round the other way in transformers' float order and move that token's logits and the later ones (here
    the last two of e2m1's 18), so transformers is matched on the first 8 tokens."""
    import torch

    path = _convert(llama_dir, tmp_path / "m.onnx", fmt, "--activations", "q8")
    model = edge_runtime.load(path)
    assert model.activations == "q8"
    session = model.session("numba")
    assert session._compiled is not None
    nb = session.forward(PROMPT_IDS, all_logits=True)
    session.reset()
    steps = [session.forward(PROMPT_IDS[:3], all_logits=True)[-1]]  # the grouped kernel
    steps += [session.forward([t], all_logits=True)[-1] for t in PROMPT_IDS[3:]]  # the one-token kernels
    ort = model.session("onnxruntime").forward(PROMPT_IDS, all_logits=True)
    plain = hf_model_with_file_weights(llama_dir, path)
    float_inputs = hf_logits(plain, PROMPT_IDS)
    _q8_hooks(plain, torch)
    ref = hf_logits(plain, PROMPT_IDS)
    assert rel_err(ort, nb) < 1e-4
    assert rel_err(np.stack(steps), nb[2:]) < 1e-4
    assert rel_err(ref[:8], float_inputs[:8]) > 1e-3
    assert rel_err(nb[:8], ref[:8]) < 1e-4


def test_q8_inputs_with_a_float_input_linear(llama_dir, tmp_path):
    """In a mix, q8 applies to the FP4 / FP6 E2M3 linears only: an E4M3 head keeps float inputs, and both
    backends agree."""
    path = _convert(
        llama_dir, tmp_path / "m.onnx", "e2m1", "--tensor-format", "lm_head.weight=e4m3", "--activations", "q8"
    )
    model = edge_runtime.load(path)
    session = model.session("numba")
    assert session._head.ops[0].activations == "none"
    assert {g.ops[0].activations for blk in session._blocks for g, _ in blk.gate_up} == {"q8"}
    nb = session.forward(PROMPT_IDS, all_logits=True)
    assert rel_err(model.session("onnxruntime").forward(PROMPT_IDS, all_logits=True), nb) < 1e-4


def test_tensor_formats_mix(llama_dir, tmp_path):
    """--tensor-format gives matching linears their own format; the rest keep --format's."""
    path = _convert(
        llama_dir,
        tmp_path / "m.onnx",
        "e2m1",
        "--tensor-format",
        "lm_head.weight=e4m3",
        "--tensor-format",
        "*down_proj*=e2m3",
    )
    model = edge_runtime.load(path)
    layer = model.weights.layers[1]
    assert (layer.q_proj.storage, layer.down_proj.storage, model.weights.lm_head.storage) == ("e2m1", "e2m3", "e4m3")
    nb = model.session("numba").forward(PROMPT_IDS, all_logits=True)
    assert rel_err(nb, hf_logits(hf_model_with_file_weights(llama_dir, path), PROMPT_IDS)) < 1e-4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--format", "e2m1", "--granularity", "block:64"], "scaled per block of 32"),
        (["--tensor-format", "lm_head.weight"], "is not PATTERN=FORMAT"),
        (["--tensor-format", "lm_head.weight=q4"], "'q4' is not one of"),
        (["--format", "e4m3", "--activations", "q8"], "--activations q8 rounds the inputs of FP4 / FP6"),
        (["--format", "e3m2", "--activations", "q8"], "--format e3m2 makes none"),
        (["--format", "auto", "--activations", "q8"], "--format auto without --bits makes none"),
    ],
)
def test_bad_options_are_one_line_errors(llama_dir, tmp_path, args, message):
    result = CliRunner().invoke(main, ["convert", str(llama_dir), "-o", str(tmp_path / "m.onnx"), *args])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def _storages(path) -> dict[str, str]:
    import json

    import onnx
    from hy_edge_format import format as F

    meta = F.metadata(onnx.load(str(path), load_external_data=False))
    return json.loads(meta[F.META_QUANT])


@pytest.mark.parametrize("bits", [4.5, 5.5, 16])
def test_bits_budget(llama_dir, tmp_path, bits):
    """--format auto --bits B: the linears' stored bits per weight, counted from the file, stay within B;
    the least budget is FP4 everywhere, and a budget with room for all moves every kind whose measured KL
    falls with it off FP4. The file runs on both backends as transformers does with its weights."""
    from hy_edge_convert.allocate import bits_per_weight

    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(
        main, ["convert", str(llama_dir), "-o", str(out), "--format", "auto", "--bits", str(bits)]
    )
    assert result.exit_code == 0, result.output
    quant = _storages(out)
    linears = {n: t for n, t in quant["tensors"].items() if n.endswith("_proj.weight") or n == "lm_head.weight"}
    assert {t["storage"] for t in linears.values()} <= {"e2m1", "e2m3", "e4m3"}
    shapes = {n: tuple(t["shape"]) for n, t in linears.items()}
    n_weights = {
        n: (s[0], s[1] if t["storage"] == "e4m3" else s[1] * 32 // (16 if t["storage"] == "e2m1" else 24))
        for (n, s), t in zip(shapes.items(), linears.values(), strict=True)
    }
    used = sum(bits_per_weight(t["storage"], n_weights[n]) * np.prod(n_weights[n]) for n, t in linears.items())
    assert used <= bits * sum(np.prod(s) for s in n_weights.values()) + 1e-6
    if bits == 4.5:
        assert {t["storage"] for t in linears.values()} == {"e2m1"}
    info = CliRunner().invoke(main, ["info", str(out)])
    assert info.exit_code == 0
    assert f"format auto, granularity channel, activations none, bits {float(bits)}," in info.output
    kl = quant["allocation"]["kl"]
    if bits == 16:
        for n, t in linears.items():
            k = n.split(".", 3)[-1] if n.startswith("model.layers.") else n
            assert (t["storage"] == "e2m1") == (kl[k]["e2m3"] >= kl[k]["e2m1"] and kl[k]["e4m3"] >= kl[k]["e2m1"])
    model = edge_runtime.load(out)
    nb = model.session("numba").forward(PROMPT_IDS, all_logits=True)
    assert rel_err(nb, hf_logits(hf_model_with_file_weights(llama_dir, out), PROMPT_IDS)) < 1e-4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--format", "auto", "--bits", "4"], "value from 4.5 to 16"),
        (["--format", "e4m3", "--bits", "6"], "needs --format auto"),
    ],
)
def test_bad_bits(llama_dir, tmp_path, args, message):
    result = CliRunner().invoke(main, ["convert", str(llama_dir), "-o", str(tmp_path / "m.onnx"), *args])
    assert result.exit_code == 2 and message in result.output


def test_weight_beyond_a_half_scale_is_refused():
    """A block whose scale would not fit a half is refused in one line, not clipped."""
    from hy_edge_convert import QuantPolicy
    from hy_edge_convert.quantize import quantize_weight
    from hy_edge_format.errors import HyEdgeError

    w = np.zeros((2, 64), np.float32)
    w[1, 40] = 1e6  # 1e6 / 6 > 65504
    with pytest.raises(HyEdgeError, match="beyond what e2m1 with a half scale holds"):
        quantize_weight("model.layers.0.mlp.down_proj.weight", w, QuantPolicy(format="e2m1", rounding="nearest"))
    w[1, 40] = 3e5  # within: 3e5 / 6 = 5e4
    q = quantize_weight("model.layers.0.mlp.down_proj.weight", w, QuantPolicy(format="e2m1", rounding="nearest"))
    assert q.storage == "e2m1" and np.isfinite(q.scale.astype(np.float32)).all()
