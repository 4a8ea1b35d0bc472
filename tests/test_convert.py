"""The converter end to end: our .onnx file, run by stock onnxruntime, against transformers (and the numpy
reference for the seed's options, which transformers has no model for)."""

from __future__ import annotations

import json

import checkpoints as ck
import ml_dtypes
import numpy as np
import onnx
import pytest
import reference_model
from hy_edge_convert import QuantPolicy, convert
from hy_edge_format import format as F
from onnx_weights import dequantized, initializers
from runtime_helpers import make_seed_checkpoint

from edge_runtime.engine.ort_session import OrtSession

IDS = np.array([5, 17, 33, 2, 99, 100, 7, 8, 9, 10, 11, 12, 250, 3, 64, 65], np.int64)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def ort_logits(path, ids=IDS, split=10) -> np.ndarray:
    """Prefill ids[:split] in one call, then decode the rest one token at a time: (T, V)."""
    s = OrtSession(path)
    first = s.forward(ids[:split], all_logits=True)
    rest = [s.forward(ids[i : i + 1]) for i in range(split, len(ids))]
    return np.concatenate([first, np.stack(rest)]) if rest else first


def hf_model(src, **kw):
    torch = ck.need_torch()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw).eval()


def hf_logits(model, ids=IDS) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].float().numpy()


def with_weights(model, weights: dict[str, np.ndarray]):
    """The transformers model with its weights replaced by exactly what our file stores."""
    import torch

    sd = model.state_dict()
    head = weights.get("lm_head.weight")
    for name, w in weights.items():
        sd[name] = torch.from_numpy(w.copy())
    if "lm_head.weight" in sd and head is None and model.config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    if head is not None and model.config.tie_word_embeddings:
        # the file's FP8 copy of a tied head: untie, so the embedding keeps its FP16 values
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd)
        model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(head.copy()))
        return model
    model.load_state_dict(sd)
    return model


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}  # fmt: skip
CHECKPOINTS = {
    "hunyuan-f32": (ck.make_hunyuan, {"dtype": "float32"}),
    "hunyuan-bf16": (ck.make_hunyuan, {"dtype": "bfloat16"}),
    "hunyuan-legacy-config": (ck.make_hunyuan, {"legacy_config": True}),
    "llama-f32": (ck.make_llama, {"dtype": "float32"}),
    "llama-bf16-sharded": (ck.make_llama, {"dtype": "bfloat16", "max_shard_size": "20KB"}),
    # Llama 3.1's RoPE scaling; an original context of 8 positions so that 16 tokens reach every band of it
    "llama3-f32": (ck.make_llama, {"rope_scaling": LLAMA3_ROPE, "max_position_embeddings": 64}),
    "qwen2-bf16": (ck.make_family, {"family": "qwen2", "dtype": "bfloat16"}),
    "qwen3-f32": (ck.make_family, {"family": "qwen3"}),
    "gemma3-f32": (ck.make_family, {"family": "gemma3"}),
    "mistral-f32": (ck.make_family, {"family": "mistral"}),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            make, kw = CHECKPOINTS[name]
            made[name] = make(tmp_path_factory.mktemp(name) / "ckpt", **kw)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_unquantized_conversion_matches_transformers(name, checkpoint, tmp_path):
    src = checkpoint(name)
    out = tmp_path / "model.onnx"
    convert(src, out, QuantPolicy(format="none"))
    assert rel(ort_logits(out), hf_logits(hf_model(src))) < 1e-4


def test_llama3_rope_scaling_matches_transformers_on_both_backends(checkpoint, tmp_path):
    """Llama 3.1's frequency scaling: both backends give transformers' logits, which the scaling moves well
    beyond the tolerance (the same checkpoint with plain RoPE is the control)."""
    import shutil

    import edge_runtime

    src = checkpoint("llama3-f32")
    out = tmp_path / "model.onnx"
    convert(src, out, QuantPolicy(format="none"))
    ref = hf_logits(hf_model(src))
    plain = tmp_path / "plain"
    shutil.copytree(src, plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (plain / "config.json").write_text(json.dumps(cfg))
    assert rel(hf_logits(hf_model(plain)), ref) > 1e-3
    assert edge_runtime.load(out).spec.rope_llama3 == (8.0, 1.0, 4.0, 8)
    assert rel(ort_logits(out), ref) < 1e-4
    assert rel(edge_runtime.load(out).session().forward(IDS, all_logits=True), ref) < 1e-4


@pytest.mark.parametrize("name", ["llama-f32", "gemma3-f32"])
def test_linear_rope_scaling_matches_transformers_on_both_backends(name, checkpoint, tmp_path):
    """Linear RoPE scaling (Gemma 3 4B+ on its global layers only, long-context Llamas): both backends give
    transformers' logits, which the scaling moves well beyond the tolerance (the checkpoint without it is the
    control)."""
    import shutil

    import edge_runtime

    src = checkpoint(name)
    scaled = tmp_path / "scaled"
    shutil.copytree(src, scaled)
    cfg = json.loads((scaled / "config.json").read_text())
    linear = {"rope_type": "linear", "factor": 4.0}
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # transformers 5, per layer type (Gemma 3)
        params["full_attention"].update(linear)
    elif isinstance(params, dict):
        params.update(linear)
    else:
        cfg["rope_scaling"] = linear
    (scaled / "config.json").write_text(json.dumps(cfg))
    ref = hf_logits(hf_model(scaled))
    assert rel(hf_logits(hf_model(src)), ref) > 1e-3
    out = tmp_path / "model.onnx"
    convert(scaled, out, QuantPolicy(format="none"))
    model = edge_runtime.load(out)
    assert model.spec.rope_linear == 4.0
    assert rel(ort_logits(out), ref) < 1e-4
    assert rel(model.session().forward(IDS, all_logits=True), ref) < 1e-4


def test_mistral_with_and_without_its_sliding_window_matches_transformers(checkpoint, tmp_path):
    """Mistral 7B v0.1's window on every layer, and the later releases' null one: both backends give
    transformers' logits, and the window (4, shorter than the prompt) moves them well beyond the tolerance."""
    import shutil

    import edge_runtime

    src = checkpoint("mistral-f32")
    plain = tmp_path / "plain"
    shutil.copytree(src, plain)
    cfg = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**cfg, "sliding_window": None}))
    windowed, full = hf_logits(hf_model(src)), hf_logits(hf_model(plain))
    assert rel(full, windowed) > 1e-3
    for ckpt, ref, window in ((src, windowed, 4), (plain, full, 0)):
        out = tmp_path / f"model-{window}.onnx"
        convert(ckpt, out, QuantPolicy(format="none"))
        model = edge_runtime.load(out)
        assert model.spec.model_type == "mistral" and model.spec.window(0) == window
        assert rel(ort_logits(out), ref) < 1e-4
        assert rel(model.session().forward(IDS, all_logits=True), ref) < 1e-4


@pytest.mark.parametrize(
    "name", ["hunyuan-f32", "llama-f32", "llama3-f32", "qwen2-bf16", "qwen3-f32", "gemma3-f32", "mistral-f32"]
)
def test_greedy_tokens_match_transformers_generate(name, checkpoint, tmp_path):
    torch = ck.need_torch()
    src = checkpoint(name)
    out = tmp_path / "model.onnx"
    convert(src, out, QuantPolicy(format="none"))
    model = hf_model(src)
    model.generation_config.eos_token_id = None
    prompt = IDS[:6]
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompt)[None], max_new_tokens=20, do_sample=False, pad_token_id=0)[
            0, len(prompt) :
        ].tolist()
    import edge_runtime

    for s in (OrtSession(out), edge_runtime.load(out).session("numba")):
        logits, ours = s.forward(prompt), []
        for _ in range(20):
            ours.append(int(np.argmax(logits)))
            logits = s.forward(np.array(ours[-1:]))
        assert ours == ref, type(s).__name__


# FP8 tolerance, derived: a weight's FP8 relative error e (the report's rel_error, ~2-3% for E4M3 with
# per-channel scales on Gaussian weights) perturbs each linear's output by about e relative; these
# errors are independent across the n linears on a token's path and add in quadrature, and the
# residual stream carries them to the logits, so the logits move by about e * sqrt(n) relative. The
# assertion allows 2x that. The file itself is checked exactly: its own dequantized weights loaded
# into transformers give the same logits to 1e-4.
@pytest.mark.parametrize(
    "fmt,granularity", [("e4m3", "channel"), ("e5m2", "tensor"), ("auto", "block:16"), ("e4m3", "block:32")]
)
def test_fp8_conversion(fmt, granularity, checkpoint, tmp_path):
    src = checkpoint("hunyuan-f32")
    out = tmp_path / "model.onnx"
    report = convert(src, out, QuantPolicy(format=fmt, granularity=granularity))
    ours = ort_logits(out)
    model = hf_model(src)
    original = hf_logits(model)
    assert rel(ours, hf_logits(with_weights(model, dequantized(out)))) < 1e-4
    errs = [t["rel_error"] for t in report.tensors.values() if t["storage"] in ("e4m3", "e5m2")]
    n_linear = len(errs) // model.config.num_hidden_layers * model.config.num_hidden_layers
    tol = 2 * max(errs) * np.sqrt(n_linear)
    assert 0 < rel(ours, original) < tol
    quant = json.loads(F.metadata(onnx.load(str(out), load_external_data=False))[F.META_QUANT])
    assert quant["format"] == fmt and all(
        t["storage"] in ("e4m3", "e5m2") for n, t in quant["tensors"].items() if n.endswith("_proj.weight")
    )
    if fmt != "auto":
        assert {t["storage"] for t in report.tensors.values() if t["storage"] not in ("fp16", "fp32")} == {fmt}


def test_fp8_checkpoint_is_carried_byte_exactly(checkpoint, tmp_path):
    torch = ck.need_torch()
    from safetensors import safe_open

    fp8_dir = ck.make_fp8(checkpoint("hunyuan-bf16"), tmp_path / "fp8")
    out = tmp_path / "model.onnx"
    # the default policy carries the linears, not re-quantized; the tied head stays the bf16 embedding
    # here so that the logits can be held to the release's own semantics
    report = convert(fp8_dir, out, QuantPolicy(lm_head_fp8=False))
    arrays, types = initializers(out)
    with safe_open(fp8_dir / "model.safetensors", "pt") as f:
        for name in f.keys():
            if name.endswith("_proj.weight"):
                codes = f.get_tensor(name).view(torch.uint8).numpy()
                assert np.array_equal(arrays[name + F.QWEIGHT], codes), name
                assert types[name + F.QWEIGHT] == onnx.TensorProto.FLOAT8E4M3FN
                assert arrays[name + F.SCALE] == f.get_tensor(name + "_scale").float().numpy().item()
                assert report.tensors[name].get("carried")
    reference = hf_logits(ck.fp8_reference_model(fp8_dir))
    assert rel(ort_logits(out), reference) < 1e-4
    none = tmp_path / "none.onnx"
    convert(fp8_dir, none, QuantPolicy(format="none"))  # expanded: weight.float() * weight_scale
    assert rel(ort_logits(none), reference) < 1e-4


def fake_quant_hooks(model, fmt: str, static: dict[str, float] | None = None):
    """Forward pre-hooks that emulate activation FP8 with ml_dtypes: per-token amax scale, or static."""
    import torch

    dtype = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[fmt]
    fmax = float(ml_dtypes.finfo(dtype).max)

    def hook_for(name):
        def hook(module, args):
            x = args[0].numpy()
            if static is None:
                s = np.maximum(np.abs(x).max(-1, keepdims=True) / np.float32(fmax), np.finfo(np.float32).tiny)
            else:
                s = np.float32(static[name])
            q = np.clip(x / s, -fmax, fmax).astype(dtype).astype(np.float32) * s
            return (torch.from_numpy(q.astype(np.float32)),)

        return hook

    for name, module in model.named_modules():
        if name.endswith("_proj"):
            module.register_forward_pre_hook(hook_for(name))
    return model


def test_activation_fake_quantization_dynamic(checkpoint, tmp_path):
    src = checkpoint("hunyuan-f32")
    out = tmp_path / "model.onnx"
    # the hooks cover the *_proj linears: the tied head stays unquantized here
    convert(src, out, QuantPolicy(format="e4m3", activations="e4m3", lm_head_fp8=False))
    reference = fake_quant_hooks(with_weights(hf_model(src), dequantized(out)), "e4m3")
    assert rel(ort_logits(out), hf_logits(reference)) < 1e-3


def test_activation_fake_quantization_static(checkpoint, tmp_path):
    from safetensors import safe_open

    fp8_dir = ck.make_fp8(checkpoint("hunyuan-f32"), tmp_path / "fp8")
    out = tmp_path / "model.onnx"
    convert(fp8_dir, out, QuantPolicy(activations="static"))
    with safe_open(fp8_dir / "model.safetensors", "pt") as f:
        scales = {k[: -len(".input_scale")]: f.get_tensor(k).item() for k in f.keys() if k.endswith("input_scale")}
    reference = fake_quant_hooks(ck.fp8_reference_model(fp8_dir), "e4m3", static=scales)
    assert rel(ort_logits(out), hf_logits(reference)) < 1e-3
    with pytest.raises(Exception, match="input_scale"):
        convert(checkpoint("hunyuan-f32"), tmp_path / "x.onnx", QuantPolicy(activations="static"))


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_conversion_matches_transformers(qtype, tmp_path):
    path = ck.make_gguf_llama(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
    out = tmp_path / "model.onnx"
    convert(path, out, QuantPolicy(format="none"))
    reference = hf_model(path.parent, gguf_file=path.name)
    assert rel(ort_logits(out), hf_logits(reference)) < 1e-4


def test_llama3_gguf_rope_freqs_match_transformers(tmp_path):
    """A Llama 3.x GGUF carries its RoPE scaling as `rope_freqs` (a divisor per frequency, as llama.cpp's
    converter writes it): both backends give the logits of transformers' model of the checkpoint the
    file was made from, with its rope_scaling; transformers loading the GGUF itself drops the tensor and
    is the control (plain RoPE, other logits)."""
    import edge_runtime

    hf = tmp_path / "hf"
    path = ck.make_gguf_llama(tmp_path / "g" / "llama3.gguf", "F32", rope_scaling=LLAMA3_ROPE, hf_copy=hf)
    out = tmp_path / "model.onnx"
    convert(path, out, QuantPolicy(format="none"))
    ref = hf_logits(hf_model(hf))
    assert rel(hf_logits(hf_model(path.parent, gguf_file=path.name)), ref) > 1e-3
    model = edge_runtime.load(out)
    assert model.spec.rope_llama3 is None and len(model.spec.rope_freq_factors) == model.spec.head_dim // 2
    assert rel(ort_logits(out), ref) < 1e-4
    assert rel(model.session().forward(IDS, all_logits=True), ref) < 1e-4


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_hunyuan_gguf_matches_transformers(checkpoint, qtype, tmp_path):
    """llama.cpp's Hunyuan dense GGUF (architecture hunyuan-dense: the alpha-stretched RoPE base in freq_base,
    q/k norms as attn_q_norm / attn_k_norm) converts to the model of the checkpoint it was made from: both
    backends within 1e-4 of transformers' logits (F32; Q8_0 against the same checkpoint with the file's
    weights), the spec's RoPE base the stretched one."""
    import torch

    import edge_runtime

    hf = checkpoint("hunyuan-f32")
    path = ck.make_gguf_hunyuan(hf, tmp_path / "g" / f"hunyuan-{qtype}.gguf", qtype)
    out = tmp_path / "model.onnx"
    convert(path, out, QuantPolicy(format="none"))
    reference = hf_model(hf)
    model = edge_runtime.load(out)
    assert model.spec.model_type == "hunyuan_v1_dense" and model.spec.use_qk_norm
    rope, d = reference.config.rope_parameters, model.spec.head_dim
    assert model.spec.rope_theta == pytest.approx(rope["rope_theta"] * rope["alpha"] ** (d / (d - 2)), rel=1e-6)
    if qtype != "F32":  # the file's own (Q8_0) weights in transformers' model
        from hy_edge_convert.checkpoint import open_checkpoint

        with open_checkpoint(path) as ckpt, torch.no_grad():
            for name, param in reference.named_parameters():
                key = "model.embed_tokens.weight" if name == "lm_head.weight" else name
                param.copy_(torch.from_numpy(ckpt.tensors[key].load()))
    ref = hf_logits(reference)
    assert rel(ort_logits(out), ref) < 1e-4
    assert rel(model.session().forward(IDS, all_logits=True), ref) < 1e-4


def test_gemma3_sliding_window_and_local_rope_matter(checkpoint, tmp_path):
    """The control for Gemma 3's tiny checkpoint: the same weights with the window wider than the prompt, or
    with the sliding layers on the global RoPE base, give other logits (so the tests above see both)."""
    import shutil

    src = checkpoint("gemma3-f32")
    ref = hf_logits(hf_model(src))
    for change in ({"sliding_window": 256}, {"rope_parameters": {"sliding_attention": {"rope_theta": 10000.0}}}):
        other = tmp_path / str(len(list(tmp_path.iterdir())))
        shutil.copytree(src, other)
        cfg = json.loads((other / "config.json").read_text())
        if "rope_parameters" in change:
            cfg["rope_parameters"]["sliding_attention"]["rope_theta"] = 10000.0
        else:
            cfg.update(change)
        (other / "config.json").write_text(json.dumps(cfg))
        assert rel(hf_logits(hf_model(other)), ref) > 1e-3, change
    assert len(IDS) > 4  # the window's width


@pytest.mark.parametrize(
    "family,qtype", [("qwen2", "Q8_0"), ("qwen3", "Q6_K"), ("qwen3", "Q4_K"), ("gemma3", "F32"), ("gemma3", "Q8_0")]
)
def test_other_gguf_architectures_match_transformers_on_both_backends(family, qtype, tmp_path):
    """qwen2 / qwen3 / gemma3 GGUF files (no q/k permutation; Qwen2's biases, Qwen3's attn_q_norm /
    attn_k_norm; Gemma's norms stored as 1 + w, its four norms a layer, sliding window from the metadata)
    against transformers loading the same file: logits on both backends and greedy ids."""
    import edge_runtime

    torch = ck.need_torch()
    path = ck.make_gguf_llama(tmp_path / f"tiny-{family}-{qtype}.gguf", qtype=qtype, family=family)
    out = tmp_path / "model.onnx"
    convert(path, out, QuantPolicy(format="none"))
    reference = hf_model(path.parent, gguf_file=path.name)
    assert reference.config.model_type == {"gemma3": "gemma3_text"}.get(family, family)
    model = edge_runtime.load(out)
    assert model.spec.model_type == reference.config.model_type
    ref = hf_logits(reference)
    assert rel(ort_logits(out), ref) < 1e-4
    assert rel(model.session().forward(IDS, all_logits=True), ref) < 1e-4
    reference.generation_config.eos_token_id = None
    prompt = IDS[:6]
    with torch.no_grad():
        want = reference.generate(torch.tensor(prompt)[None], max_new_tokens=12, do_sample=False, pad_token_id=0)
    s, ours = model.session(), []
    logits = s.forward(prompt)
    for _ in range(12):
        ours.append(int(np.argmax(logits)))
        logits = s.forward(np.array(ours[-1:]))
    assert ours == want[0, len(prompt) :].tolist()


# -- the seed's architecture options, against the numpy reference -------------------------------------

SEED_OPTIONS = dict(
    num_hidden_layers=5,
    hidden_act="relu6",
    conv_kernel_size=4,
    layer_types=["attention", "dwconv", "attention", "dwconv", "dwconv"],
    shared_layers=[0, 1, 0, 1, 4],
)  # every option at once


def test_seed_options_match_numpy_reference(tmp_path):
    from hy_edge_format.spec import spec_from_hf_config
    from safetensors.numpy import load_file

    src = make_seed_checkpoint(tmp_path / "seed", **SEED_OPTIONS)
    spec = spec_from_hf_config(json.loads((src / "config.json").read_text()))
    weights = load_file(str(src / "model.safetensors"))
    ids = IDS[IDS < spec.vocab_size]
    out = tmp_path / "model.onnx"
    convert(src, out, QuantPolicy(format="none"))
    names = set(initializers(out)[0])
    assert not any(n.startswith(("model.layers.2.", "model.layers.3.")) for n in names)  # stored once
    assert rel(ort_logits(out, ids, split=3), reference_model.forward(spec, weights, ids)) < 1e-4
    fp8 = tmp_path / "fp8.onnx"
    convert(src, fp8, QuantPolicy(format="e4m3"))
    assert rel(ort_logits(fp8, ids, split=1), reference_model.forward(spec, dequantized(fp8), ids)) < 1e-4


def test_file_layout(checkpoint, tmp_path):
    out = tmp_path / "model.onnx"
    convert(checkpoint("hunyuan-f32"), out, QuantPolicy())
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[F.META_FORMAT] == str(F.FORMAT_VERSION)
    assert {F.META_SPEC, F.META_QUANT, F.META_TOKENIZER, F.META_TOKENIZER_CONFIG} <= set(meta)
    assert json.loads(meta[F.META_TOKENIZER_CONFIG])["chat_template"]
    assert max(o.type.tensor_type.elem_type for o in model.graph.output) == onnx.TensorProto.FLOAT
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == "model.onnx.data" and int(info["offset"]) % 64 == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_external_tensors_start_on_64k_boundaries(tmp_path):
    """Each tensor of 64 KB or more starts on a page of every common kernel (4, 16 or 64 KB: issue 11),
    smaller ones (read, not mapped) on a cache line; torch-free."""
    from edge_runtime.integrity import verify_checksums

    out = tmp_path / "model.onnx"
    seed = make_seed_checkpoint(tmp_path / "seed", hidden_size=256, intermediate_size=512)
    convert(seed, out, QuantPolicy())
    proto = onnx.load(str(out), load_external_data=False)
    entries = [
        {e.key: int(e.value) for e in t.external_data if e.key != "location"}
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    offsets = [e["offset"] for e in entries]
    big = [e["offset"] for e in entries if e["length"] >= 65536]
    assert len(big) > 2 and all(offset % 65536 == 0 for offset in big)
    assert all(offset % 64 == 0 for offset in offsets) and len(offsets) > len(big)
    assert verify_checksums(proto, out) == len(offsets)  # the padding between them is not data


def test_file_rope_table_is_the_engines(tmp_path):
    """The converter writes the RoPE frequencies the numba engine computes at load: the same bits."""
    from hy_edge_ops.rope import rope_inv_freq

    import edge_runtime

    out = tmp_path / "model.onnx"
    convert(make_seed_checkpoint(tmp_path / "seed"), out, QuantPolicy(format="none"))
    proto = onnx.load(str(out), load_external_data=False)
    (mul,) = [n for n in proto.graph.node if n.name == "/model/rope/Mul"]
    (table,) = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == mul.input[1]]
    spec = edge_runtime.load(out).spec
    assert table.dtype == np.float32 and table.tobytes() == rope_inv_freq(spec.head_dim, spec.rope_theta).tobytes()
