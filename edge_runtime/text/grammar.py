"""Structured output: OpenAI's `response_format` (json_object, json_schema) enforced token by token by
llguidance (a grammar engine made for it: Earley parser over the tokenizer's byte strings, ~0.1 ms per mask).

`json_processor(tokenizer, vocab_size, eos_ids, response_format, prompt_tokens)` returns a logits processor (the
`(tokens, logits) -> logits` shape of sampling.py): each call feeds the matcher the tokens sampled since the
previous call, then sets every token the grammar does not allow next to -inf. Once the value is complete only
an end-of-sequence token is allowed, so the answer ends there. An answer cut by max_tokens is cut JSON (as
OpenAI's, finish_reason "length"). `tool_processor` does the same for a tools.Tools' call list, from the first
token or, for tool_choice "auto", from the call's opening tag on.

llguidance comes with the `serve` extra and is imported only here, when a request asks for structured output.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from hy_edge_format.errors import HyEdgeError

from .sampling import LogitsProcessor

# whitespace between tokens bounded (llguidance's default is unbounded: a sampled answer could run to max_tokens
# on blanks); a schema's own "x-guidance" options come after these
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,16}"}

_lock = threading.Lock()
_tokenizers: dict[int, object] = {}  # id(Tokenizer) -> llguidance.LLTokenizer (building one takes ~0.5 s)


def schema_of(response_format: Mapping) -> dict | None:
    """The JSON schema a response_format asks for; None for {"type": "text"}. HyEdgeError naming what is wrong."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise HyEdgeError("response_format: json_schema.schema should be a JSON schema (an object)")
        return dict(schema)
    raise HyEdgeError(f"response_format: type should be text, json_object or json_schema, got {kind!r}")


def _ll_tokenizer(tokenizer, vocab_size: int, eos_ids: Collection[int]):
    try:
        import llguidance
    except ImportError:
        raise HyEdgeError("response_format needs llguidance: pip install 'hy-edge[serve]'") from None
    if tokenizer.kind != "tokenizers":
        raise HyEdgeError(f"response_format: not supported with a {tokenizer.kind} tokenizer")
    key = id(tokenizer)
    with _lock:
        if key not in _tokenizers:
            _tokenizers[key] = llguidance.LLTokenizer(
                tokenizer._tok.to_str(), n_vocab=vocab_size, eos_token=sorted(eos_ids)
            )
        return _tokenizers[key]


def json_processor(
    tokenizer, vocab_size: int, eos_ids: Collection[int], response_format: Mapping, prompt_tokens: int
) -> LogitsProcessor | None:
    """A processor that holds the answer to `response_format`'s JSON schema (None for plain text).
    `prompt_tokens`: where the answer starts in the token history the processor is given."""
    schema = schema_of(response_format)
    if schema is None:
        return None
    ll = _ll_tokenizer(tokenizer, vocab_size, eos_ids)
    import llguidance

    grammar = _compiled("response_format", lambda: llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema), defaults=JSON_OPTIONS
    ))  # fmt: skip
    return _Constrained(ll, grammar, prompt_tokens, "response_format")


def tool_processor(tokenizer, vocab_size: int, eos_ids: Collection[int], tools, prompt_tokens: int) -> LogitsProcessor:
    """A processor that holds the answer to a tools.Tools' call list between its family's tags: from the first
    token (tool_choice "required" or named), or from the opening tag on ("auto": the model may answer in text;
    a call, once opened, is a valid one)."""
    ll = _ll_tokenizer(tokenizer, vocab_size, eos_ids)
    import llguidance

    fmt = tools.format
    open_, close = json.dumps(fmt.open), json.dumps(fmt.close)
    if fmt.per_call:  # up to max_calls objects, each between its own tags: "\n" inside and between them
        calls = f"call: %json {json.dumps({**tools.call_schema(), 'x-guidance': JSON_OPTIONS})}"
        more = ""
        for _ in range(tools.max_calls - 1):
            more = f'("\\n" {open_} "\\n" call "\\n" {close} {more})?'
        body = f'"\\n" call "\\n" {close} {more}'
    else:
        calls = f"calls: %json {json.dumps({**tools.calls_schema(), 'x-guidance': JSON_OPTIONS})}"
        body = f"calls {close}"
    if tools.lazy:
        lark = f"start: {body}\n{calls}"
    else:
        lark = f"start: {open_} {body}\n{calls}"
    grammar = _compiled("tools", lambda: llguidance.LLMatcher.grammar_from_lark(lark))
    if not tools.lazy:
        return _Constrained(ll, grammar, prompt_tokens, "tools")
    return _Lazy(ll, grammar, prompt_tokens, tools.format.open.encode())


def _compiled(field: str, build) -> str:
    """A grammar llguidance accepts; HyEdgeError naming `field` otherwise."""
    import llguidance

    try:
        grammar = build()
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError) as e:
        error = str(e)
    if error:
        raise HyEdgeError(f"{field}: the JSON schema is not usable: {error.splitlines()[0]}")
    return grammar


class _Constrained:
    """A logits processor over one llguidance matcher: each call feeds the matcher the tokens sampled since the
    previous call, then sets every token the grammar does not allow next to -inf."""

    def __init__(self, ll, grammar: str, consumed: int, field: str = "grammar"):
        import llguidance

        self.matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise HyEdgeError(f"{field}: the JSON schema is not usable: {self.matcher.get_error().splitlines()[0]}")
        self.mask = np.zeros((ll.vocab_size + 31) // 32, np.int32)  # (ceil(V / 32),) one bit per token
        self.consumed = consumed  # tokens of the history already fed to the matcher

    def feed(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            if not self.matcher.consume_token(int(token)):
                raise HyEdgeError(f"structured output: the grammar refused a token ({self.matcher.get_error()})")

    def __call__(self, tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        self.feed(tokens[self.consumed :])
        self.consumed = len(tokens)
        self.matcher.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        allowed = np.unpackbits(self.mask.view(np.uint8), bitorder="little")[: logits.shape[0]]
        logits[: allowed.shape[0]][allowed == 0] = -np.inf
        logits[allowed.shape[0] :] = -np.inf  # padded logits beyond the tokenizer
        return logits


class _Lazy:
    """A grammar switched on by a trigger (the opening tag of a tool call): until the answer's bytes hold it, the
    logits pass unchanged; from then on `_Constrained`, fed first with what followed the tag in its token."""

    def __init__(self, ll, grammar: str, consumed: int, trigger: bytes):
        self.ll, self.grammar, self.consumed, self.trigger = ll, grammar, consumed, trigger
        self.text = b""  # the answer's bytes, until the trigger
        self.active: _Constrained | None | bool = None  # False: the trigger came in a token no call can follow
        _Constrained(ll, grammar, consumed)  # a grammar error is the request's, now, not at the trigger

    def __call__(self, tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        if self.active is None:
            new = tokens[self.consumed :]
            self.consumed = len(tokens)
            start = max(0, len(self.text) - len(self.trigger) + 1)
            self.text += self.ll.decode_bytes([int(t) for t in new])
            at = self.text.find(self.trigger, start)
            if at < 0:
                return logits
            self.active = _Constrained(self.ll, self.grammar, len(tokens))
            try:
                self.active.feed(self.ll.tokenize_bytes(self.text[at + len(self.trigger) :]))
            except HyEdgeError:  # the tag's token carried text no call starts with: the answer stays text
                self.active = False
        return self.active(tokens, logits) if self.active else logits
