"""Tokenizer wrapper and the incremental detokenizer (multi-byte characters split across tokens)."""

from __future__ import annotations

import base64
import io
import json

import pytest

from edge_runtime.tokenizer import REPLACEMENT, Tokenizer, TokenizerConfig

TEXT = "héllo 世界 😀 ok"


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: every UTF-8 byte is its own token, so a CJK character or an
    emoji spans three or four tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    meta = {"type": "tokenizers", "json": tok.to_str()}
    cfg = TokenizerConfig.from_dict({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True})
    return Tokenizer.from_metadata(json.loads(json.dumps(meta)), cfg)


@pytest.fixture(scope="module")
def sp_tokenizer() -> Tokenizer:
    import sentencepiece as spm

    buf = io.BytesIO()
    text = ["hello world", "the quick brown fox jumps over the lazy dog", "héllo 世界 ok"] * 40
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=buf,
        vocab_size=300,
        byte_fallback=True,
        model_type="bpe",
        minloglevel=2,
    )
    meta = {"type": "sentencepiece", "model_b64": base64.b64encode(buf.getvalue()).decode()}
    return Tokenizer.from_metadata(meta, TokenizerConfig.from_dict({"bos_token": "<s>", "eos_token": "</s>"}))


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    d = tok.detokenizer()
    deltas = [d.add(i) for i in ids]
    deltas.append(d.flush())
    return deltas


@pytest.mark.parametrize("name", ["byte_tokenizer", "sp_tokenizer"])
def test_detokenizer_never_emits_partial_characters(name, request):
    tok = request.getfixturevalue(name)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT.split())  # multi-byte characters really are split
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == TEXT
    assert not any(REPLACEMENT in d for d in deltas)
    # every prefix of the emitted text is a prefix of the final text (nothing is ever revised)
    acc = ""
    for d in deltas:
        acc += d
        assert TEXT.startswith(acc)


def test_detokenizer_flush_emits_a_dangling_partial_character(byte_tokenizer):
    ids = byte_tokenizer.encode("a世", add_special_tokens=False)[:-1]  # cut inside 世
    d = byte_tokenizer.detokenizer()
    assert "".join(d.add(i) for i in ids) == "a"
    assert d.flush() == REPLACEMENT


def test_encode_adds_bos_per_config(byte_tokenizer, sp_tokenizer):
    assert byte_tokenizer.encode("hi")[0] == byte_tokenizer.bos_id == 256
    assert byte_tokenizer.encode("hi", add_special_tokens=False)[0] != 256
    assert sp_tokenizer.encode("hello")[0] == sp_tokenizer.bos_id == 1  # LlamaTokenizer default: add BOS
    assert 257 in byte_tokenizer.eos_ids


def test_decode_skips_special_tokens(byte_tokenizer):
    ids = byte_tokenizer.encode("ok") + [257]
    assert byte_tokenizer.decode(ids) == "ok"
