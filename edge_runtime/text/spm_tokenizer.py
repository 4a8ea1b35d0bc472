"""A SentencePiece model (tokenizer.model) encoding as transformers' LlamaTokenizer does.

`SentencePieceProcessor.encode` on a rendered chat template would spell `<s>`, `</s>` and role markers
out as text. transformers first cuts the text at its added tokens (the model's control and
user-defined pieces, the bos/eos/unk/pad tokens, tokenizer_config.json's `added_tokens_decoder` and
`additional_special_tokens`), maps each to its id, and encodes the pieces between them on their own.
Each such piece gets the "▁" prefix as LlamaTokenizer's Metaspace pre-tokenizer gives it
(`prepend_scheme`, from `add_prefix_space` and `legacy`):

- "always" (`legacy: true`): every piece, unless it already starts with a space;
- "first" (`legacy: false`, transformers' default): only a piece at the very start of the text;
- "never" (`add_prefix_space: false`).

The pieces are encoded by SentencePiece itself with the dummy prefix and whitespace removal turned
off (LlamaTokenizer has no normalizer: spaces are kept as they are, and the prefix is ours to add);
decoding drops the one leading space the prefix put there, as LlamaTokenizer's decoder does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SPACE = "\u2581"  # "▁", SentencePiece's whitespace symbol

# sentencepiece_model.proto field numbers
_MODEL_PIECES, _MODEL_NORMALIZER, _MODEL_SELF_TEST = 1, 3, 4  # ModelProto fields
_PIECE_TYPE = 3  # SentencePiece.type: 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
# A second normalizer_spec appended to the serialized model: protobuf merges repeated message fields
# and the last value of a scalar wins, so this sets add_dummy_prefix (field 3) and
# remove_extra_whitespaces (field 4) to false and keeps the rest of the model's spec.
_NO_PREFIX_NO_STRIP = bytes([_MODEL_NORMALIZER << 3 | 2, 4, 3 << 3, 0, 4 << 3, 0])


@dataclass(frozen=True)
class AddedToken:
    """One entry of tokenizer_config.json's `added_tokens_decoder` (tokenizers' AddedToken)."""

    id: int
    content: str
    special: bool = True  # skipped by decode(skip_special_tokens=True)
    lstrip: bool = False  # also takes the whitespace on its left
    rstrip: bool = False  # also takes the whitespace on its right
    single_word: bool = False  # matches only between non-word characters

    @classmethod
    def from_dict(cls, d: dict) -> AddedToken:
        return cls(
            id=int(d["id"]),
            content=str(d["content"]),
            special=bool(d.get("special", True)),
            lstrip=bool(d.get("lstrip", False)),
            rstrip=bool(d.get("rstrip", False)),
            single_word=bool(d.get("single_word", False)),
        )


def piece_types(model_proto: bytes) -> list[int]:
    """Every piece's type, read from the serialized ModelProto (the sentencepiece Python API has no
    is_user_defined)."""
    types = []
    for num, value, _ in _fields(model_proto):
        if num == _MODEL_PIECES:
            t = 1  # proto default: NORMAL
            for n, v, _ in _fields(value):
                if n == _PIECE_TYPE:
                    t = v
            types.append(t)
    return types


def encoder_proto(model_proto: bytes) -> bytes:
    """The model with no dummy prefix and no whitespace removal. Its self-test samples (encodings
    SentencePiece checks on load) are dropped: they were made with the model's own settings."""
    kept = b"".join(raw for num, _, raw in _fields(model_proto) if num != _MODEL_SELF_TEST)
    return kept + _NO_PREFIX_NO_STRIP


def _varint(b: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return x, i


def _fields(b: bytes):
    """(field number, value, raw bytes of the field) of a protobuf message; values are ints for
    varints, bytes otherwise."""
    i = 0
    while i < len(b):
        start = i
        key, i = _varint(b, i)
        wire = key & 7
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i : i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            v, i = b[i : i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire} is not supported")
        yield key >> 3, v, b[start:i]


class SentencePieceTokenizer:
    """encode(text) -> ids with added tokens matched whole; decode(ids) -> text."""

    def __init__(
        self,
        model_proto: bytes,
        added_tokens: tuple[AddedToken, ...] = (),
        special_tokens: tuple[str, ...] = (),
        additional_special_tokens: tuple[str, ...] = (),
        legacy: bool | None = None,
        add_prefix_space: bool | None = None,
    ):
        import sentencepiece as spm

        # without the dummy prefix, SentencePiece's decode keeps a leading space too: the prefix is ours
        self.sp = spm.SentencePieceProcessor(model_proto=encoder_proto(model_proto))
        self.prepend = "never" if add_prefix_space is False else "always" if legacy else "first"

        # The model's unknown piece (LlamaTokenizer's unk_token) and its control and user-defined pieces
        # (transformers' SentencePieceExtractor), then the config's tokens, which win where they name the
        # same text. (transformers 5 drops the model's pieces when the config lists additional_special_tokens
        # of its own, and spells them out byte by byte; SentencePiece always emits a user-defined piece
        # whole, so they are kept.)
        types = piece_types(model_proto)
        tokens: dict[str, AddedToken] = {}
        for i, t in enumerate(types):
            if t in (_UNKNOWN, _CONTROL, _USER_DEFINED):
                piece = self.sp.id_to_piece(i)
                tokens[piece] = AddedToken(i, piece, special=t != _USER_DEFINED)
        for t in added_tokens:
            tokens[t.content] = t
        for s in special_tokens + additional_special_tokens:
            i = tokens[s].id if s in tokens else self._piece_id(s)
            if i is not None:
                tokens[s] = AddedToken(i, s, special=True, **_flags(tokens.get(s)))
        self.added = {t.content: t for t in tokens.values() if t.content}
        self.added_by_id = {t.id: t for t in self.added.values()}
        self.special_ids = frozenset(
            [t.id for t in self.added.values() if t.special]
            + [i for i, t in enumerate(types) if t in (_UNKNOWN, _CONTROL)]
        )
        # longest first: Python's alternation takes the first alternative that matches, tokenizers the
        # longest match at the leftmost position
        self._by_group = sorted(self.added.values(), key=lambda t: -len(t.content))
        self._split = re.compile("|".join(map(_pattern, self._by_group))) if self._by_group else None

    @property
    def vocab_size(self) -> int:
        return max([self.sp.get_piece_size(), *(i + 1 for i in self.added_by_id)])

    def _piece_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def token_to_id(self, token: str) -> int | None:
        t = self.added.get(token)
        return t.id if t is not None else self._piece_id(token)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for m in self._split.finditer(text) if self._split is not None else ():
            ids += self._encode_piece(text[start : m.start()], start)
            ids.append(self._by_group[m.lastindex - 1].id)  # one capturing group per token
            start = m.end()
        ids += self._encode_piece(text[start:], start)
        return ids

    def _encode_piece(self, piece: str, offset: int) -> list[int]:
        if not piece:
            return []
        # Metaspace: no "▁" before one that is already there
        if not piece.startswith((" ", SPACE)) and (
            self.prepend == "always" or (self.prepend == "first" and offset == 0)
        ):
            piece = SPACE + piece
        return list(self.sp.encode(piece))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Special tokens are dropped (skip_special_tokens) or spelled out; added tokens that are not
        special are always spelled out, as transformers' decode does."""
        parts: list[str] = []
        run: list[int] = []
        n = self.sp.get_piece_size()
        for i in ids:
            special = i in self.special_ids
            if special and skip_special_tokens:
                continue
            if special or i >= n:  # SentencePiece spells control pieces as "" and knows no added ids
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                t = self.added_by_id.get(i)
                parts.append(t.content if t is not None else self.sp.id_to_piece(i) if i < n else "")
            else:
                run.append(i)
        if run:
            parts.append(self.sp.decode(run))
        text = "".join(parts)
        # LlamaTokenizer's decoder ends with Strip(left=1) when it adds the prefix: one space, at the start
        return text[1:] if self.prepend != "never" and text.startswith(" ") else text


def _pattern(t: AddedToken) -> str:
    """The token in a capturing group, with the whitespace its lstrip/rstrip take and the word
    boundaries single_word asks for."""
    p = f"({re.escape(t.content)})"
    if t.single_word:
        p = rf"(?<!\w){p}(?!\w)"
    return (r"\s*" if t.lstrip else "") + p + (r"\s*" if t.rstrip else "")


def _flags(t: AddedToken | None) -> dict:
    return {} if t is None else {"lstrip": t.lstrip, "rstrip": t.rstrip, "single_word": t.single_word}
