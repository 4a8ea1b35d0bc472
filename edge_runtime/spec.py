"""ModelSpec: the one description of an architecture that every later stage reads.

Field names are the Hugging Face `config.json` keys, verbatim, so no translation layer exists; unknown
keys are dropped. Two families are understood — `hunyuan_v1_dense` (legacy Tencent keys and the
transformers 5 `rope_parameters` form) and `llama` — plus the seed article's architecture options,
which have their own config keys:

- `layer_types`: per layer `"attention"` or `"dwconv"` (per-channel causal conv over time with kernel
  `conv_kernel_size`, followed by a pointwise projection, in place of attention);
- `shared_layers`: `shared_layers[i] = j` makes layer i reuse layer j's weights (j <= i, same type);
- `hidden_act: "relu6"`: the gated MLP uses min(max(gate, 0), 6) instead of SiLU.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import SpecError

LAYER_TYPES = ("attention", "dwconv")
ACTIVATIONS = ("silu", "relu6")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str  # "hunyuan_v1_dense" | "llama"
    vocab_size: int  # V
    hidden_size: int  # C
    intermediate_size: int  # MLP width
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hkv
    head_dim: int  # D (Hunyuan-0.5B: H*D = 2048 != C = 1024)
    rms_norm_eps: float
    rope_theta: float  # the effective RoPE base (Hunyuan alpha already folded in)
    max_position_embeddings: int
    tie_word_embeddings: bool
    use_qk_norm: bool  # per-head RMSNorm on q and k, after RoPE (HunYuanDenseV1Attention)
    hidden_act: str  # "silu" | "relu6"
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]
    pad_token_id: int | None
    layer_types: tuple[str, ...]  # (L,) "attention" | "dwconv"
    conv_kernel_size: int  # k of dwconv layers; their state keeps the last k-1 inputs
    shared_layers: tuple[int, ...]  # (L,) index of the layer whose weights layer i uses

    # -- derived -------------------------------------------------------------------------------
    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "attention")

    @property
    def conv_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "dwconv")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"model spec is not valid JSON: {e}") from None
        return _build(data)


# -- construction from a Hugging Face config ---------------------------------------------------


def _get(cfg: dict, key: str, kind: type, default: Any = ...) -> Any:
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise SpecError(f"config.json: missing field '{key}'")
        return default
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(f"config.json: field '{key}' should be {kind.__name__}, got {value!r}")
    return value


def _eos(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise SpecError(f"config.json: field 'eos_token_id' should be an int or a list of ints, got {value!r}")


def _rope_base(cfg: dict, head_dim: int) -> float:
    """The static RoPE base. Hunyuan's 'dynamic' scaling with a fixed alpha only stretches the base:
    theta * alpha ** (d / (d - 2)) (transformers' compute_ntk_alpha_rope_parameters)."""
    params = cfg.get("rope_parameters")  # transformers 5 form: theta inside
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = params
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise SpecError(f"config.json: field 'rope_scaling' should be an object, got {scaling!r}")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise SpecError(f"config.json: field 'rope_theta' should be a positive number, got {theta!r}")
    alpha = scaling.get("alpha")
    if alpha is not None and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0):
        raise SpecError(f"config.json: field 'rope_scaling.alpha' should be a positive number, got {alpha!r}")
    if rope_type == "dynamic" and alpha:
        return float(theta) * float(alpha) ** (head_dim / (head_dim - 2))
    if rope_type in ("default", None):
        return float(theta)
    raise SpecError(f"config.json: field 'rope_scaling' type '{rope_type}' is not supported")


def _common(cfg: dict) -> dict:
    hidden = _get(cfg, "hidden_size", int)
    heads = _get(cfg, "num_attention_heads", int)
    head_dim = _get(cfg, "head_dim", int, None) or _get(cfg, "attention_head_dim", int, None) or hidden // max(heads, 1)
    for key in ("layer_types", "shared_layers"):
        if cfg.get(key) is not None and not isinstance(cfg[key], list):
            raise SpecError(f"config.json: field '{key}' should be a list, got {cfg[key]!r}")
    layers = _get(cfg, "num_hidden_layers", int)
    if cfg.get("attention_bias"):
        raise SpecError("config.json: field 'attention_bias' = true is not supported")
    if cfg.get("mlp_bias"):
        raise SpecError("config.json: field 'mlp_bias' = true is not supported")
    return dict(
        vocab_size=_get(cfg, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=_get(cfg, "intermediate_size", int),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=_get(cfg, "num_key_value_heads", int, heads),
        head_dim=int(head_dim),
        rms_norm_eps=_get(cfg, "rms_norm_eps", float, 1e-6),
        rope_theta=_rope_base(cfg, int(head_dim)),
        max_position_embeddings=_get(cfg, "max_position_embeddings", int, 2048),
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", bool, False),
        hidden_act=_get(cfg, "hidden_act", str, "silu"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=_eos(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"),
        layer_types=tuple(cfg.get("layer_types") or ("attention",) * layers),
        conv_kernel_size=_get(cfg, "conv_kernel_size", int, 3),
        shared_layers=tuple(cfg.get("shared_layers") or range(layers)),
    )


def _hunyuan(cfg: dict) -> dict:
    for key, bad in (("use_cla", True), ("use_mixed_mlp_moe", True)):
        if cfg.get(key) is bad:
            raise SpecError(f"config.json: field '{key}' = true is not supported")
    experts = cfg.get("num_experts", 1)
    if isinstance(experts, int) and experts > 1:
        raise SpecError("config.json: field 'num_experts' > 1 (MoE) is not supported")
    # transformers' HunYuanDenseV1Attention always has query/key layernorms; legacy configs say so
    # with use_qk_norm.
    return dict(model_type="hunyuan_v1_dense", use_qk_norm=bool(cfg.get("use_qk_norm", True)), **_common(cfg))


def _llama(cfg: dict) -> dict:
    return dict(model_type="llama", use_qk_norm=False, **_common(cfg))


# Keyed by model_type and by the HF `architectures` string.
REGISTRY = {
    "hunyuan_v1_dense": _hunyuan,
    "HunYuanDenseV1ForCausalLM": _hunyuan,
    "llama": _llama,
    "LlamaForCausalLM": _llama,
}


def spec_from_hf_config(cfg: dict) -> ModelSpec:
    """Build and validate a ModelSpec from a parsed Hugging Face config.json."""
    if not isinstance(cfg, dict):
        raise SpecError("config.json: top level should be an object")
    keys = [cfg.get("model_type")] + list(cfg.get("architectures") or [])
    for key in keys:
        if key in REGISTRY:
            try:
                return _build(REGISTRY[key](cfg))
            except (TypeError, ValueError, AttributeError) as e:  # a value of a type no check expected
                raise SpecError(f"config.json: a field has a value of the wrong type ({e})") from None
    name = cfg.get("model_type") or (cfg.get("architectures") or ["<none>"])[0]
    raise SpecError(f"config.json: field 'model_type' = '{name}' is not supported (supported: hunyuan_v1_dense, llama)")


def _build(data: dict) -> ModelSpec:
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    missing = fields - set(data)
    if missing:
        raise SpecError(f"model spec: missing field '{sorted(missing)[0]}'")
    data = {k: v for k, v in data.items() if k in fields}
    data["eos_token_id"] = _eos(data["eos_token_id"])
    data["layer_types"] = tuple(data["layer_types"])
    data["shared_layers"] = tuple(data["shared_layers"])
    spec = ModelSpec(**data)
    _validate(spec)
    return spec


def _validate(s: ModelSpec) -> None:
    def fail(field: str, why: str) -> None:
        raise SpecError(f"config.json: field '{field}' {why}")

    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
    ):
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            fail(name, f"should be a positive integer, got {value!r}")
    if s.num_attention_heads % s.num_key_value_heads:
        fail(
            "num_key_value_heads",
            f"= {s.num_key_value_heads} does not divide num_attention_heads = {s.num_attention_heads}",
        )
    if s.head_dim % 2:
        fail("head_dim", f"= {s.head_dim} should be even (rotary embedding)")
    if not (s.rms_norm_eps > 0 and math.isfinite(s.rms_norm_eps)):
        fail("rms_norm_eps", f"should be a positive number, got {s.rms_norm_eps!r}")
    if not (s.rope_theta > 0 and math.isfinite(s.rope_theta)):
        fail("rope_theta", f"should be a positive number, got {s.rope_theta!r}")
    if s.hidden_act not in ACTIVATIONS:
        fail("hidden_act", f"= '{s.hidden_act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
    if len(s.layer_types) != s.num_hidden_layers:
        fail("layer_types", f"has {len(s.layer_types)} entries for {s.num_hidden_layers} layers")
    for t in s.layer_types:
        if t not in LAYER_TYPES:
            fail("layer_types", f"entry '{t}' is not one of {', '.join(LAYER_TYPES)}")
    if s.conv_layers and s.conv_kernel_size < 2:
        fail("conv_kernel_size", f"should be >= 2, got {s.conv_kernel_size}")
    if len(s.shared_layers) != s.num_hidden_layers:
        fail("shared_layers", f"has {len(s.shared_layers)} entries for {s.num_hidden_layers} layers")
    for i, j in enumerate(s.shared_layers):
        if not isinstance(j, int) or not 0 <= j <= i:
            fail("shared_layers", f"entry {i} = {j!r} should name an earlier layer (0..{i})")
        if s.shared_layers[j] != j:
            fail("shared_layers", f"entry {i} = {j} names a layer that itself shares weights")
        if s.layer_types[j] != s.layer_types[i]:
            fail("shared_layers", f"entry {i} = {j} joins a '{s.layer_types[i]}' layer to a '{s.layer_types[j]}' layer")
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(s, name)
        if value is not None and not (isinstance(value, int) and 0 <= value):
            fail(name, f"should be a token id, got {value!r}")
