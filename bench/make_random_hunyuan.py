"""Write a Hunyuan-0.5B-Instruct-shaped checkpoint with deterministic random weights.

The real weights cannot be downloaded here; speed and memory only depend on the shapes. The config uses
the legacy Tencent keys of the public release; `--fp8` writes the compressed-tensors layout of
Hunyuan-0.5B-Instruct-FP8 instead (float8_e4m3fn weight + weight_scale [1] + input_scale [1]).
`--family NAME` writes the shapes of another supported model instead (FAMILY_CONFIGS: the sizes of its
published config.json), its tensors the ones the converter asks for (hy_edge_format.format.model_tensors).

    python bench/make_random_hunyuan.py OUT_DIR [--fp8] [--layers 24] [--family qwen3-0.6b]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

import numpy as np

CONFIG = {
    "architectures": ["HunYuanDenseV1ForCausalLM"],
    "model_type": "hunyuan_v1_dense",
    "vocab_size": 120818,
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "attention_head_dim": 128,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "alpha": 1000.0,
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "type": "dynamic",
    },
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "use_qk_norm": True,
    "use_cla": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "bfloat16",
}

# the published config.json sizes of the other families' small models (bench/families.py)
_SHARED = {"hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 1,
           "eos_token_id": 2, "pad_token_id": 0}  # fmt: skip
FAMILY_CONFIGS = {
    "qwen2.5-0.5b": {
        **_SHARED, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    },
    "qwen3-0.6b": {
        **_SHARED, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
    },
    "llama-3.2-1b": {
        **_SHARED, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    "gemma-3-1b": {
        **_SHARED, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
        "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "sliding_window": 512, "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
    },
}  # fmt: skip

FP8_QUANT = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False},
            "input_activations": {
                "num_bits": 8,
                "type": "float",
                "strategy": "tensor",
                "symmetric": True,
                "dynamic": False,
            },
            "targets": ["Linear"],
        }
    },
    "ignore": ["lm_head"],
}


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    if cfg["model_type"] != "hunyuan_v1_dense":  # the tensors the converter asks of that family
        from hy_edge_format import format as F
        from hy_edge_format.spec import spec_from_hf_config

        return F.model_tensors(spec_from_hf_config(cfg))
    C, F, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], C)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out.update(
            {
                f"{p}.input_layernorm.weight": (C,),
                f"{p}.post_attention_layernorm.weight": (C,),
                f"{p}.self_attn.q_proj.weight": (H * D, C),
                f"{p}.self_attn.k_proj.weight": (Hkv * D, C),
                f"{p}.self_attn.v_proj.weight": (Hkv * D, C),
                f"{p}.self_attn.o_proj.weight": (C, H * D),
                f"{p}.self_attn.query_layernorm.weight": (D,),
                f"{p}.self_attn.key_layernorm.weight": (D,),
                f"{p}.mlp.gate_proj.weight": (F, C),
                f"{p}.mlp.up_proj.weight": (F, C),
                f"{p}.mlp.down_proj.weight": (C, F),
            }
        )
    out["model.norm.weight"] = (C,)
    return out


def to_bf16(x: np.ndarray) -> bytes:
    bits = x.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
    return (rounded >> 16).astype("<u2").tobytes()


def to_e4m3(x: np.ndarray) -> bytes:
    import ml_dtypes  # dev dependency, like this script

    return np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8).tobytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--fp8", action="store_true", help="compressed-tensors FP8 layout")
    ap.add_argument("--layers", type=int, default=None, help="default: the model's own (Hunyuan-0.5B: 24)")
    ap.add_argument("--family", choices=sorted(FAMILY_CONFIGS), help="another family's shapes")
    args = ap.parse_args()
    cfg = dict(FAMILY_CONFIGS[args.family] if args.family else CONFIG)
    cfg["num_hidden_layers"] = args.layers or cfg["num_hidden_layers"]
    if args.fp8:
        cfg["quantization_config"] = FP8_QUANT
    rng = np.random.default_rng(0)
    header, blobs, offset = {}, [], 0

    def put(name: str, dtype: str, shape: tuple[int, ...], data: bytes) -> None:
        nonlocal offset
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)

    for name, shape in shapes(cfg).items():
        if name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[1] ** -0.5)
        if args.fp8 and name.endswith("_proj.weight"):
            scale = np.float32(np.abs(w).max() / 448.0)
            put(name, "F8_E4M3", shape, to_e4m3(w / scale))
            put(name[: -len("weight")] + "weight_scale", "F32", (1,), np.float32([scale]).tobytes())
            put(name[: -len("weight")] + "input_scale", "F32", (1,), np.float32([0.05]).tobytes())
        else:
            put(name, "BF16", shape, to_bf16(w))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(header).encode()
    meta += b" " * (-len(meta) % 8)
    tmp = args.out / "model.safetensors.partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(meta)))
        f.write(meta)
        for b in blobs:
            f.write(b)
    os.replace(tmp, args.out / "model.safetensors")
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"wrote {args.out} ({offset / 1e9:.2f} GB of tensors)")


if __name__ == "__main__":
    main()
