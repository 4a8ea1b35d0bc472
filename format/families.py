"""The model families, one entry each: what the converter, the loader and the server need to know of a family
beyond its config.json (which `spec`'s parser of the family reads into ModelSpec fields, and those fields
are what the graph, the engine and the calibration switch on).

An entry names the family's Hugging Face model_type and class, its llama.cpp architecture and how llama.cpp
stores its tensors (q/k rows permuted, norms stored as 1 + w, block names that differ from llama's), the
Hugging Face names of its per-head q/k norms, and the tags its chat template puts around tool calls. Adding a
family is an entry here, its config parser in `spec.PARSERS`, and what is genuinely new in it (a kernel, an
option of ModelSpec).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class ToolTags:
    """How a family's chat template writes tool calls: between `open` and `close`; per_call: one object per
    call between its own tags, "\\n" inside and between them (Hermes), else one JSON list."""

    open: str
    close: str
    per_call: bool = False


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type, ModelSpec.model_type
    architecture: str  # config.json's architectures[0], the transformers class
    gguf_arch: str | None = None  # general.architecture in a llama.cpp GGUF; None: no GGUF form read
    gguf_permuted_qk: bool = False  # convert_hf_to_gguf permutes q/k rows (llama's interleaved RoPE order)
    gguf_norms_plus_one: bool = False  # llama.cpp stores the RMSNorm weights as applied, 1 + w
    gguf_rms_norm_eps: float = 1e-6  # the norms' epsilon where a GGUF's metadata gives none (llama.cpp's)
    # llama.cpp's block tensor names whose Hugging Face name differs from llama's (gguf_reader._BLOCK_NAMES)
    gguf_block_names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    qk_norm_names: tuple[str, str] = ("query_layernorm", "key_layernorm")  # per-head q/k RMSNorms (when used)
    tools: ToolTags | None = None  # None: `tools` is refused for the family


FAMILIES = (
    # Hunyuan: the format Tencent documents for Hunyuan-A13B's function calls (the family's agent format). Its
    # GGUF (llama.cpp's hunyuan-dense) carries the NTK-alpha-stretched RoPE base as its freq_base
    Family(
        "hunyuan_v1_dense",
        "HunYuanDenseV1ForCausalLM",
        gguf_arch="hunyuan-dense",
        gguf_block_names=MappingProxyType(
            {"attn_q_norm": "self_attn.query_layernorm", "attn_k_norm": "self_attn.key_layernorm"}
        ),
        tools=ToolTags("<tool_calls>", "</tool_calls>"),
    ),  # fmt: skip
    # Llama 2/3.x and SmolLM2 (Llama 3's RoPE scaling: GGUF rope_freqs); SmolLM2's function-calling format
    Family(
        "llama",
        "LlamaForCausalLM",
        gguf_arch="llama",
        gguf_permuted_qk=True,
        tools=ToolTags("<tool_call>", "</tool_call>"),
    ),  # fmt: skip
    # Mistral: Llama's layers, and in Mistral 7B v0.1 a sliding window on every layer (llama.cpp writes its
    # GGUF as a llama, read back as the llama family: the same arithmetic)
    Family("mistral", "MistralForCausalLM"),
    # Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (q/k norms before RoPE): the Hermes format of their templates
    Family("qwen2", "Qwen2ForCausalLM", gguf_arch="qwen2", tools=ToolTags("<tool_call>", "</tool_call>", True)),
    Family(
        "qwen3",
        "Qwen3ForCausalLM",
        gguf_arch="qwen3",
        qk_norm_names=("q_norm", "k_norm"),
        tools=ToolTags("<tool_call>", "</tool_call>", True),
    ),  # fmt: skip
    # Gemma 3 (text): four norms a layer, llama.cpp's ffn_norm being the one before the MLP
    Family(
        "gemma3_text",
        "Gemma3ForCausalLM",
        gguf_arch="gemma3",
        gguf_norms_plus_one=True,
        gguf_block_names=MappingProxyType(
            {
                "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm",
            }
        ),
        qk_norm_names=("q_norm", "k_norm"),
    ),  # fmt: skip
)

BY_MODEL_TYPE = MappingProxyType({f.model_type: f for f in FAMILIES})
BY_GGUF_ARCH = MappingProxyType({f.gguf_arch: f for f in FAMILIES if f.gguf_arch})


def family(model_type: str) -> Family:
    """The entry of a ModelSpec.model_type (a spec is validated against FAMILIES: the key exists)."""
    return BY_MODEL_TYPE[model_type]
