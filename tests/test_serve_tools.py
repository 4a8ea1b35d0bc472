"""Tool calls (edge_runtime/text/tools.py, grammar.tool_processor) without a server: tool_choice "auto" leaves the
answer free until the call's opening tag and holds it to a valid call list from there on (a walk over random
logits under the mask ends in calls that validate against the tool's parameters); a stream sends content and
holds back a tag's beginning; answers split into content and tool_calls."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hy_edge_format.errors import HyEdgeError
from runtime_helpers import converted

import edge_runtime
from edge_runtime.text.generate import eos_ids_of
from edge_runtime.text.tools import FORMATS, ToolStream, parse_tools, split

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "forecast", "parameters": PARAMETERS}}
FMT = FORMATS["llama"]


@pytest.fixture(scope="module")
def model(llama_dir):
    return edge_runtime.load(converted(llama_dir, "e4m3"), threads=1)


@pytest.mark.parametrize("family", sorted(FORMATS))  # the tags differ; the tiny Llama's tokenizer spells both
def test_auto_holds_the_answer_to_a_valid_call_from_the_opening_tag_on(model, family):
    from edge_runtime.text.grammar import tool_processor

    tok, V = model.tokenizer, model.spec.vocab_size
    eos = eos_ids_of(model.spec, tok, ())
    tools = parse_tools(family, [WEATHER], "auto")
    fmt = FORMATS[family]
    prompt = model.encode_prompt("hi")
    process = tool_processor(tok, V, eos, tools, len(prompt))
    rng = np.random.default_rng(0)
    history = prompt + tok.encode("Let me look. ", add_special_tokens=False)
    logits = rng.standard_normal(V).astype(np.float32)
    assert np.array_equal(process(history, logits.copy()), logits)  # free text: nothing masked
    history += tok.encode(fmt.open, add_special_tokens=False)
    answer_from = len(history)
    for _ in range(400):  # greedy over random logits, under the mask
        masked = process(history, rng.standard_normal(V).astype(np.float32))
        allowed = np.flatnonzero(np.isfinite(masked))
        assert allowed.size > 0
        if len(history) == answer_from:  # right after the tag: whitespace, or the list's "[" / the call's "{"
            texts = [tok.decode([int(t)], skip_special_tokens=False).lstrip() for t in allowed]
            assert all(t == "" or t.startswith("{" if fmt.per_call else "[") for t in texts), texts[:20]
        token = int(np.argmax(masked))
        if token in eos:
            break
        history.append(token)
    else:
        raise AssertionError("the call never ended")
    text = tok.decode(history[len(prompt) :], skip_special_tokens=False)
    content, calls = split(text, fmt)
    assert content == "Let me look." and calls and text.endswith(fmt.close), text
    for call in calls:
        assert call["function"]["name"] == "forecast"
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS)


def test_text_after_the_tag_in_the_same_tokens_is_held_to_the_grammar(model):
    from edge_runtime.text.grammar import tool_processor

    tok, V = model.tokenizer, model.spec.vocab_size
    process = tool_processor(tok, V, eos_ids_of(model.spec, tok, ()), parse_tools("llama", [WEATHER], "auto"), 0)
    history = tok.encode('Sure.<tool_call>[{"', add_special_tokens=False)  # the call starts before any mask
    allowed = np.isfinite(process(history, np.zeros(V, np.float32)))
    piece = {t: tok.decode([t], skip_special_tokens=False) for t in range(V)}
    quote = [t for t, text in piece.items() if text == "n"]  # the start of "name", a key the call may open with
    brace = [t for t, text in piece.items() if text == "}"]
    assert quote and brace and allowed[quote].all() and not allowed[brace].any()


def test_a_stream_holds_back_what_may_open_a_call():
    stream = ToolStream(FMT)
    sent = [stream.feed(p) for p in ("Sure", " <to", 'ol_call>[{"name": "f", ', '"arguments": {}}]</tool_call>')]
    assert sent == ["Sure", " ", "", ""]
    rest, calls = stream.finish()
    assert rest == "" and [c["function"] for c in calls] == [{"name": "f", "arguments": "{}"}]
    cut = ToolStream(FMT)  # a call list that ends but not on its own (max_tokens): all content, as non-streamed
    text = 'a<tool_call>[{"name": "f", "arguments": {}}]</tool_call>'
    assert cut.feed(text) == "a" and cut.finish(complete=False) == (text[1:], None)
    plain = ToolStream(FMT)
    assert [plain.feed(p) for p in ("a <", "b")] == ["a ", "<b"]
    assert plain.finish() == ("", None)
    assert split("<tool_call>[{oops", FMT) == ("<tool_call>[{oops", None)  # cut by max_tokens: text


def test_hermes_calls_each_between_their_own_tags():
    """Qwen's format: one object per call, each between its own tags; an earlier turn's calls are written back
    the same way, and split reads them (a cut last call makes the answer text)."""
    from edge_runtime.text.tools import assistant_text

    fmt = FORMATS["qwen3"]
    assert fmt.per_call and FORMATS["qwen2"] == fmt
    calls = [
        {"type": "function", "function": {"name": "forecast", "arguments": '{"city": "Paris", "days": 2}'}},
        {"type": "function", "function": {"name": "forecast", "arguments": '{"city": "Rome", "days": 1}'}},
    ]
    text = assistant_text("Checking.", calls, fmt)
    assert text == (
        'Checking.<tool_call>\n{"name": "forecast", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "forecast", "arguments": {"city": "Rome", "days": 1}}\n</tool_call>'
    )
    content, got = split(text, fmt)
    assert content == "Checking." and [c["function"] for c in got] == [c["function"] for c in calls]
    assert split(text[:-20], fmt) == (text[:-20], None)
    assert "for each call" in parse_tools("qwen2", [WEATHER], "required").system_prompt()


def test_hermes_grammar_allows_parallel_calls_and_no_more_than_asked(model):
    """Under tool_choice "required" the answer is held to tagged calls from the first token: a second call may
    follow the first, unless parallel_tool_calls is false."""
    from edge_runtime.text.grammar import tool_processor

    tok, V = model.tokenizer, model.spec.vocab_size
    eos = eos_ids_of(model.spec, tok, ())
    one = '<tool_call>\n{"name": "forecast", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    piece = {t: tok.decode([t], skip_special_tokens=False) for t in range(V)}
    newline = [t for t, text in piece.items() if text == "\n"]
    for parallel, more in ((True, True), (False, False)):
        process = tool_processor(tok, V, eos, parse_tools("qwen3", [WEATHER], "required", parallel), 0)
        allowed = np.isfinite(process(tok.encode(one, add_special_tokens=False), np.zeros(V, np.float32)))
        assert allowed[sorted(eos)].any()  # the answer may end after one call
        assert bool(allowed[newline].any()) is more  # or go on with another


def test_tool_choice_and_tools_errors_name_their_field():
    cases = {
        "tool_choice": ([], "required"),
        "tools": ([{"type": "function", "function": {"name": "x" * 65}}], None),
    }
    for field, (tools, choice) in cases.items():
        with pytest.raises(HyEdgeError, match=f"^{field}:"):
            parse_tools("llama", tools, choice)
    assert parse_tools("llama", [WEATHER], "none") is None
    named = parse_tools("llama", [WEATHER], {"type": "function", "function": {"name": "forecast"}})
    assert named.calls_schema()["maxItems"] == 1 and not named.lazy
