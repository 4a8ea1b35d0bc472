"""GGUF reading against transformers' own GGUF loading (tensors, config, tokenizer), on tiny files
written by gguf.GGUFWriter and on the real SmolLM2-135M-Instruct Q4_1 file."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GGUF_QTYPES
from gguf_reference import CONFIG_FIELDS, MESSAGES, TEXTS, digest, selected
from hy_edge_convert.checkpoint import open_checkpoint
from hy_edge_convert.gguf_reader import GGUFFile, permute_qk, unpermute_qk
from hy_edge_format.spec import spec_from_hf_config
from tokenizers import Tokenizer


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


def _hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _check_spec(ckpt, hf_config):
    spec = spec_from_hf_config(ckpt.config)
    for field in (f for f in CONFIG_FIELDS if f not in ("eos_token_id", "rms_norm_eps")):  # those two below
        assert getattr(spec, field) == getattr(hf_config, field), field
    assert spec.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps, rel=1e-7)
    assert spec.rope_theta == hf_config.rope_parameters["rope_theta"]
    assert spec.eos_token_id == (hf_config.eos_token_id,)
    assert spec.model_type == "llama" and not spec.use_qk_norm


def _check_tokenizer(ckpt, hf_tok):
    ours = Tokenizer.from_str(ckpt.tokenizer.data.decode())
    chat = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat == _render(ckpt, MESSAGES)  # same template, same special tokens
    for text in TEXTS + [chat]:
        ids = ours.encode(text).ids
        assert ids == hf_tok.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def _render(ckpt, messages):
    import jinja2

    c = ckpt.tokenizer.config
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(c["chat_template"]).render(
        messages=messages, add_generation_prompt=True, bos_token=c["bos_token"], eos_token=c["eos_token"]
    )


# -- tiny files, every tensor type -------------------------------------------------------------


@pytest.mark.parametrize("qtype", GGUF_QTYPES)
def test_tiny_gguf_matches_transformers(gguf_llama, qtype):
    path = gguf_llama[qtype]
    model = _hf_model(path)
    ref = {k: v.float().numpy() for k, v in model.state_dict().items()}
    with open_checkpoint(path) as ckpt:
        assert ckpt.kind == "gguf"
        tied = qtype == "Q4_1"
        assert ckpt.config["tie_word_embeddings"] is tied
        assert ("lm_head.weight" in ckpt.tensors) is not tied
        expected = set(ref) - ({"lm_head.weight"} if tied else set())
        assert set(ckpt.tensors) == expected
        for name, t in ckpt.tensors.items():
            got = t.load()
            assert got.dtype == np.float32 and got.shape == t.shape == ref[name].shape
            np.testing.assert_array_equal(got, ref[name], err_msg=name)
        _check_spec(ckpt, model.config)


def test_tiny_gguf_unpermutes_to_the_original_weights(gguf_llama, tmp_path):
    """F32 round trip: HF weights -> llama.cpp permute -> GGUF -> our reader == HF weights."""
    import checkpoints as ck
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with open_checkpoint(gguf_llama["F32"]) as ckpt:
        c = ckpt.config
        torch.manual_seed(0)  # the seed make_gguf_llama used
        shape_keys = (*CONFIG_FIELDS[: CONFIG_FIELDS.index("head_dim") + 1], "tie_word_embeddings")
        cfg = LlamaConfig(**{k: c[k] for k in shape_keys})
        original = LlamaForCausalLM(cfg)
        ck._randomize_norms(original, 0)
        for name, w in original.state_dict().items():
            np.testing.assert_array_equal(ckpt.tensors[name].load(), w.numpy(), err_msg=name)


def test_permutation_inverse_and_layout():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of D=8, 3 inputs
    p = permute_qk(w, 2)
    np.testing.assert_array_equal(unpermute_qk(p, 2), w)
    # llama.cpp interleaves each head's halves: rows (0, 4, 1, 5, 2, 6, 3, 7) of head 0
    np.testing.assert_array_equal(p[:8, 0], w[[0, 4, 1, 5, 2, 6, 3, 7], 0])


def test_tiny_gguf_tokenizer_matches_transformers(gguf_llama):
    path = gguf_llama["Q8_0"]
    with open_checkpoint(path) as ckpt:
        c = ckpt.tokenizer.config
        assert (c["bos_token"], c["eos_token"], c["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
        assert c["eos_token_ids"] == [ckpt.config["eos_token_id"]]
        _check_tokenizer(ckpt, _hf_tokenizer(path))


def test_header_matches_gguf_reader(gguf_llama):
    from gguf import GGUFReader

    path = gguf_llama["Q4_0"]
    reader = GGUFReader(path)
    f = GGUFFile(path)
    try:
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            value = field.contents()
            if isinstance(value, float):
                assert f.metadata[key] == pytest.approx(value), key
            else:
                assert f.metadata[key] == value, key
        assert [t.name for t in reader.tensors] == list(f.tensors)
        for t in reader.tensors:
            info = f.tensors[t.name]
            assert info.shape == tuple(int(d) for d in reversed(t.shape))
            assert info.ggml_type == t.tensor_type
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
    finally:
        f.close()


# -- the real SmolLM2-135M-Instruct Q4_1 file --------------------------------------------------


def test_smollm2_tensors_match_transformers(smollm2_gguf, smollm2_reference):
    ref = smollm2_reference
    with open_checkpoint(smollm2_gguf) as ckpt:
        names = selected(ckpt.tensors, ckpt.config["num_hidden_layers"])
        assert len(names) == 2 * 9 + 2  # tied: no lm_head / output.weight
        assert set(ref["tensors"]) == set(names) | {"lm_head.weight"}
        for name in names:
            got = ckpt.tensors[name].load()
            assert list(got.shape) == ref["tensors"][name]["shape"], name
            assert digest(got) == ref["tensors"][name]["sha256"], f"{name} differs from transformers' dequantization"
        spec = spec_from_hf_config(ckpt.config)
        for field, value in ref["config"].items():
            if field == "eos_token_id":
                value = (value,)
            if isinstance(value, float):
                value = pytest.approx(value, rel=1e-7)
            assert getattr(spec, field) == value, field


def test_smollm2_tokenizer_matches_transformers(smollm2_gguf, smollm2_reference):
    ref = smollm2_reference
    with open_checkpoint(smollm2_gguf) as ckpt:
        c = ckpt.tokenizer.config
        assert (c["bos_token"], c["eos_token"], c["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
        assert c["eos_token_ids"] == [2]
        assert _render(ckpt, MESSAGES) == ref["chat"]
        ours = Tokenizer.from_str(ckpt.tokenizer.data.decode())
        for case in ref["encoded"]:
            ids = ours.encode(case["text"]).ids
            assert ids == case["ids"], case["text"]
            assert ours.decode(ids, skip_special_tokens=False) == case["decoded"] == case["text"]
            assert ours.decode(ids, skip_special_tokens=True) == case["decoded_skip"]
        assert "<|im_start|>" in ref["chat"] and len(ours.encode(ref["chat"]).ids) > 20
        # SmolLM2's pre-tokenizer ("smollm", as StarCoder) puts each digit on its own
        assert len(ours.encode("12345").ids) == 5


def test_sentencepiece_gguf_tokenizer(tmp_path):
    """A "llama" (SentencePiece BPE) vocabulary: same ids as transformers, and as sentencepiece itself
    except on text that starts with a space (tokenizers' Metaspace does not prepend "▁" before an
    existing one; transformers' LlamaTokenizer shares that)."""
    import checkpoints as ck

    path = ck.make_gguf_llama(tmp_path / "spm" / "spm.gguf", "F16", num_hidden_layers=1, vocab_type="llama")
    sp = ck.train_sentencepiece()
    hf = _hf_tokenizer(path)
    with open_checkpoint(path) as ckpt:
        c = ckpt.tokenizer.config
        assert (c["bos_token"], c["eos_token"], c["add_bos_token"]) == ("<s>", "</s>", True)
        ours = Tokenizer.from_str(ckpt.tokenizer.data.decode())
        for text in TEXTS:
            ids = ours.encode(text).ids
            assert ids == hf.encode(text), text
            if not text.startswith(" "):
                assert ids == [sp.bos_id()] + sp.encode(text), text
            assert ours.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:])


def test_hunyuan_dense_pre_tokenizer_splits_as_llama_cpp():
    """tokenizer.ggml.pre "hunyuan-dense": llama.cpp splits with three regexes in turn, each on the pieces the
    one before left (digits in threes, CJK / kana runs, then words and punctuation). The pre-tokenizer built
    for it gives the pieces a plain `regex` implementation of that procedure gives, byte-level mapped."""
    import regex
    from hy_edge_convert import gguf_tokenizer as gt

    def split(text: str) -> list[str]:
        pieces = [text]
        for pattern in gt._HUNYUAN_SPLITS:
            out = []
            for piece in pieces:
                at = 0
                for m in regex.finditer(pattern, piece):
                    out += [piece[at : m.start()]] if m.start() > at else []
                    out += [m.group()] if m.group() else []
                    at = m.end()
                out += [piece[at:]] if at < len(piece) else []
            pieces = out
        return pieces

    to_unicode = gt.bytes_to_unicode()
    pre = gt._PRE["hunyuan-dense"][0]()
    for text in (
        "Hunyuan-0.5B runs 123456 tokens/s on a Pi 5, isn't it?\n\n  Yes!!",
        "你好，世界。今日はいい天気ですね、カタカナ123。",
        "x=3.14159; y = [1, 22, 333]\t# note:\r\n done   ",
        "",
    ):
        ours = [p for p, _ in pre.pre_tokenize_str(text)]
        assert ours == ["".join(to_unicode[b] for b in p.encode()) for p in split(text)], text
    assert ours == [] and len(split("12345")) == 2
