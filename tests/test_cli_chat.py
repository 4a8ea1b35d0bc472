"""`hy-edge chat`: turns through a pipe, the commands, and KV-cache reuse that changes nothing."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from runtime_helpers import converted

import edge_runtime
from edge_runtime.cli import main
from edge_runtime.cli.chat import ChatSession
from edge_runtime.cli.common import Sampling

GREEDY = Sampling(
    temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=None, max_tokens=8, stop=()
)


@pytest.fixture(scope="module")
def model_file(hunyuan_f32_dir):
    return str(converted(hunyuan_f32_dir, "e4m3"))


def test_second_turn_reuses_the_cache_and_matches_a_fresh_session(model_file):
    model = edge_runtime.load(model_file, threads=1)
    chat = ChatSession(model, GREEDY, system="Be brief.", template={})
    out = []
    chat.turn("Hello there", out.append)
    chat.turn("How are you?", out.append)
    assert chat.last.cached_tokens > 0  # the first turn's tokens were not prefilled again
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    fresh = edge_runtime.load(model_file, threads=1)
    ids = fresh.encode_prompt(chat.messages[:-1])
    expected = fresh.generate(ids, max_tokens=8, temperature=0)
    assert chat.messages[-1]["content"] == expected.text
    assert chat.last.cached_tokens < len(ids)


def test_commands(model_file):
    chat = ChatSession(edge_runtime.load(model_file, threads=1), GREEDY, system=None, template={})
    assert chat.command("/stats") == "(no reply yet)"
    chat.turn("Hi", lambda s: None)
    assert "TTFT" in chat.command("/stats")
    assert "reset" in chat.command("/system You are terse.")
    assert chat.messages == [{"role": "system", "content": "You are terse."}]
    assert "reset" in chat.command("/reset") and chat.generator.tokens == []
    assert "unknown command" in chat.command("/bogus")
    assert chat.command("/exit") is None


def test_chat_through_a_pipe(model_file):
    r = CliRunner().invoke(
        main,
        ["chat", "--model", model_file, "--max-tokens", "4", "--threads", "1"],
        input="Hello\n/stats\n\nAnd again\n/exit\nnot read\n",
    )
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("TTFT") == 2  # /stats, then the closing stats line
    assert "reused from cache" in r.stderr.strip().splitlines()[-1]


def test_chat_user_errors(model_file, tmp_path):
    r = CliRunner().invoke(main, ["chat", "--model", str(tmp_path / "missing.onnx")], input="Hi\n")
    assert r.exit_code == 2 and r.stderr.startswith("hy-edge: error: ")
    r = CliRunner().invoke(main, ["chat", "--model", model_file, "--max-context", "8"], input="Hello " * 20 + "\n")
    assert r.exit_code == 0 and "hy-edge: error:" in r.stderr and "context" in r.stderr
