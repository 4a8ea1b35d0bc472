"""Error-compensating rounding (GPTQ) and the scale search, against numpy / ml_dtypes references: round-to-
nearest stays code-exact, GPTQ's layer output on held-out inputs is closer to the float layer's, and the
calibration pass's forward is the numpy reference model's."""

from __future__ import annotations

import json
from pathlib import Path

import checkpoints as ck
import ml_dtypes
import numpy as np
import onnx
import pytest
import reference_model
from hy_edge_convert import QuantPolicy, convert
from hy_edge_convert.calibrate import Calibration
from hy_edge_convert.gptq import Hessian, gptq_round
from hy_edge_convert.quantize import Quantized, quantize_weight
from hy_edge_format import format as F
from hy_edge_format.spec import spec_from_hf_config
from onnx_weights import dequantized, initializers
from runtime_helpers import make_seed_checkpoint

EVAL_TEXT = Path(__file__).resolve().parents[1] / "examples" / "eval" / "text.txt"
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


def reference_codes(w: np.ndarray, block: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest-even E4M3 codes (N, K) and scales (N, G) of w with amax scales, by ml_dtypes."""
    N, K = w.shape
    blocks = w.reshape(N, -1, K if block is None else block)  # (N, G, B)
    scale = (np.abs(blocks).max(axis=2) * np.float32(1.0 / E4M3_MAX)).astype(np.float32)  # (N, G)
    x = (blocks / scale[:, :, None]).astype(np.float32)
    return x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).reshape(N, K), scale


def decoded(q: Quantized, K: int) -> np.ndarray:
    """The weight (N, K) a stored FP8 tensor defines, decoded by ml_dtypes."""
    s = np.asarray(q.scale, np.float32).reshape(q.data.shape[0], -1)
    return q.data.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.repeat(s, K // s.shape[1], axis=1)


def correlated_inputs(rng, T: int, K: int, mix: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """(T, K) activations with correlated channels of unequal size, as a linear's inputs are."""
    return (rng.standard_normal((T, K)).astype(np.float32) @ mix) * gain


@pytest.fixture(scope="module")
def layer():
    """A random linear w (N, K), its calibration inputs' H = X^T X and held-out inputs from the same law."""
    rng = np.random.default_rng(7)
    N, K = 96, 128
    mix = (np.eye(K) + rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32)
    gain = np.exp(rng.standard_normal(K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    calib = correlated_inputs(rng, 2048, K, mix, gain).astype(np.float64)
    held_out = correlated_inputs(rng, 1024, K, mix, gain)
    return w, Hessian(calib.T @ calib), held_out


@pytest.mark.parametrize("granularity,block", [("channel", None), ("block:32", 32)])
def test_nearest_is_code_exact_round_to_nearest_even(layer, granularity, block):
    w, H, _ = layer
    codes, scales = reference_codes(w, block)
    for hessian in (None, H):  # nearest + amax ignores the calibration inputs
        q = quantize_weight("model.layers.0.mlp.up_proj.weight", w, QuantPolicy(granularity=granularity), hessian)
        assert q.storage == "e4m3" and np.array_equal(q.data, codes)
        np.testing.assert_array_equal(np.asarray(q.scale).reshape(scales.shape), scales)


def test_gptq_with_uncorrelated_equal_inputs_is_round_to_nearest(layer):
    w, _, _ = layer
    codes, scales = reference_codes(w, 32)
    assert np.array_equal(gptq_round(w, Hessian(np.eye(w.shape[1])), scales, "e4m3"), codes)


@pytest.mark.parametrize("granularity", ["channel", "block:32"])
def test_gptq_and_scale_search_lower_the_held_out_output_error(layer, granularity):
    w, H, x = layer
    ref = x @ w.T

    def output_error(**policy) -> float:
        q = quantize_weight("model.layers.0.mlp.up_proj.weight", w, QuantPolicy(granularity=granularity, **policy), H)
        return float(np.linalg.norm(x @ decoded(q, w.shape[1]).T - ref))

    nearest = output_error()
    gptq = output_error(rounding="gptq")
    searched = output_error(scales="search")
    both = output_error(rounding="gptq", scales="search")
    assert gptq < 0.8 * nearest
    assert searched < nearest
    assert both < 0.8 * nearest


def test_gptq_leaves_inputs_that_never_fire_to_nearest(layer):
    w, H, _ = layer
    H = H.H.copy()
    H[:, 5] = H[5, :] = 0.0  # input 5 is zero on every calibration token
    codes, scales = reference_codes(w, None)
    out = gptq_round(w, Hessian(H), scales, "e4m3")
    assert np.array_equal(out[:, 5], codes[:, 5])
    assert not np.array_equal(out, codes)


SEED_OPTIONS = dict(
    num_hidden_layers=5,
    hidden_act="relu6",
    layer_types=["attention", "dwconv", "attention", "dwconv", "dwconv"],
    shared_layers=[0, 1, 0, 1, 4],
)  # every option of the seed at once, as in test_convert


def test_calibration_forward_is_the_reference_models(tmp_path):
    """The calibration pass's numpy forward (with float weights kept as they are) gives the lm_head the
    same inputs as tests/reference_model.py: its H is the reference's final normed hidden states'."""
    src = make_seed_checkpoint(tmp_path / "seed", **SEED_OPTIONS)
    spec = spec_from_hf_config(json.loads((src / "config.json").read_text()))
    fp32 = tmp_path / "fp32.onnx"
    convert(src, fp32, QuantPolicy(format="none"))
    weights = dequantized(fp32)
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].astype(np.float16).astype(np.float32)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, spec.vocab_size, (3, 24))
    seen: dict[str, np.ndarray] = {}

    def keep(name: str, w: np.ndarray, H: Hessian) -> Quantized:
        seen[name] = H.H
        return Quantized("fp32", w)

    head = F.LM_HEAD
    calib = Calibration(spec, ids, lambda n: weights[F.EMBED if n == head else n], keep)
    assert calib.take(head).storage == "fp32"
    probe = dict(weights, **{head: np.eye(spec.hidden_size, dtype=np.float32)})  # logits = normed hidden states
    h = np.concatenate([reference_model.forward(spec, probe, row) for row in ids]).astype(np.float64)
    np.testing.assert_allclose(seen[head], h.T @ h, rtol=1e-3, atol=1e-3 * np.abs(h.T @ h).max())
    linears = {n for n, shape in F.model_tensors(spec).items() if F.is_linear(n) and n != F.EMBED}
    assert set(seen) - {head} == linears  # each stored linear once, shared layers by their owner


@pytest.mark.parametrize("which", ["qwen2_dir", "qwen3_dir", "gemma3_dir"])
def test_calibration_forward_of_each_family_is_transformers(which, request):
    """The calibration pass's forward for the families the seed reference does not know (Qwen2's biases,
    Qwen3's q/k norms before RoPE, Gemma 3's (1 + w) sandwich norms, scaled embedding, GeGLU and sliding
    windows) gives the lm_head transformers' final normed hidden states (its embedding rounded to FP16, as
    the runtime's)."""
    import copy

    from runtime_helpers import hf_model

    torch = ck.need_torch()
    src = request.getfixturevalue(which)
    model = copy.deepcopy(hf_model(src))  # hf_model's are shared by other tests: its embedding is changed below
    spec = spec_from_hf_config(json.loads((src / "config.json").read_text()))
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed.copy_(embed.half().float())
        ids = np.random.default_rng(4).integers(0, spec.vocab_size, (2, 12))
        h = model.model(torch.tensor(ids)).last_hidden_state.double().reshape(-1, spec.hidden_size).numpy()
    weights = {n: p.detach().numpy() for n, p in model.state_dict().items()}
    seen: dict[str, np.ndarray] = {}

    def keep(name: str, w: np.ndarray, H: Hessian) -> Quantized:
        seen[name] = H.H
        return Quantized("fp32", w)

    calib = Calibration(spec, ids, lambda n: weights[F.EMBED if n == F.LM_HEAD else n], keep)
    calib.take(F.LM_HEAD)
    np.testing.assert_allclose(seen[F.LM_HEAD], h.T @ h, rtol=1e-3, atol=1e-3 * np.abs(h.T @ h).max())


def test_gptq_conversion_is_closer_to_the_float_model(llama_dir, tmp_path):
    """End to end on a tiny Llama: on held-out text (the evaluation text, never the calibration text) the
    calibrated file's logits are closer to the fp32 conversion's than round-to-nearest's; the file records
    how it was rounded."""
    import edge_runtime
    from edge_runtime.engine.ort_session import OrtSession

    logits, ids = {}, None
    for name, policy in {
        "fp32": QuantPolicy(format="none"),
        "nearest": QuantPolicy(rounding="nearest", scales="amax"),
        "gptq": QuantPolicy(),  # the default: this checkpoint has a tokenizer, so gptq with searched scales
    }.items():
        out = tmp_path / f"{name}.onnx"
        convert(llama_dir, out, policy)
        if ids is None:
            ids = np.asarray(edge_runtime.load(out).tokenizer.encode(EVAL_TEXT.read_text()[:2000]), np.int64)[:200]
        logits[name] = OrtSession(out).forward(ids, all_logits=True)
    quant = json.loads(F.metadata(onnx.load(str(out), load_external_data=False))[F.META_QUANT])
    assert quant["rounding"] == "gptq" and quant["scales"] == "search" and quant["calibration"]["sequences"] > 0
    err = {n: float(np.linalg.norm(logits[n] - logits["fp32"])) for n in ("nearest", "gptq")}
    assert 0 < err["gptq"] < 0.8 * err["nearest"]


def test_fp8_release_keeps_its_bytes_under_gptq(fp8_dir, tmp_path):
    """An FP8 checkpoint's linears are carried byte for byte whatever the rounding; only the head copy of
    its bf16 embedding is rounded from the calibration inputs."""
    torch = ck.need_torch()
    from safetensors import safe_open

    out = tmp_path / "model.onnx"
    report = convert(fp8_dir, out, QuantPolicy(rounding="gptq", scales="search"))
    arrays, _ = initializers(out)
    with safe_open(fp8_dir / "model.safetensors", "pt") as f:
        linears = [n for n in f.keys() if n.endswith("_proj.weight")]
        for name in linears:
            assert np.array_equal(arrays[name + F.QWEIGHT], f.get_tensor(name).view(torch.uint8).numpy()), name
            assert report.tensors[name].get("carried")
    assert linears and report.tensors[F.LM_HEAD]["storage"] == "e4m3"


def test_gguf_blocks_are_kept_and_requantized_blocks_calibrated(gguf_llama, tmp_path):
    """--format source keeps a GGUF's Q4_1 blocks, so there is nothing to calibrate; --format e4m3
    re-quantizes them from their float values, and then the rounding is calibrated."""
    src = gguf_llama["Q4_1"]
    kept = convert(src, tmp_path / "kept.onnx", QuantPolicy(rounding="gptq"))
    assert kept.calibration is None
    assert {t["storage"] for n, t in kept.tensors.items() if n.endswith("_proj.weight")} == {"uint4"}
    fp8 = convert(src, tmp_path / "fp8.onnx", QuantPolicy(format="e4m3", rounding="gptq"))
    assert fp8.calibration is not None and fp8.calibration["sequences"] > 0
    assert {t["storage"] for n, t in fp8.tensors.items() if n.endswith("_proj.weight")} == {"e4m3"}


def test_calibration_without_a_tokenizer_is_refused_before_writing(tmp_path):
    from hy_edge_format.errors import HyEdgeError

    src = make_seed_checkpoint(tmp_path / "seed")  # weights and config only
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(HyEdgeError, match="tokenizer"):
        convert(src, out_dir / "m.onnx", QuantPolicy(rounding="gptq"))
    assert list(out_dir.iterdir()) == []
    report = convert(src, out_dir / "m.onnx", QuantPolicy())  # the default falls back to nearest, and says so
    assert report.calibration is None and any("no tokenizer" in n for n in report.notes), report.notes
    quant = json.loads(F.metadata(onnx.load(str(out_dir / "m.onnx"), load_external_data=False))[F.META_QUANT])
    assert (quant["rounding"], quant["scales"]) == ("nearest", "amax")


def test_default_rounding_is_decided_per_checkpoint(fp8_dir, gguf_llama, tmp_path):
    """`auto`: gptq with searched scales where floats are rounded and a tokenizer can run the calibration
    text; nearest from amax where nothing is rounded from floats (blocks kept, FP8 bytes carried) or when
    asked; an explicit choice is kept as asked."""
    from hy_edge_convert.checkpoint import open_checkpoint
    from hy_edge_convert.pipeline import resolve_policy

    def resolved(src, policy):
        with open_checkpoint(src) as ckpt:
            p = resolve_policy(ckpt, F.model_tensors(spec_from_hf_config(ckpt.config)), policy)
        return p.rounding, p.scales

    q41 = gguf_llama["Q4_1"]
    assert resolved(q41, QuantPolicy()) == ("nearest", "amax")  # every linear kept as its blocks
    assert resolved(q41, QuantPolicy(format="e4m3")) == ("gptq", "search")
    assert resolved(q41, QuantPolicy(format="e4m3", rounding="nearest")) == ("nearest", "amax")
    assert resolved(q41, QuantPolicy(format="e4m3", scales="amax")) == ("gptq", "amax")
    assert resolved(q41, QuantPolicy(format="none")) == ("nearest", "amax")
    assert resolved(fp8_dir, QuantPolicy(lm_head_fp8=False)) == ("nearest", "amax")  # FP8 bytes carried


def test_calibration_text_is_disjoint_from_the_evaluation_texts():
    """No run of 8 words of an evaluation text (examples/eval/*.txt) appears in the calibration text: no
    conversion is scored on what it was calibrated on."""
    from hy_edge_convert.calibrate import CALIBRATION_TEXT

    def runs(text: str) -> set[tuple[str, ...]]:
        words = text.lower().split()
        return {tuple(words[i : i + 8]) for i in range(len(words) - 7)}

    calibration = CALIBRATION_TEXT.read_text(encoding="utf-8")
    assert len(calibration.split()) > 10_000
    texts = sorted(EVAL_TEXT.parent.glob("*.txt"))
    assert EVAL_TEXT in texts
    calibrated = runs(calibration)
    for path in texts:
        assert not runs(path.read_text(encoding="utf-8")) & calibrated, path.name


def test_inputs_that_overflow_give_no_second_moment():
    """Calibration inputs whose X^T X overflows (a checkpoint with huge values) give no H, so that linear is
    rounded without them (and the converter says so), instead of GPTQ on infinities."""
    from hy_edge_convert.calibrate import second_moment

    assert second_moment(np.full((4, 3), 1e20, np.float32)) is None
    H = second_moment(np.ones((4, 3), np.float32))
    assert H is not None and np.array_equal(H.H, np.full((3, 3), 4.0))
