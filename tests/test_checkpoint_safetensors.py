"""The safetensors reader against the `safetensors` library, on files transformers wrote."""

from __future__ import annotations

import json

import checkpoints as ck
import numpy as np
import pytest
from hy_edge_convert.checkpoint import open_checkpoint
from hy_edge_convert.safetensors_reader import SafetensorsFile
from hy_edge_format.spec import spec_from_hf_config
from safetensors import safe_open

torch = ck.need_torch()  # every test here reads files that torch and transformers wrote


def _reference(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def _expected(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy()
    return t.float().numpy()


def test_all_dtypes_match_safetensors(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g) * 3
    tensors = {
        "a.f32": x,
        "a.f16": x.half(),
        "a.bf16": x.bfloat16(),
        "a.f8": (x * 40).clamp(-448, 448).to(torch.float8_e4m3fn),
        "scalar": torch.tensor([0.5]),
        "odd.f16": torch.randn(3, generator=g).half(),  # puts the next tensor at an unaligned offset
        "after_odd.f32": torch.randn(2, 3, generator=g),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    f = SafetensorsFile(tmp_path / "model.safetensors")
    kinds = {k: v[0] for k, v in f.entries.items()}
    assert kinds == {
        "a.f32": "f32",
        "a.f16": "f16",
        "a.bf16": "bf16",
        "a.f8": "f8_e4m3",
        "scalar": "f32",
        "odd.f16": "f16",
        "after_odd.f32": "f32",
    }
    (tmp_path / "config.json").write_text("{}")
    with open_checkpoint(tmp_path) as ckpt:
        for name, t in tensors.items():
            ref = ckpt.tensors[name]
            got = ref.load()
            assert ref.shape == tuple(t.shape)
            assert got.dtype == (np.uint8 if t.dtype == torch.float8_e4m3fn else np.float32)
            np.testing.assert_array_equal(got, _expected(t))
    f.close()


@pytest.mark.parametrize("fixture", ["hunyuan_dir", "hunyuan_f32_dir", "llama_dir", "llama_sharded_dir"])
def test_saved_checkpoints_match_safetensors(fixture, request):
    directory = request.getfixturevalue(fixture)
    ref = _reference(directory)
    with open_checkpoint(directory) as ckpt:
        assert ckpt.kind == "safetensors"
        assert set(ckpt.tensors) == set(ref)
        for name, t in ref.items():
            np.testing.assert_array_equal(ckpt.tensors[name].load(), _expected(t), err_msg=name)


def test_sharded_index_is_used(llama_sharded_dir):
    index = json.loads((llama_sharded_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with open_checkpoint(llama_sharded_dir) as ckpt:
        assert set(ckpt.tensors) == set(index["weight_map"])
        assert {r.dtype for r in ckpt.tensors.values()} == {"f16"}


def test_hunyuan_names_and_dtypes(hunyuan_dir):
    with open_checkpoint(hunyuan_dir) as ckpt:
        assert "lm_head.weight" not in ckpt.tensors  # tied
        assert {r.dtype for r in ckpt.tensors.values()} == {"bf16"}
        q = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"]
        assert q.shape == (4 * 16, 48)  # H*D != hidden
        assert "model.layers.1.self_attn.query_layernorm.weight" in ckpt.tensors


def test_fp8_layout_codes_are_byte_exact(fp8_dir):
    ref = _reference(fp8_dir)
    with open_checkpoint(fp8_dir) as ckpt:
        assert ckpt.config["quantization_config"]["quant_method"] == "compressed-tensors"
        linears = [n for n in ref if n.endswith("_proj.weight")]
        assert len(linears) == 2 * 7
        for name in linears:
            w, scale, act = (
                ckpt.tensors[name],
                ckpt.tensors[name + "_scale"],
                ckpt.tensors[name[: -len("weight")] + "input_scale"],
            )
            assert (w.dtype, scale.dtype, act.dtype) == ("f8_e4m3", "f32", "f32")
            assert scale.shape == (1,) and act.shape == (1,)
            codes = w.load()
            assert codes.dtype == np.uint8
            assert codes.tobytes() == ref[name].view(torch.uint8).numpy().tobytes()
            assert scale.load().tobytes() == ref[name + "_scale"].numpy().tobytes()
        assert ckpt.tensors["model.embed_tokens.weight"].dtype == "bf16"
        assert ckpt.tensors["model.norm.weight"].dtype == "bf16"


def test_fp8_reference_model_dequantizes(fp8_dir):
    model = ck.fp8_reference_model(fp8_dir)
    with open_checkpoint(fp8_dir) as ckpt:
        name = "model.layers.1.mlp.down_proj.weight"
        codes = torch.from_numpy(ckpt.tensors[name].load()).view(torch.float8_e4m3fn)
        expected = codes.float() * float(ckpt.tensors[name + "_scale"].load()[0])
        torch.testing.assert_close(model.state_dict()[name], expected, rtol=0, atol=0)


def test_directory_tokenizer(hunyuan_dir, llama_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    with open_checkpoint(hunyuan_dir) as ckpt:
        tok = ckpt.tokenizer
        assert tok.kind == "tokenizers"
        c = tok.config
        assert c["bos_token"] == ck.HUNYUAN_BOS and c["eos_token"] == ck.HUNYUAN_EOS
        assert c["chat_template"] == ck.HUNYUAN_TEMPLATE  # from chat_template.jinja (transformers 5)
        eos_id = ckpt.config["eos_token_id"]
        assert c["eos_token_ids"] == [eos_id]
        hf = AutoTokenizer.from_pretrained(hunyuan_dir)
        ours = Tokenizer.from_str(tok.data.decode())
        text = "Hello, world! naïve café 🙂"
        assert ours.encode(text, add_special_tokens=False).ids == hf.encode(text, add_special_tokens=False)
    with open_checkpoint(llama_dir) as ckpt:
        assert ckpt.tokenizer.config["chat_template"] == ck.CHATML_TEMPLATE
        assert ckpt.tokenizer.config["eos_token"] == "<|im_end|>"


def test_eos_ids_are_the_union(tmp_path, llama_dir):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    gen = json.loads((d / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    gen["eos_token_id"] = [eos, 0]
    (d / "generation_config.json").write_text(json.dumps(gen))
    with open_checkpoint(d) as ckpt:
        assert ckpt.tokenizer.config["eos_token_ids"] == [eos, 0]


def test_hunyuan_spec_legacy_and_new_keys_agree(hunyuan_f32_dir, hunyuan_legacy_dir):
    from transformers import AutoModelForCausalLM

    with open_checkpoint(hunyuan_f32_dir) as a, open_checkpoint(hunyuan_legacy_dir) as b:
        new, legacy = spec_from_hf_config(a.config), spec_from_hf_config(b.config)
    assert new == legacy
    assert (new.hidden_size, new.num_attention_heads, new.head_dim, new.use_qk_norm) == (48, 4, 16, True)
    # The effective base is what transformers' alpha rotary embedding computes.
    model = AutoModelForCausalLM.from_pretrained(hunyuan_f32_dir)
    inv_freq = model.model.rotary_emb.inv_freq.double()
    D = new.head_dim
    expected = 1.0 / new.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)


def test_qwen_specs(qwen2_dir, qwen3_dir):
    """What each Qwen family's config.json (as transformers writes it: layer_types of "full_attention")
    says; sliding-window layers are refused; a spec without the Qwen fields (a file converted before
    them) reads as the families before them."""
    from hy_edge_format.errors import SpecError
    from hy_edge_format.spec import ModelSpec

    cfg2, cfg3 = (json.loads((d / "config.json").read_text()) for d in (qwen2_dir, qwen3_dir))
    assert cfg3["layer_types"] == ["full_attention", "full_attention"]
    s2, s3 = spec_from_hf_config(cfg2), spec_from_hf_config(cfg3)
    assert (s2.model_type, s2.qkv_bias, s2.use_qk_norm, s2.layer_types) == ("qwen2", True, False, ("attention",) * 2)
    assert (s3.model_type, s3.qkv_bias, s3.use_qk_norm, s3.qk_norm_before_rope) == ("qwen3", False, True, True)
    for bad in ({"use_sliding_window": True}, {"layer_types": ["full_attention", "sliding_attention"]}):
        with pytest.raises(SpecError, match="sliding-window attention layers are not supported"):
            spec_from_hf_config({**cfg3, **bad})
    old = json.loads(s3.to_json())
    for key in ("qk_norm_before_rope", "qkv_bias"):
        del old[key]
    old["model_type"] = "hunyuan_v1_dense"
    read = ModelSpec.from_json(json.dumps(old))
    assert (read.qk_norm_before_rope, read.qkv_bias, read.use_qk_norm) == (False, False, True)


def test_gemma3_spec(gemma3_dir):
    """Gemma 3's config in both rope forms; what it cannot be run as is refused naming the field."""
    from hy_edge_format.errors import SpecError
    from hy_edge_format.spec import ModelSpec

    cfg = json.loads((gemma3_dir / "config.json").read_text())
    s = spec_from_hf_config(cfg)
    assert (s.model_type, s.hidden_act, s.sliding_layers, s.sliding_window) == ("gemma3_text", "gelu_tanh", (0, 1), 4)
    assert (s.rope_theta, s.rope_local_theta, s.embed_scale, s.attn_scale) == (10000.0, 10.0, 8.0, 12**-0.5)
    assert [s.window(i) for i in range(3)] == [4, 4, 0]
    legacy = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "layer_types")}
    legacy.update(rope_theta=10000.0, rope_local_base_freq=10.0, sliding_window_pattern=3)
    assert spec_from_hf_config(legacy) == s
    assert ModelSpec.from_json(s.to_json()) == s
    for bad, field in (
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ({"hidden_activation": "relu"}, "hidden_activation"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ):
        with pytest.raises(SpecError, match=field):
            spec_from_hf_config({**cfg, **bad})
    with pytest.raises(SpecError, match="sliding_layers"):
        ModelSpec.from_json(json.dumps({**json.loads(s.to_json()), "sliding_layers": [7]}))
    with pytest.raises(SpecError, match="sandwich_norms"):  # the engine's sandwich norms are attention layers'
        ModelSpec.from_json(
            json.dumps(
                {**json.loads(s.to_json()), "sliding_layers": [], "layer_types": ["attention", "dwconv", "attention"]}
            )
        )


def test_rope_freq_factors_in_a_file_spec(qwen3_dir):
    """A file's per-frequency RoPE divisors (a Llama 3 GGUF's rope_freqs) are bounded like every field."""
    from hy_edge_format.errors import SpecError
    from hy_edge_format.spec import ModelSpec

    spec = json.loads(spec_from_hf_config(json.loads((qwen3_dir / "config.json").read_text())).to_json())
    half = spec["head_dim"] // 2
    assert (
        ModelSpec.from_json(json.dumps({**spec, "rope_freq_factors": [2.0] * half})).rope_freq_factors == (2.0,) * half
    )
    for bad in ([2.0] * (half - 1), [0.0] * half, "x", [float("nan")] * half):
        with pytest.raises(SpecError, match="rope_freq_factors"):
            ModelSpec.from_json(json.dumps({**spec, "rope_freq_factors": bad}))
    with pytest.raises(SpecError, match="give one"):
        ModelSpec.from_json(json.dumps({**spec, "rope_freq_factors": [2.0] * half, "rope_llama3": [8, 1, 4, 8]}))


def test_linear_rope_scaling_in_a_config_and_a_file_spec(qwen3_dir):
    """Linear RoPE scaling: read from either config form (and from what the GGUF reader makes of llama.cpp's
    rope.scaling keys), bounded in a file's spec, 1.0 in a file written before the field."""
    from hy_edge_format.errors import SpecError
    from hy_edge_format.spec import ModelSpec

    cfg = json.loads((qwen3_dir / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    for scaling in ({"rope_scaling": {"rope_type": "linear", "factor": 8}},
                    {"rope_scaling": {"type": "linear", "factor": 8.0}},
                    {"rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}}):  # fmt: skip
        assert spec_from_hf_config({**cfg, **scaling}).rope_linear == 8.0
    assert spec_from_hf_config(cfg).rope_linear == 1.0
    for bad in (0, -1, "x", None, float("inf")):
        with pytest.raises(SpecError, match="rope_scaling.factor"):
            spec_from_hf_config({**cfg, "rope_scaling": {"rope_type": "linear", "factor": bad}})
    spec = json.loads(spec_from_hf_config(cfg).to_json())
    assert ModelSpec.from_json(json.dumps({**spec, "rope_linear": 2.5})).rope_linear == 2.5
    assert ModelSpec.from_json(json.dumps({k: v for k, v in spec.items() if k != "rope_linear"})).rope_linear == 1.0
    for bad in (0, -2.0, "x", True):
        with pytest.raises(SpecError, match="rope_linear"):
            ModelSpec.from_json(json.dumps({**spec, "rope_linear": bad}))


def test_tensor_load_is_lazy(llama_dir):
    with open_checkpoint(llama_dir) as ckpt:
        f = ckpt._files[0]
        assert f._mm is None  # nothing mapped until a tensor is asked for
        ckpt.tensors["model.norm.weight"].load()
        assert f._mm is not None
    assert f._mm is None
