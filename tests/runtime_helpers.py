"""Shared by the runtime tests: converted files (each conversion done once per test run, whichever
module asks first), the seed-options checkpoint, transformers references."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from checkpoints import TINY_SHAPES, need_torch

from edge_runtime import format as F
from edge_runtime.spec import spec_from_hf_config

_ROOT = Path(tempfile.mkdtemp(prefix="hy_edge_runtime_tests_"))
atexit.register(shutil.rmtree, _ROOT, True)


@functools.cache
def converted(
    src: Path, fmt: str = "none", granularity: str = "channel", activations: str = "none", lm_head_fp8: bool = False
) -> Path:
    """`src` converted with hy_edge_convert (cached per argument set)."""
    from hy_edge_convert import QuantPolicy, convert

    name = f"{Path(src).name}_{fmt}_{granularity.replace(':', '')}_{activations}_{int(lm_head_fp8)}"
    out = _ROOT / name / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(
        src, out, QuantPolicy(format=fmt, granularity=granularity, activations=activations, lm_head_fp8=lm_head_fp8)
    )
    return out


def make_seed_checkpoint(out: Path, seed: int = 0, tokenizer_from: Path | None = None, **options) -> Path:
    """A tiny hunyuan_v1_dense checkpoint using the seed article's options (transformers has no model
    for them): `options` are config keys such as layer_types, shared_layers, hidden_act. Random
    weights for exactly the tensors format.model_tensors names."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(
        TINY_SHAPES,
        model_type="hunyuan_v1_dense",
        architectures=["HunYuanDenseV1ForCausalLM"],
        hidden_size=48,
        num_hidden_layers=4,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        conv_kernel_size=4,
    )
    cfg.update(options)
    spec = spec_from_hf_config(cfg)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in F.model_tensors(spec).items():
        if len(shape) == 1:
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            std = 0.5 if "conv" in name else 0.08
            tensors[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))
    if tokenizer_from is not None:
        for f in Path(tokenizer_from).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, out / f.name)
    return out


@functools.cache
def hf_model(src: Path):
    """transformers' model for a checkpoint directory, in float32."""
    torch = need_torch()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


def hf_model_with_file_weights(src: Path, onnx_path: Path):
    """transformers' model with the weights the converted file defines (FP8 codes × scales): the
    reference for a quantized file's logits."""
    import copy

    from onnx_weights import dequantized

    torch = need_torch()

    model = copy.deepcopy(hf_model(src))
    weights = {k: torch.from_numpy(v) for k, v in dequantized(onnx_path).items()}
    if F.LM_HEAD in weights and model.config.tie_word_embeddings:  # an FP8 copy of a tied head: untie
        model.lm_head.weight = torch.nn.Parameter(weights[F.LM_HEAD].clone())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in weights:
                p.copy_(weights[name])
    return model


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids, np.int64)[None])).logits[0].float().numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


PROMPT_IDS = [1, 17, 42, 99, 3, 250, 7, 8, 19, 101, 64, 33, 5, 200, 12, 90, 91, 92]
