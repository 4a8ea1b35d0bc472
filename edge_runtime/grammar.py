"""Structured output: OpenAI's `response_format` (json_object, json_schema) enforced token by token by
llguidance (a grammar engine made for it: Earley parser over the tokenizer's byte strings, ~0.1 ms per mask).

`json_processor(tokenizer, vocab_size, response_format, prompt_tokens)` returns a logits processor (the
`(tokens, logits) -> logits` shape of sampling.py): each call feeds the matcher the tokens sampled since the
previous call, then sets every token the grammar does not allow next to -inf. Once the value is complete only
an end-of-sequence token is allowed, so the answer ends there. An answer cut by max_tokens is cut JSON (as
OpenAI's, finish_reason "length").

llguidance comes with the `serve` extra and is imported only here, when a request asks for structured output.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from .errors import HyEdgeError
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
    import llguidance

    ll = _ll_tokenizer(tokenizer, vocab_size, eos_ids)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    except (ValueError, TypeError) as e:
        raise HyEdgeError(f"response_format: the JSON schema is not usable: {str(e).splitlines()[0]}") from None
    if matcher.is_error():
        raise HyEdgeError(f"response_format: the JSON schema is not usable: {matcher.get_error().splitlines()[0]}")
    words = (ll.vocab_size + 31) // 32
    mask = np.zeros(words, np.int32)  # (ceil(V / 32),) one bit per token: allowed next
    consumed = [prompt_tokens]

    def constrain(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        for token in tokens[consumed[0] :]:  # what was sampled since the last call
            if not matcher.consume_token(int(token)):
                raise HyEdgeError(f"structured output: the grammar refused a token ({matcher.get_error()})")
        consumed[0] = len(tokens)
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[: logits.shape[0]]
        logits[allowed[: logits.shape[0]] == 0] = -np.inf
        if allowed.shape[0] < logits.shape[0]:  # padded logits beyond the tokenizer
            logits[allowed.shape[0] :] = -np.inf
        return logits

    return constrain
