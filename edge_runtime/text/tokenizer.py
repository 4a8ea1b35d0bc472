"""Tokenizer carried in the model file: Hugging Face `tokenizers` (tokenizer.json text) or
SentencePiece (model bytes), plus the incremental detokenizer the generator streams text with."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from hy_edge_format import safe_json
from hy_edge_format.errors import ModelFileError
from hy_edge_format.format import META_TOKENIZER_CONFIG
from hy_edge_format.safe_json import JSONInputError, is_int, show

from .spm_tokenizer import AddedToken, SentencePieceTokenizer

META_KEY = META_TOKENIZER_CONFIG  # the metadata the config is read from, named in its errors


def token_text(v):
    """A token as tokenizer_config.json writes it: a string, or an AddedToken dict ({"content": ...})."""
    return v.get("content") if isinstance(v, dict) else v


REPLACEMENT = "\ufffd"  # what a decoder produces for an incomplete UTF-8 sequence


@dataclass(frozen=True)
class TokenizerConfig:
    """The fields of tokenizer_config.json the runtime uses."""

    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool | None = None  # None: whatever the tokenizer's post-processor does
    add_eos_token: bool = False
    eos_token_ids: tuple[int, ...] = ()
    # SentencePiece only (a tokenizer.json carries its own): LlamaTokenizer's switches, and the tokens
    # matched whole before the text is encoded
    legacy: bool | None = None
    add_prefix_space: bool | None = None
    added_tokens: tuple[AddedToken, ...] = ()
    additional_special_tokens: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict | None) -> TokenizerConfig:
        """From the model file's tokenizer_config metadata: every field typed (ModelFileError naming it).
        Token strings may be AddedToken dicts ({"content": ...}), as tokenizer_config.json has them."""
        d = d or {}

        def get(key, kind, default=None):
            try:
                return safe_json.field(d, key, kind, default)
            except JSONInputError as e:
                raise ModelFileError(f"metadata '{META_KEY}': {e}") from None

        def token(key):
            v = d.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if v is not None and not isinstance(v, str):
                raise ModelFileError(f"metadata '{META_KEY}': field '{key}' should be a token string, got {show(v)}")
            return v

        template = d.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            named = {k: v for k, v in named.items() if isinstance(k, str)}
            template = named.get("default") or next(iter(named.values()), None)
        eos_ids = d.get("eos_token_ids") or []
        if is_int(eos_ids):
            eos_ids = [eos_ids]
        if not isinstance(eos_ids, list) or not all(is_int(i) and i >= 0 for i in eos_ids):
            raise ModelFileError(
                f"metadata '{META_KEY}': field 'eos_token_ids' should be token ids, got {show(eos_ids)}"
            )
        added = get("added_tokens", "list", [])
        try:
            added_tokens = tuple(AddedToken.from_dict(t) for t in added)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ModelFileError(
                f"metadata '{META_KEY}': field 'added_tokens' holds an entry that is not a token"
            ) from None
        extra = [token_text(t) for t in get("additional_special_tokens", "list", [])]
        if not all(isinstance(t, str) for t in extra):
            raise ModelFileError(f"metadata '{META_KEY}': field 'additional_special_tokens' should be token strings")
        return cls(
            chat_template=template if isinstance(template, str) else None,
            bos_token=token("bos_token"),
            eos_token=token("eos_token"),
            unk_token=token("unk_token"),
            pad_token=token("pad_token"),
            add_bos_token=get("add_bos_token", "bool"),
            add_eos_token=get("add_eos_token", "bool", False),
            eos_token_ids=tuple(eos_ids),
            legacy=d.get("legacy") if isinstance(d.get("legacy"), bool) else None,
            add_prefix_space=d.get("add_prefix_space") if isinstance(d.get("add_prefix_space"), bool) else None,
            added_tokens=added_tokens,
            additional_special_tokens=tuple(extra),
        )

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return tuple(t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token) if t)


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text; `bos_id` / `eos_ids` from the config."""

    def __init__(self, backend, kind: str, config: TokenizerConfig):
        self._tok = backend
        self.kind = kind  # "tokenizers" | "sentencepiece"
        self.config = config
        self.bos_id = self.token_to_id(config.bos_token) if config.bos_token else None
        eos = set(config.eos_token_ids)
        if config.eos_token and self.token_to_id(config.eos_token) is not None:
            eos.add(self.token_to_id(config.eos_token))
        self.eos_ids: frozenset[int] = frozenset(eos)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, meta: dict, config: TokenizerConfig) -> Tokenizer:
        kind = meta.get("type")
        if kind not in ("tokenizers", "sentencepiece"):
            raise ModelFileError(f"tokenizer type {show(kind)} is not supported (tokenizers, sentencepiece)")
        payload = meta.get("json" if kind == "tokenizers" else "model_b64")
        if kind in ("tokenizers", "sentencepiece") and not isinstance(payload, str):
            raise ModelFileError(f"the model's {kind} tokenizer metadata holds no text, got {show(payload)}")
        try:
            if kind == "tokenizers":
                from tokenizers import Tokenizer as HFTokenizer

                return cls(HFTokenizer.from_str(payload), kind, config)
            if kind == "sentencepiece":
                sp = SentencePieceTokenizer(
                    base64.b64decode(payload, validate=True),
                    config.added_tokens,
                    config.special_tokens,
                    config.additional_special_tokens,
                    legacy=config.legacy,
                    add_prefix_space=config.add_prefix_space,
                )
                return cls(sp, kind, config)
        except ModelFileError:
            raise
        except BaseException as e:  # the tokenizer libraries refusing the file's bytes
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":  # Ctrl-C, exit
                raise
            raise ModelFileError(
                f"the model's tokenizer cannot be loaded ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e).strip() else ''})"
            ) from None
        raise ModelFileError(f"tokenizer type {show(kind)} is not supported (tokenizers, sentencepiece)")

    # -- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self.kind == "tokenizers":
            return self._tok.get_vocab_size(with_added_tokens=True)
        return self._tok.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # -- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With add_special_tokens (a raw prompt), BOS/EOS follow the config as
        transformers' tokenizer(text) does; a rendered chat template already holds its specials."""
        if self.kind == "tokenizers":
            ids = list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        else:
            ids = list(self._tok.encode(text))
        if add_special_tokens:
            # a tokenizer.json post-processor may have added them already; SentencePiece never does, and
            # text that starts with "<s>" gets a second one, as from LlamaTokenizer
            own = self.kind == "sentencepiece"
            add_bos = self.config.add_bos_token
            if add_bos is None:
                add_bos = own  # LlamaTokenizer's default
            if add_bos and self.bos_id is not None and (own or not ids or ids[0] != self.bos_id):
                ids.insert(0, self.bos_id)
            eos = self.token_to_id(self.config.eos_token) if self.config.eos_token else None
            if self.config.add_eos_token and eos is not None and (own or not ids or ids[-1] != eos):
                ids.append(eos)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)


@dataclass
class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas that never change afterwards.

    Decodes a small window of recent tokens (`ids[prefix:]`) and emits what the newest tokens added
    relative to `ids[prefix:read]` — the window keeps SentencePiece's leading-space handling and
    byte-level merges right. Text ending in U+FFFD (an incomplete UTF-8 sequence: the next token
    supplies its remaining bytes) is held back until it completes, or until `flush()`.
    """

    tokenizer: Tokenizer
    ids: list[int] = field(default_factory=list)
    prefix: int = 0  # window start
    read: int = 0  # tokens whose text has been emitted
    text: str = ""  # everything emitted so far

    def add(self, token: int) -> str:
        """Append one token; returns the newly final text (possibly '')."""
        self.ids.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        """End of stream: emit whatever is held back (a dangling partial character included)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        dec = self.tokenizer.decode
        before = dec(self.ids[self.prefix : self.read])
        now = dec(self.ids[self.prefix :])
        if len(now) <= len(before) or (now.endswith(REPLACEMENT) and not final):
            return ""
        delta = now[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta
