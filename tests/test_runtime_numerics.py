"""Logits of the numba backend against transformers and against the onnxruntime backend, on tiny
checkpoints converted by hy_edge_convert."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import (
    PROMPT_IDS,
    converted,
    hf_logits,
    hf_model,
    hf_model_with_file_weights,
    make_seed_checkpoint,
    rel_err,
)

import edge_runtime


def both_backends(path, ids, **session):
    model = edge_runtime.load(path)
    nb = model.session("numba", **session).forward(ids, all_logits=True)
    ort = model.session("onnxruntime").forward(ids, all_logits=True)
    return nb, ort


@pytest.mark.parametrize(
    "which", ["hunyuan_f32_dir", "hunyuan_dir", "llama_dir", "qwen2_dir", "qwen3_dir", "gemma3_dir", "mistral_dir"]
)
def test_unquantized_matches_transformers(which, request):
    src = request.getfixturevalue(which)
    nb, ort = both_backends(converted(src, "none"), PROMPT_IDS, prefill_chunk=5)
    ref = hf_logits(hf_model(src), PROMPT_IDS)
    assert rel_err(nb, ref) < 1e-4
    assert rel_err(ort, ref) < 1e-4


@pytest.mark.parametrize(
    "fmt,granularity", [("e4m3", "channel"), ("e5m2", "tensor"), ("e4m3", "block:16"), ("auto", "channel")]
)
def test_fp8_backends_agree_and_match_dequantized_reference(hunyuan_f32_dir, fmt, granularity):
    path = converted(hunyuan_f32_dir, fmt, granularity)
    nb, ort = both_backends(path, PROMPT_IDS)
    assert rel_err(nb, ort) < 1e-5  # same bytes, same dequantization
    ref = hf_logits(hf_model_with_file_weights(hunyuan_f32_dir, path), PROMPT_IDS)
    assert rel_err(nb, ref) < 1e-4
    # and FP8 is an approximation of the original, not something else
    assert rel_err(nb, hf_logits(hf_model(hunyuan_f32_dir), PROMPT_IDS)) < 0.2


@pytest.mark.parametrize("which", ["llama_dir", "qwen2_dir", "qwen3_dir", "gemma3_dir", "mistral_dir"])
def test_other_families_fp8(which, request):
    """The FP8 file of each family gives, on both backends, what transformers' own class gives with the
    file's weights (Llama with an untied head; Qwen2's biases and Qwen3's q/k norms stay float)."""
    src = request.getfixturevalue(which)
    path = converted(src, "e4m3")
    nb, ort = both_backends(path, PROMPT_IDS)
    assert rel_err(nb, ort) < 1e-5
    assert rel_err(nb, hf_logits(hf_model_with_file_weights(src, path), PROMPT_IDS)) < 1e-4


def test_tied_head_with_fp8_copy(hunyuan_f32_dir):
    path = converted(hunyuan_f32_dir, "e4m3", lm_head_fp8=True)
    model = edge_runtime.load(path)
    assert model.weights.lm_head is not None and model.weights.lm_head.storage == "e4m3"
    nb, ort = both_backends(path, PROMPT_IDS)
    assert rel_err(nb, ort) < 1e-5
    assert rel_err(nb, hf_logits(hf_model_with_file_weights(hunyuan_f32_dir, path), PROMPT_IDS)) < 1e-4


def test_compressed_tensors_fp8_checkpoint(fp8_dir):
    from checkpoints import fp8_reference_model

    path = converted(fp8_dir, "e4m3")
    nb, ort = both_backends(path, PROMPT_IDS)
    assert rel_err(nb, ort) < 1e-5
    assert rel_err(nb, hf_logits(fp8_reference_model(fp8_dir), PROMPT_IDS)) < 1e-4


@pytest.mark.parametrize(
    "activations,src", [("e4m3", "hunyuan_f32_dir"), ("e5m2", "hunyuan_f32_dir"), ("static", "fp8_dir")]
)
def test_activation_fake_quant_matches_onnxruntime(activations, src, request):
    path = converted(request.getfixturevalue(src), "e4m3", activations=activations)
    assert edge_runtime.load(path).activations == activations
    nb, ort = both_backends(path, PROMPT_IDS)
    plain, _ = both_backends(converted(request.getfixturevalue(src), "e4m3"), PROMPT_IDS)
    assert rel_err(nb, ort) < 1e-4
    assert rel_err(nb, plain) > 1e-6  # the fake quantization did happen


SEED_OPTIONS = {
    "dwconv": dict(layer_types=["dwconv", "attention", "dwconv", "attention"]),
    "shared": dict(shared_layers=[0, 1, 1, 0]),
    "relu6": dict(hidden_act="relu6"),
    "all": dict(
        layer_types=["dwconv", "dwconv", "attention", "attention"], shared_layers=[0, 0, 2, 2], hidden_act="relu6"
    ),
}


@pytest.fixture(scope="module", params=list(SEED_OPTIONS))
def seed_ckpt(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"seed_{request.param}")
    return make_seed_checkpoint(out, **SEED_OPTIONS[request.param])


@pytest.mark.parametrize("fmt", ["none", "e4m3"])
def test_seed_options_against_numpy_reference_and_onnxruntime(seed_ckpt, fmt):
    from onnx_weights import dequantized
    from reference_model import forward

    path = converted(seed_ckpt, fmt)
    model = edge_runtime.load(path)
    nb, ort = both_backends(path, PROMPT_IDS, prefill_chunk=7)
    ref = forward(model.spec, dequantized(path), np.asarray(PROMPT_IDS))
    assert rel_err(nb, ort) < 1e-5
    assert rel_err(nb, ref) < 1e-4
