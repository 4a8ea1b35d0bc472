"""Shared by the runtime tests: converted files (each conversion done once per test run, whichever
module asks first), the seed-options checkpoint, transformers references."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import gc
import json
import mmap
import shutil
import tempfile
import tracemalloc
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from checkpoints import TINY_SHAPES, need_torch
from hy_edge_format import format as F
from hy_edge_format.spec import spec_from_hf_config

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
    # rounded to nearest from amax: the FP8 codes are the encoder's own (code-exact), and no calibration pass
    policy = QuantPolicy(format=fmt, granularity=granularity, activations=activations, lm_head_fp8=lm_head_fp8)
    convert(src, out, dataclasses.replace(policy, rounding="nearest", scales="amax"))
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


NUMPY_TRACE_DOMAIN = 389047  # numpy reports its data buffers to tracemalloc in this domain (NPY_TRACE_DOMAIN)


@dataclass
class Allocated:
    """What a block of code allocated and still holds at its end: `heap` bytes of numpy data buffers
    (traced by tracemalloc in numpy's domain, so the interpreter's own objects and free lists do not
    count) and `mapped` bytes of anonymous mappings made through Python's mmap (the KV and conv caches:
    lazy zero pages, which tracemalloc never sees)."""

    heap: int = 0
    mapped: int = 0

    @property
    def total(self) -> int:
        return self.heap + self.mapped


@contextlib.contextmanager
def allocations(monkeypatch) -> Iterator[Allocated]:
    """Measure `Allocated` over the with-block. Every mmap.mmap made meanwhile is recorded by a subclass
    that keeps a weak reference to each, so that those released before the end do not count."""
    out, maps = Allocated(), []

    class Recorded(mmap.mmap):
        def __new__(cls, *args, **kwargs):
            m = super().__new__(cls, *args, **kwargs)
            maps.append(weakref.ref(m))
            return m

    with monkeypatch.context() as patch:
        patch.setattr(mmap, "mmap", Recorded)
        tracemalloc.start()  # traces only what is allocated from here on
        try:
            yield out
            gc.collect()  # garbage in reference cycles is not held
            held = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, NUMPY_TRACE_DOMAIN)])
            out.heap = sum(t.size for t in held.traces)
            out.mapped = sum(len(m) for m in (ref() for ref in maps) if m is not None and not m.closed)
        finally:
            tracemalloc.stop()


# bytes per cached position of one sequence slot, from the spec alone: K and V rows of every attention
# layer (the KV cache type's row: fp32 4 D, fp16 2 D, fp8 D E4M3 codes and a float32 scale), and each
# dwconv layer's input row (float32 C) kept for truncate()
KV_ROW = {"fp32": lambda d: 4 * d, "fp16": lambda d: 2 * d, "fp8": lambda d: d + 4}


def cached_bytes_per_token(spec, kv_cache: str = "fp32") -> int:
    kv = 2 * len(spec.attention_layers) * spec.num_key_value_heads * KV_ROW[kv_cache](spec.head_dim)
    return kv + len(spec.conv_layers) * spec.hidden_size * 4
