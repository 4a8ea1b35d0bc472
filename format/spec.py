"""ModelSpec: the one description of an architecture that every later stage reads.

Field names are the Hugging Face `config.json` keys, verbatim, so no translation layer exists; unknown
keys are dropped. Five families are understood — `hunyuan_v1_dense` (legacy Tencent keys and the
transformers 5 `rope_parameters` form), `llama`, `qwen2` (q/k/v biases), `qwen3` (q/k norm before
RoPE) and `gemma3_text` (Gemma 3's text models: (1 + w) norms, four per layer, a scaled embedding,
GeGLU-tanh, sliding-window layers with their own RoPE base) — plus the seed article's architecture
options, which have their own config keys:

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
from .families import BY_MODEL_TYPE
from .safe_json import JSONInputError, is_finite, is_int, show
from .safe_json import loads as json_loads

FAMILIES = tuple(BY_MODEL_TYPE)  # ModelSpec.model_type: families.FAMILIES
LAYER_TYPES = ("attention", "dwconv")
ACTIVATIONS = ("silu", "relu6", "gelu_tanh")  # the gate's; gelu_tanh: transformers' gelu_pytorch_tanh
# Upper bounds of the structural sizes, checked before anything is sized by them (a config that says
# 1e9 layers otherwise builds a 1e9-entry tuple until the OOM killer ends it). Far above any model a
# CPU runs: Llama-3.1-405B has 126 layers, 128 heads, hidden 16384, intermediate 53248; Gemma 3's
# vocabulary is 262,144 tokens.
LIMITS = {
    "vocab_size": 1 << 21,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "max_position_embeddings": 1 << 24,
    "conv_kernel_size": 256,
}


@dataclass(frozen=True)
class ModelSpec:
    model_type: str  # one of FAMILIES
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
    use_qk_norm: bool  # per-head RMSNorm on q and k (after RoPE unless qk_norm_before_rope)
    hidden_act: str  # "silu" | "relu6"
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]
    pad_token_id: int | None
    layer_types: tuple[str, ...]  # (L,) "attention" | "dwconv"
    conv_kernel_size: int  # k of dwconv layers; their state keeps the last k-1 inputs
    shared_layers: tuple[int, ...]  # (L,) index of the layer whose weights layer i uses
    # Llama 3.1's RoPE frequency scaling (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings), or None (hy_edge_ops.rope.rope_inv_freq)
    rope_llama3: tuple[float, float, float, int] | None = None
    qk_norm_before_rope: bool = False  # Qwen3 normalises q and k before RoPE, Hunyuan after it
    qkv_bias: bool = False  # q/k/v projections with biases (Qwen2), o_proj without
    # a divisor per RoPE frequency (D/2,): Llama 3's scaling as a GGUF's rope_freqs tensor carries it
    rope_freq_factors: tuple[float, ...] | None = None
    # Gemma 3: every RMSNorm weight applies as (1 + w); "sandwich" norms (the attention's and the MLP's
    # outputs normalised too: post_attention_layernorm on the attention output, pre_feedforward_layernorm
    # before the MLP, post_feedforward_layernorm after it); the embedding times embed_scale; softmax
    # scale attn_scale (None: head_dim ** -0.5); sliding_layers attend to the last sliding_window
    # positions only, with RoPE base rope_local_theta
    norm_plus_one: bool = False
    sandwich_norms: bool = False
    embed_scale: float = 1.0
    attn_scale: float | None = None
    sliding_window: int = 0
    sliding_layers: tuple[int, ...] = ()
    rope_local_theta: float | None = None
    # linear RoPE scaling (positions / factor: every frequency divided by it), of the attention layers on
    # rope_theta (Gemma 3 4B+: the global ones; the sliding layers keep rope_local_theta unscaled)
    rope_linear: float = 1.0

    # -- derived -------------------------------------------------------------------------------
    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "attention")

    @property
    def conv_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "dwconv")

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5 if self.attn_scale is None else self.attn_scale

    def window(self, i: int) -> int:
        """How many positions layer i's queries see (0: all before them)."""
        return self.sliding_window if i in self.sliding_layers else 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model spec") -> ModelSpec:
        """The spec a converted file carries (its own JSON form): every field typed and bounded; errors
        begin with `source`."""
        try:
            data = json_loads(text)
        except JSONInputError as e:
            raise SpecError(f"{source}: {e}") from None
        if not isinstance(data, dict):
            raise SpecError(f"{source}: should be a JSON object, got {show(data)}")
        return _build(data, source)


# -- construction from a Hugging Face config ---------------------------------------------------


def _get(cfg: dict, key: str, kind: type, default: Any = ...) -> Any:
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise SpecError(f"config.json: missing field '{key}'")
        return default
    value = cfg[key]
    if kind is float and is_int(value) and is_finite(value):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(f"config.json: field '{key}' should be {kind.__name__}, got {show(value)}")
    if key in LIMITS and not 0 < value <= LIMITS[key]:
        raise SpecError(f"config.json: field '{key}' should be in 1..{LIMITS[key]}, got {value}")
    return value


def _eos(value: Any, source: str = "config.json") -> tuple[int, ...]:
    if value is None:
        return ()
    if is_int(value):
        return (value,)
    if isinstance(value, (list, tuple)) and all(is_int(v) for v in value):
        return tuple(value)
    raise SpecError(f"{source}: field 'eos_token_id' should be an int or a list of ints, got {show(value)}")


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
            raise SpecError(f"config.json: field 'rope_scaling' should be an object, got {show(scaling)}")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not is_finite(theta) or not theta > 0:
        raise SpecError(f"config.json: field 'rope_theta' should be a positive number, got {show(theta)}")
    alpha = scaling.get("alpha")
    if alpha is not None and (not is_finite(alpha) or not alpha >= 0):
        raise SpecError(f"config.json: field 'rope_scaling.alpha' should be a positive number, got {show(alpha)}")
    if rope_type == "dynamic" and alpha:
        if head_dim <= 2:
            raise SpecError(f"config.json: field 'head_dim' = {head_dim} is too small for dynamic RoPE scaling")
        try:
            return float(theta) * float(alpha) ** (head_dim / (head_dim - 2))
        except OverflowError:
            raise SpecError(f"config.json: field 'rope_scaling.alpha' = {alpha} makes the RoPE base infinite") from None
    if rope_type in ("default", None, "llama3", "linear"):  # these scale the frequencies, not the base
        return float(theta)
    raise SpecError(f"config.json: field 'rope_scaling' type {show(rope_type)} is not supported")


def _rope_llama3(cfg: dict) -> tuple[float, float, float, int] | None:
    """Llama 3.1's frequency scaling from `rope_scaling` (or transformers 5's `rope_parameters`), if it
    is the RoPE type; each parameter typed and bounded."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if not isinstance(params, dict) or params.get("rope_type", params.get("type")) != "llama3":
        return None
    field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    values = []
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        v = params.get(key)
        if not (is_finite(v) and v > 0) or (key.startswith("original") and not is_int(v)):
            raise SpecError(f"config.json: field '{field}.{key}' should be a positive number, got {show(v)}")
        values.append(int(v) if key.startswith("original") else float(v))
    if not values[1] < values[2]:
        raise SpecError(f"config.json: field '{field}.low_freq_factor' should be below high_freq_factor")
    return tuple(values)


def _rope_linear(cfg: dict) -> float:
    """The factor of linear RoPE scaling from `rope_scaling` (or transformers 5's `rope_parameters`), if it
    is the RoPE type; 1.0 otherwise."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if not isinstance(params, dict) or params.get("rope_type", params.get("type")) != "linear":
        return 1.0
    field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    factor = params.get("factor")
    if not (is_finite(factor) and factor > 0):
        raise SpecError(f"config.json: field '{field}.factor' should be a positive number, got {show(factor)}")
    return float(factor)


def _common(cfg: dict) -> dict:
    hidden = _get(cfg, "hidden_size", int)
    heads = _get(cfg, "num_attention_heads", int)
    head_dim = _get(cfg, "head_dim", int, None) or _get(cfg, "attention_head_dim", int, None) or hidden // heads
    for key in ("layer_types", "shared_layers"):
        if cfg.get(key) is not None and not isinstance(cfg[key], list):
            raise SpecError(f"config.json: field '{key}' should be a list, got {show(cfg[key])}")
    layers = _get(cfg, "num_hidden_layers", int)  # bounded (LIMITS) before the tuples below are built
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ()):
        raise SpecError("config.json: sliding-window attention layers are not supported")
    # transformers' own layer_types (Qwen2/3): every layer full attention, which is what "attention" is here
    layer_types = ["attention" if t == "full_attention" else t for t in cfg.get("layer_types") or ()]
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
        rope_llama3=_rope_llama3(cfg),
        rope_linear=_rope_linear(cfg),
        rope_freq_factors=cfg.get("rope_freq_factors"),  # not a Hugging Face key: set by the GGUF reader
        max_position_embeddings=_get(cfg, "max_position_embeddings", int, 2048),
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", bool, False),
        hidden_act=_get(cfg, "hidden_act", str, "silu"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=_eos(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"),
        layer_types=tuple(layer_types or ("attention",) * layers),
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
    return dict(model_type="hunyuan_v1_dense", use_qk_norm=_get(cfg, "use_qk_norm", bool, True), **_common(cfg))


def _llama(cfg: dict) -> dict:
    return dict(model_type="llama", use_qk_norm=False, **_common(cfg))


def _mistral(cfg: dict) -> dict:
    """transformers' MistralConfig: Llama's layers; a `sliding_window` (Mistral 7B v0.1; null in later
    releases) makes every layer a sliding one, on the model's own RoPE base."""
    window = cfg.get("sliding_window")
    out = dict(model_type="mistral", use_qk_norm=False, **_common(dict(cfg, sliding_window=None)))
    if window is None:
        return out
    if not (is_int(window) and 0 < window <= LIMITS["max_position_embeddings"]):
        raise SpecError(
            f"config.json: field 'sliding_window' should be null or an integer in "
            f"1..{LIMITS['max_position_embeddings']}, got {show(window)}"
        )
    if out["rope_llama3"] is not None or out["rope_linear"] != 1.0:
        raise SpecError("config.json: field 'rope_scaling' with a 'sliding_window' is not supported")
    layers = tuple(range(out["num_hidden_layers"]))
    return dict(out, sliding_window=window, sliding_layers=layers, rope_local_theta=out["rope_theta"])


def _qwen2(cfg: dict) -> dict:
    # transformers' Qwen2Attention: q/k/v with biases, o_proj without (no config key says so)
    return dict(model_type="qwen2", use_qk_norm=False, qkv_bias=True, **_common(cfg))


def _qwen3(cfg: dict) -> dict:
    # transformers' Qwen3Attention: per-head RMSNorm of q and k (q_norm, k_norm) before RoPE
    return dict(model_type="qwen3", use_qk_norm=True, qk_norm_before_rope=True, **_common(cfg))


def _gemma3(cfg: dict) -> dict:
    """transformers' Gemma3TextConfig (both its rope forms: transformers 5's `rope_parameters` per layer
    type, and rope_theta / rope_local_base_freq)."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise SpecError(f"config.json: field '{key}' is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise SpecError("config.json: field 'use_bidirectional_attention' = true is not supported")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise SpecError(f"config.json: field 'hidden_activation' = {show(act)} is not supported")
    layers = _get(cfg, "num_hidden_layers", int)
    types = cfg.get("layer_types")
    if types is None:
        pattern = _get(cfg, "sliding_window_pattern", int, 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers:
        raise SpecError(f"config.json: field 'layer_types' should be a list of {layers} layer types")
    if any(t not in ("sliding_attention", "full_attention") for t in types):
        raise SpecError("config.json: field 'layer_types' should hold 'sliding_attention' or 'full_attention'")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    window = _get(cfg, "sliding_window", int) if sliding else 0
    if sliding and not 0 < window <= LIMITS["max_position_embeddings"]:
        raise SpecError(f"config.json: field 'sliding_window' should be in 1..{LIMITS['max_position_embeddings']}")
    params = cfg.get("rope_parameters")
    base = dict(cfg, layer_types=None, hidden_act="gelu_tanh", use_sliding_window=False)
    local = {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    if isinstance(params, dict) and "full_attention" in params:  # transformers 5: per layer type
        base["rope_parameters"] = params["full_attention"]
        local = params.get("sliding_attention") or local
    if not isinstance(local, dict) or local.get("rope_type", "default") != "default":
        raise SpecError("config.json: field 'rope_parameters.sliding_attention' should be default RoPE")
    local_theta = local.get("rope_theta", 10000.0)
    if not (is_finite(local_theta) and local_theta > 0):
        raise SpecError(
            f"config.json: field 'rope_local_base_freq' should be a positive number, got {show(local_theta)}"
        )
    common = _common(base)
    scalar = _get(cfg, "query_pre_attn_scalar", float, float(common["head_dim"]))
    if not scalar > 0:
        raise SpecError(f"config.json: field 'query_pre_attn_scalar' should be positive, got {scalar}")
    return dict(
        model_type="gemma3_text",
        use_qk_norm=True,
        qk_norm_before_rope=True,
        norm_plus_one=True,
        sandwich_norms=True,
        embed_scale=float(common["hidden_size"]) ** 0.5,
        attn_scale=scalar**-0.5,
        sliding_window=window,
        sliding_layers=sliding,
        rope_local_theta=float(local_theta),
        **common,
    )


# each family's config.json parser, by model_type (families.FAMILIES holds the rest of what a family is)
PARSERS = {
    "hunyuan_v1_dense": _hunyuan,
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma3_text": _gemma3,
}
assert set(PARSERS) == set(BY_MODEL_TYPE), "a family without a config parser, or a parser without an entry"
# keyed by model_type and by the HF `architectures` string
REGISTRY = {**PARSERS, **{f.architecture: PARSERS[f.model_type] for f in BY_MODEL_TYPE.values()}}


def spec_from_hf_config(cfg: dict) -> ModelSpec:
    """Build and validate a ModelSpec from a parsed Hugging Face config.json."""
    if not isinstance(cfg, dict):
        raise SpecError("config.json: top level should be an object")
    architectures = cfg.get("architectures") or []
    if not isinstance(architectures, list):
        raise SpecError(f"config.json: field 'architectures' should be a list, got {show(architectures)}")
    keys = [cfg.get("model_type")] + architectures
    for key in keys:
        if isinstance(key, str) and key in REGISTRY:
            return _build(REGISTRY[key](cfg))
    name = cfg.get("model_type") or (architectures or ["<none>"])[0]
    raise SpecError(
        f"config.json: field 'model_type' = {show(name)} is not supported (supported: {', '.join(FAMILIES)})"
    )


_SIZES = tuple(LIMITS)  # the integer fields, each positive and bounded
_KINDS = {"rms_norm_eps": float, "rope_theta": float, "tie_word_embeddings": bool, "use_qk_norm": bool,
          "qk_norm_before_rope": bool, "qkv_bias": bool, "norm_plus_one": bool, "sandwich_norms": bool,
          "embed_scale": float, "rope_linear": float}  # fmt: skip
# fields files written before them lack, and what those files mean by their absence
_LATER = {"rope_llama3": None, "qk_norm_before_rope": False, "qkv_bias": False, "rope_freq_factors": None,
          "norm_plus_one": False, "sandwich_norms": False, "embed_scale": 1.0, "attn_scale": None,
          "sliding_window": 0, "sliding_layers": (), "rope_local_theta": None, "rope_linear": 1.0}  # fmt: skip


def _build(data: dict, source: str = "config.json") -> ModelSpec:
    """A ModelSpec from its fields (a converted file's spec, or what a config family produced):
    every field's type, then its range and the fields' consistency (`_validate`)."""

    def fail(field: str, why: str) -> None:
        raise SpecError(f"{source}: field '{field}' {why}")

    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    data = {**_LATER, **data}
    missing = fields - set(data)
    if missing:
        raise SpecError(f"{source}: missing field '{sorted(missing)[0]}'")
    data = {k: v for k, v in data.items() if k in fields}
    for name in _SIZES:
        if not is_int(data[name]) or not 0 < data[name] <= LIMITS[name]:
            fail(name, f"should be an integer in 1..{LIMITS[name]}, got {show(data[name])}")
    for name, kind in _KINDS.items():
        if kind is float and is_finite(data[name]):
            data[name] = float(data[name])
        if not isinstance(data[name], kind):
            fail(name, f"should be {'a number' if kind is float else 'true or false'}, got {show(data[name])}")
    for name in ("model_type", "hidden_act"):
        if not isinstance(data[name], str):
            fail(name, f"should be a string, got {show(data[name])}")
    if data["model_type"] not in FAMILIES:
        fail("model_type", f"= {show(data['model_type'])} is not supported (supported: {', '.join(FAMILIES)})")
    for name in ("layer_types", "shared_layers", "sliding_layers"):
        if not isinstance(data[name], (list, tuple)):
            fail(name, f"should be a list, got {show(data[name])}")
    for name in ("attn_scale", "rope_local_theta"):
        if data[name] is not None:
            if not (is_finite(data[name]) and data[name] > 0):
                fail(name, f"should be a positive number, got {show(data[name])}")
            data[name] = float(data[name])
    if not (is_int(data["sliding_window"]) and 0 <= data["sliding_window"] <= LIMITS["max_position_embeddings"]):
        fail("sliding_window", f"should be an integer in 0..{LIMITS['max_position_embeddings']}")
    data["sliding_layers"] = tuple(data["sliding_layers"])
    data["eos_token_id"] = _eos(data["eos_token_id"], source)
    data["layer_types"] = tuple(data["layer_types"])
    data["shared_layers"] = tuple(data["shared_layers"])
    llama3 = data["rope_llama3"]
    if llama3 is not None:
        ok = isinstance(llama3, (list, tuple)) and len(llama3) == 4 and all(is_finite(v) and v > 0 for v in llama3)
        if not ok or not is_int(llama3[3]) or not llama3[1] < llama3[2]:
            fail("rope_llama3", f"should be [factor, low, high, original positions] (low < high), got {show(llama3)}")
        data["rope_llama3"] = (float(llama3[0]), float(llama3[1]), float(llama3[2]), int(llama3[3]))
    if not data["rope_linear"] > 0 or not math.isfinite(data["rope_linear"]):
        fail("rope_linear", f"should be a positive number, got {show(data['rope_linear'])}")
    factors = data["rope_freq_factors"]
    if factors is not None:
        half = data["head_dim"] // 2
        ok = (
            isinstance(factors, (list, tuple)) and len(factors) == half and all(is_finite(v) and v > 0 for v in factors)
        )
        if not ok:
            fail("rope_freq_factors", f"should be head_dim / 2 = {half} positive numbers")
        data["rope_freq_factors"] = tuple(float(v) for v in factors)
    spec = ModelSpec(**data)
    _validate(spec, source)
    return spec


def _validate(s: ModelSpec, source: str = "config.json") -> None:
    def fail(field: str, why: str) -> None:
        raise SpecError(f"{source}: field '{field}' {why}")

    if s.num_attention_heads % s.num_key_value_heads:
        fail(
            "num_key_value_heads",
            f"= {s.num_key_value_heads} does not divide num_attention_heads = {s.num_attention_heads}",
        )
    if s.head_dim % 2:
        fail("head_dim", f"= {s.head_dim} should be even (rotary embedding)")
    if not (s.embed_scale > 0 and math.isfinite(s.embed_scale)):
        fail("embed_scale", f"should be a positive number, got {s.embed_scale!r}")
    if s.sandwich_norms and s.conv_layers:
        fail("sandwich_norms", "applies to attention layers only: the model has dwconv layers")
    for i in s.sliding_layers:
        if not (is_int(i) and 0 <= i < s.num_hidden_layers and s.layer_types[i] == "attention"):
            fail("sliding_layers", f"entry {show(i)} should name an attention layer")
    if s.sliding_layers and not (s.sliding_window > 0 and s.rope_local_theta is not None):
        fail("sliding_window", "and rope_local_theta are needed by sliding_layers")
    if s.rope_llama3 is not None and s.rope_freq_factors is not None:
        fail("rope_freq_factors", "and rope_llama3 both scale the RoPE frequencies: give one")
    if not (s.rms_norm_eps > 0 and math.isfinite(s.rms_norm_eps)):
        fail("rms_norm_eps", f"should be a positive number, got {s.rms_norm_eps!r}")
    if not (s.rope_theta > 0 and math.isfinite(s.rope_theta)):
        fail("rope_theta", f"should be a positive number, got {s.rope_theta!r}")
    if s.hidden_act not in ACTIVATIONS:
        fail("hidden_act", f"= {show(s.hidden_act)} is not supported (supported: {', '.join(ACTIVATIONS)})")
    if len(s.layer_types) != s.num_hidden_layers:
        fail("layer_types", f"has {len(s.layer_types)} entries for {s.num_hidden_layers} layers")
    for t in s.layer_types:
        if t not in LAYER_TYPES:
            fail("layer_types", f"entry {show(t)} is not one of {', '.join(LAYER_TYPES)}")
    if s.conv_layers and s.conv_kernel_size < 2:
        fail("conv_kernel_size", f"should be >= 2, got {s.conv_kernel_size}")
    if len(s.shared_layers) != s.num_hidden_layers:
        fail("shared_layers", f"has {len(s.shared_layers)} entries for {s.num_hidden_layers} layers")
    for i, j in enumerate(s.shared_layers):
        if not is_int(j) or not 0 <= j <= i:
            fail("shared_layers", f"entry {i} = {show(j)} should name an earlier layer (0..{i})")
        if s.shared_layers[j] != j:
            fail("shared_layers", f"entry {i} = {j} names a layer that itself shares weights")
        if s.layer_types[j] != s.layer_types[i]:
            fail("shared_layers", f"entry {i} = {j} joins a '{s.layer_types[i]}' layer to a '{s.layer_types[j]}' layer")
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(s, name)
        if value is not None and not (is_int(value) and 0 <= value):
            fail(name, f"should be a token id, got {show(value)}")
