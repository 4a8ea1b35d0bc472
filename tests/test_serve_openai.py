"""`hy-edge serve` on the bundled SmolLM2 through the official `openai` client: streaming and not, chat and
completions, token for token what `hy-edge run` says at temperature 0; eight concurrent streams give
each prompt's sequential answer (the batched decode step is batch-invariant)."""

from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner
from serve_helpers import child_env, metric, seconds, serving

from edge_runtime.cli import main

openai = pytest.importorskip("openai")

QUESTION = "What is the capital of France? Answer in one sentence."
# (prompt, max_tokens): different prompts, different lengths, some ending at EOS, some at the limit
EIGHT = [
    ("Name three planets.", 24),
    ("Write a haiku about the sea.", 40),
    (QUESTION, 16),
    ("Say hello.", 8),
    ("Explain in two sentences why the sky is blue.", 48),
    ("List the first five prime numbers.", 20),
    ("Translate 'good morning' into French.", 12),
    ("What is 2 + 2? " * 12, 30),
]


@pytest.fixture(scope="module")
def server(default_model_file):
    # the default thread count: it gives way to this test process (its eight clients) and to other load,
    # where 2 pinned threads beside a busy process took minutes over the eight streams
    args = ["--model", str(default_model_file), "--max-batch", "8", "--max-context", "512"]
    with serving(args, env=child_env()) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=seconds(300))


def hy_edge_run(model_file, prompt: str, max_tokens: int, tmp_path, raw: bool = False, extra=()) -> dict:
    path = tmp_path / "prompt.txt"
    path.write_text(prompt)
    args = ["run", str(path), "--model", str(model_file), "--temperature", "0", "--max-tokens", str(max_tokens)]
    args += ["--kv-cache", "fp16"]  # the server's default KV cache (run's is fp32)
    r = CliRunner().invoke(main, [*args, "--json", *(["--raw"] if raw else []), *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def chat_stream(client, prompt: str, max_tokens: int) -> tuple[str, str, int]:
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage.completion_tokens


def test_models_lists_the_file_stem(client, default_model_file):
    assert [m.id for m in client.models.list().data] == [default_model_file.stem]


def test_chat_equals_hy_edge_run_streaming_and_not(client, default_model_file, tmp_path):
    want = hy_edge_run(default_model_file, QUESTION, 24, tmp_path)
    assert want["text"] == "The capital of France is Paris."  # the golden answer (tests/test_default_model.py)
    r = client.chat.completions.create(
        model=default_model_file.stem, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0
    )
    got = r.choices[0]
    assert (got.message.content, got.finish_reason) == (want["text"], want["finish_reason"])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want["prompt_tokens"], want["completion_tokens"])
    assert chat_stream(client, QUESTION, 24) == (want["text"], want["finish_reason"], want["completion_tokens"])


def test_stop_strings_and_seeded_sampling_equal_hy_edge_run(client, default_model_file, tmp_path):
    want = hy_edge_run(default_model_file, QUESTION, 24, tmp_path, extra=["--stop", "France"])
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(
        model=default_model_file.stem, messages=messages, max_tokens=24, temperature=0, stop=["France"]
    )
    assert (
        (r.choices[0].message.content, r.choices[0].finish_reason)
        == ("The capital of ", "stop")
        == (
            want["text"],
            want["finish_reason"],
        )
    )
    seeded = hy_edge_run(default_model_file, QUESTION, 16, tmp_path, extra=["--temperature", "0.9", "--seed", "7"])
    r = client.chat.completions.create(
        model=default_model_file.stem, messages=messages, max_tokens=16, temperature=0.9, seed=7
    )
    assert r.choices[0].message.content == seeded["text"]  # same seed, same draws as the CLI


def test_completions_equal_hy_edge_run_raw(client, default_model_file, tmp_path):
    prompt = "The three primary colours are"
    want = hy_edge_run(default_model_file, prompt, 20, tmp_path, raw=True)
    r = client.completions.create(model=default_model_file.stem, prompt=prompt, max_tokens=20, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want["text"], want["finish_reason"])
    assert r.usage.completion_tokens == want["completion_tokens"]
    pieces = list(
        client.completions.create(
            model=default_model_file.stem, prompt=prompt, max_tokens=20, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in pieces if c.choices) == want["text"]
    assert pieces[-1].choices[0].finish_reason == want["finish_reason"]


def test_eight_concurrent_streams_equal_their_sequential_runs(client, server):
    sequential = [chat_stream(client, p, n) for p, n in EIGHT]
    results: list = [None] * len(EIGHT)
    start = threading.Barrier(len(EIGHT))

    def one(i: int) -> None:
        start.wait(seconds(60))
        try:
            results[i] = chat_stream(client, *EIGHT[i])
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(EIGHT))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds(300))
    for i, (got, want) in enumerate(zip(results, sequential, strict=True)):
        assert got == want, f"stream {i} ({EIGHT[i][0]!r}) differs from its sequential run"
    assert {finish for _, finish, _ in sequential} == {"stop", "length"}  # both ends were exercised
    assert metric(server.url, "hy_edge_active_sequences") == 0
    assert metric(server.url, "hy_edge_prompt_tokens_reused_total") > 0  # the chat template's shared prefix


def test_chat_url_talks_to_the_server(server, default_model_file):
    r = CliRunner().invoke(
        main, ["chat", "--url", server.url, "--temperature", "0", "--max-tokens", "24"], input=QUESTION + "\n/stats\n"
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "The capital of France is Paris."
    assert "generated tokens]" in r.stderr
    r = CliRunner().invoke(main, ["chat", "--url", server.url, "--model", str(default_model_file)], input="hi\n")
    assert r.exit_code == 2 and "exclude" in r.stderr


def _object(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _text(n: int) -> dict:
    return {"type": "string", "maxLength": n}


def _int(low: int, high: int) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high}


# nested objects, enums, arrays, numbers with bounds, required and optional fields
SCHEMAS = {
    "nested": (
        _object({"person": _object({"name": _text(20), "city": _text(20)}, ["name", "city"])}, ["person"]),
        "Give a person and their city.",
    ),
    "enum": (_object({"colour": {"enum": ["red", "green", "blue"]}}, ["colour"]), "What colour is the sky?"),
    "array": (
        _object({"primes": {"type": "array", "items": _int(0, 1000), "minItems": 3, "maxItems": 5}}, ["primes"]),
        "List the first prime numbers.",
    ),
    "bounds": (
        _object(
            {"celsius": {"type": "number", "minimum": -50, "maximum": 60}, "year": _int(1900, 2100)},
            ["celsius", "year"],
        ),
        "A hot day in Paris: its temperature and year.",
    ),
    "required": (
        _object({"title": _text(40), "pages": _int(1, 5000), "isbn": _text(20)}, ["title", "pages"]),
        "Describe a book.",
    ),
}


def test_structured_output_validates_against_its_schema(client, default_model_file):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    model = default_model_file.stem
    for name, (schema, question) in SCHEMAS.items():
        response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        messages = [{"role": "user", "content": question + " Answer in JSON."}]
        r = client.chat.completions.create(
            model=model, messages=messages, max_tokens=200, temperature=0, response_format=response_format
        )
        assert r.choices[0].finish_reason == "stop", (name, r.choices[0].message.content)
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=200, temperature=0.8, seed=3, stream=True,
            response_format=response_format,
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        jsonschema.validate(json.loads(text), schema)
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": 'Greet me as a JSON object with one field, "greeting".'}],
        max_tokens=100,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason == "stop", repr(r.choices[0].message.content)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": _object({"city": _text(30), "unit": {"enum": ["celsius", "fahrenheit"]}}, ["city"]),
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": _object({"zone": _text(30)}, ["zone"])},
}


def test_tool_calls_validate_against_the_tools_parameters(client, default_model_file):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    model, tools = default_model_file.stem, [WEATHER, TIME]
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, temperature in (("required", 0), ("required", 0.8), (named, 0), (named, 0.8)):
        r = client.chat.completions.create(
            model=model, messages=messages, tools=tools, tool_choice=choice, max_tokens=120,
            temperature=temperature, seed=5,
        )  # fmt: skip
        got = r.choices[0]
        assert got.finish_reason == "tool_calls" and got.message.content is None, got
        calls = got.message.tool_calls
        assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])
        if choice is named:
            assert [c.function.name for c in calls] == ["get_weather"]
        # streamed: the same calls (ids aside), assembled from the deltas as a client does
        stream = client.chat.completions.create(
            model=model, messages=messages, tools=tools, tool_choice=choice, max_tokens=120,
            temperature=temperature, seed=5, stream=True,
        )  # fmt: skip
        deltas, finish = [], None
        for chunk in stream:
            for c in chunk.choices:
                deltas += c.delta.tool_calls or []
                finish = c.finish_reason or finish
        assert finish == "tool_calls"
        streamed = [(d.function.name, d.function.arguments) for d in sorted(deltas, key=lambda d: d.index)]
        assert streamed == [(c.function.name, c.function.arguments) for c in calls]
    # the tool's answer goes back; tool_choice none: a plain text answer
    history = [*messages, got.message.model_dump(exclude_none=True)]
    history.append({"role": "tool", "tool_call_id": calls[0].id, "content": '{"celsius": 21, "sky": "clear"}'})
    r = client.chat.completions.create(
        model=model, messages=history, tools=tools, tool_choice="none", max_tokens=40, temperature=0
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
