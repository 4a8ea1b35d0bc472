"""A Hugging Face `tokenizers` tokenizer.json built from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), the
merges, token types and special ids as metadata, and names the pre-tokenizer (`tokenizer.ggml.pre`).
We rebuild the tokenizer those describe, as llama.cpp (llama-vocab.cpp) and transformers'
integrations/gguf/gguf_tokenizer_mapping.py do:

- `gpt2`: byte-level BPE; the split regex comes from the `pre` name;
- `llama`: SentencePiece BPE over "▁"-marked text with byte fallback (transformers' LlamaTokenizer),
  merges recovered from the vocabulary and its scores.
"""

from __future__ import annotations

from pathlib import Path

from hy_edge_format.errors import CheckpointError
from hy_edge_format.safe_json import is_int, is_number, show
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp token types (gguf.TokenType)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Split regexes, from llama.cpp's llama-vocab.cpp / the models' own tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Hunyuan dense: digits in threes, runs of CJK ideographs and kana, then words and punctuation; each regex splits
# the pieces the one before left (llama.cpp's unicode_regex_split)
_HUNYUAN_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


def _byte_level(regex: str | tuple[str, ...] | None = None, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    """ByteLevel after optional regex splits, in turn; regex None keeps ByteLevel's built-in GPT-2 regex
    ('s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+)."""
    steps: list = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    for r in (regex,) if isinstance(regex, str) else regex or ():
        steps.append(pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=regex is None))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


# tokenizer.ggml.pre -> (pre-tokenizer factory, ignore_merges)
_PRE = {
    "default": (lambda: _byte_level(), False),
    "gpt-2": (lambda: _byte_level(), False),
    # StarCoder family (SmolLM2's tokenizer.json): each digit on its own, then GPT-2's regex
    "smollm": (lambda: _byte_level(digits=True), False),
    "starcoder": (lambda: _byte_level(digits=True), False),
    "refact": (lambda: _byte_level(digits=True), False),
    # Llama 3: its tokenizer.json (and llama.cpp) look whole words up before merging
    "llama-bpe": (lambda: _byte_level(_LLAMA3_SPLIT), True),
    "llama3": (lambda: _byte_level(_LLAMA3_SPLIT), True),
    "qwen2": (lambda: _byte_level(_QWEN2_SPLIT), False),
    "hunyuan-dense": (lambda: _byte_level(_HUNYUAN_SPLITS), False),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are spelled."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


# tokenizer.* key -> (check, what it should be): every value is typed before the tokenizer is built
_KINDS = {
    "tokenizer.ggml.model": (lambda v: isinstance(v, str), "a string"),
    "tokenizer.ggml.pre": (lambda v: isinstance(v, str), "a string"),
    "tokenizer.ggml.tokens": (
        lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
        "a list of strings",
    ),
    "tokenizer.ggml.token_type": (lambda v: isinstance(v, list) and all(is_int(t) for t in v), "a list of integers"),
    "tokenizer.ggml.merges": (
        lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
        "a list of strings",
    ),
    "tokenizer.ggml.scores": (lambda v: isinstance(v, list) and all(is_number(t) for t in v), "a list of numbers"),
    "tokenizer.ggml.add_bos_token": (lambda v: isinstance(v, bool), "true or false"),
    "tokenizer.ggml.add_eos_token": (lambda v: isinstance(v, bool), "true or false"),
    "tokenizer.ggml.add_space_prefix": (lambda v: isinstance(v, bool), "true or false"),
    "tokenizer.chat_template": (lambda v: isinstance(v, str), "a string"),
    **{
        f"tokenizer.ggml.{k}_token_id": (lambda v: is_int(v) and v >= 0, "a token id")
        for k in ("bos", "eos", "eot", "unknown", "padding")
    },
}


def _check_types(meta: dict, path: Path) -> None:
    for key, (ok, what) in _KINDS.items():
        if key in meta and not ok(meta[key]):
            raise CheckpointError(f"{path}: GGUF metadata '{key}' should be {what}, got {show(meta[key])}")


def tokenizer_from_gguf(meta: dict, path: Path) -> tuple[str, dict] | None:
    """(tokenizer.json text, tokenizer config) from GGUF metadata, or None without a vocabulary.
    CheckpointError (one line, naming the key) for metadata the tokenizer cannot be built from."""
    _check_types(meta, path)
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        return None
    try:
        return _build(meta, model, tokens, path)
    except BaseException as e:
        if not is_library_error(e):
            raise
        raise CheckpointError(
            f"{path}: the GGUF tokenizer metadata does not describe a tokenizer ({_why(e)})"
        ) from None


def is_library_error(e: BaseException) -> bool:
    """An error of the `tokenizers` library itself: it raises plain Exception for what it refuses, and
    its Rust panics arrive as pyo3's PanicException (a BaseException). Errors of any other type are
    bugs and keep their traceback."""
    return type(e) is Exception or type(e).__name__ == "PanicException"


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else type(e).__name__


def _build(meta: dict, model: str, tokens: list[str], path: Path) -> tuple[str, dict]:
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if model == "gpt2":
        tok = _byte_level_bpe(meta, tokens, path)
        add_bos_default = False
    elif model == "llama":
        tok = _sentencepiece_bpe(meta, tokens, path)
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise CheckpointError(f"{path}: tokenizer.ggml.model '{model}' is not supported (supported: gpt2, llama)")

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    specials = [
        t for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL or (ty == _UNKNOWN and model == "llama")
    ]
    if model == "gpt2":
        # A control token spelled outside the byte alphabet is a llama.cpp mislabel
        # (transformers skips these too).
        alphabet = set(bytes_to_unicode().values())
        specials = [t for t in specials if set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    vocab = tok.get_vocab()
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = token("bos_token_id"), token("eos_token_id")
    single: list[str] = []
    special_ids = []
    if add_bos and bos is not None:
        single.append(bos)
        special_ids.append((bos, meta["tokenizer.ggml.bos_token_id"]))
    single.append("$A")
    if add_eos and eos is not None:
        single.append(eos)
        special_ids.append((eos, meta["tokenizer.ggml.eos_token_id"]))
    if special_ids:
        tok.post_processor = processors.TemplateProcessing(
            single=single,
            pair=single + [s if s != "$A" else "$B:1" for s in single],
            special_tokens=list(dict.fromkeys(special_ids)),
        )
    elif model == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    eos_ids = [
        meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if isinstance(meta.get(k), int)
    ]
    config = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "eos_token_ids": list(dict.fromkeys(eos_ids)),
    }
    return tok.to_str(), config


def _merges(meta: dict, path: Path) -> list[tuple[str, str]]:
    out = []
    for m in meta.get("tokenizer.ggml.merges") or ():
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{path}: tokenizer.ggml.merges entry {m!r} is not a pair")
        out.append((parts[0], parts[1]))
    return out


def _byte_level_bpe(meta: dict, tokens: list[str], path: Path) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE:
        raise CheckpointError(
            f"{path}: tokenizer.ggml.pre '{pre}' is not supported (supported: {', '.join(sorted(_PRE))})"
        )
    make_pre, ignore_merges = _PRE[pre]
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # llama.cpp keeps byte-level spellings; a token written in plain text is respelled byte by byte.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges(meta, path),
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=ignore_merges,
        )
    )
    tok.normalizer = None
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict, tokens: list[str], path: Path) -> Tokenizer:
    """transformers' LlamaTokenizer: BPE with byte fallback over Metaspace ("▁") text."""
    scores = meta.get("tokenizer.ggml.scores")
    if "tokenizer.ggml.merges" in meta:
        merges = _merges(meta, path)
    elif scores is not None and len(scores) == len(tokens):
        merges = _merges_from_scores(tokens, scores)
    else:
        raise CheckpointError(f"{path}: SentencePiece vocabulary has neither merges nor scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE ranks merges by the score of the merged piece (transformers' generate_merges)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores, strict=True)).items():
        local = [
            (piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
