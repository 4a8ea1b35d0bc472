"""`hy-edge run`: output shape, and every user mistake is one line on stderr with exit code 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from runtime_helpers import converted

from edge_runtime.cli import main


@pytest.fixture(scope="module")
def model_file(hunyuan_f32_dir):
    return str(converted(hunyuan_f32_dir, "e4m3"))


@pytest.fixture
def prompt(tmp_path):
    p = tmp_path / "prompt.txt"
    p.write_text("Hello, world! How are you?\n", encoding="utf-8")
    return str(p)


def run(*args, stdin=None):
    return CliRunner().invoke(main, ["run", *args], input=stdin)


def test_streams_text_and_one_stats_line(model_file, prompt):
    r = run(prompt, "--model", model_file, "--max-tokens", "6", "--threads", "1")
    assert r.exit_code == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "TTFT" in lines[0] and "tok/s" in lines[0] and "peak RSS" in lines[0]


def test_json_output(model_file, prompt):
    args = [prompt, "--model", model_file, "--max-tokens", "6", "--json", "--temperature", "0.8", "--seed", "3"]
    r = run(*args)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {
        "text",
        "token_ids",
        "prompt_tokens",
        "completion_tokens",
        "finish_reason",
        "ttft_s",
        "prefill_tps",
        "decode_tps",
        "peak_rss_mb",
    }
    assert out["completion_tokens"] == len(out["token_ids"]) <= 6
    assert json.loads(run(*args).stdout)["token_ids"] == out["token_ids"]  # same seed, same tokens


@pytest.mark.parametrize("kv", ["fp16", "fp8"])
def test_kv_cache_option(model_file, prompt, kv):
    r = run(prompt, "--model", model_file, "--max-tokens", "4", "--kv-cache", kv, "--json")
    assert r.exit_code == 0, r.stderr
    assert 1 <= json.loads(r.stdout)["completion_tokens"] <= 4
    r = run(prompt, "--model", model_file, "--backend", "onnxruntime", "--kv-cache", kv)
    assert r.exit_code == 2 and r.stderr.strip() == f"hy-edge: error: an {kv} KV cache is a numba-backend option"
    r = run(prompt, "--model", model_file, "--kv-cache", "int4")
    assert r.exit_code == 2 and "'int4' is not one of 'fp32', 'fp16', 'fp8'" in r.stderr


def test_stdin_raw_and_onnxruntime(model_file):
    r = run(
        "-",
        "--model",
        model_file,
        "--max-tokens",
        "3",
        "--raw",
        "--backend",
        "onnxruntime",
        "--json",
        stdin="Once upon a time",
    )
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] <= 3


def _user_error(r, *fragments):
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hy-edge: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0]


def test_bad_prompt_files(model_file, tmp_path):
    _user_error(run(str(tmp_path / "missing.txt"), "--model", model_file), "not found")
    (tmp_path / "empty.txt").write_text("  \n")
    _user_error(run(str(tmp_path / "empty.txt"), "--model", model_file), "empty")
    (tmp_path / "bin.dat").write_bytes(b"\x7fELF\x00\x01\x02")
    _user_error(run(str(tmp_path / "bin.dat"), "--model", model_file), "binary")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    _user_error(run(str(tmp_path / "latin1.txt"), "--model", model_file), "UTF-8")
    _user_error(run(str(tmp_path), "--model", model_file), "is a directory")
    _user_error(run("-", "--model", model_file, stdin=""), "empty")


def test_bad_model_files(prompt, tmp_path):
    _user_error(run(prompt, "--model", str(tmp_path / "none.onnx")), "no such file")
    (tmp_path / "bad.onnx").write_bytes(b"this is not an onnx file at all")
    _user_error(run(prompt, "--model", str(tmp_path / "bad.onnx")))


def test_prompt_longer_than_context(model_file, prompt):
    _user_error(run(prompt, "--model", model_file, "--max-context", "4"), "context")


@pytest.mark.parametrize(
    "opts,fragment",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top-p"),
        (["--top-k", "-2"], "top-k"),
        (["--min-p", "1.5"], "min-p"),
        (["--repetition-penalty", "0"], "repetition"),
        (["--max-tokens", "0"], "max-tokens"),
        (["--max-memory", "lots"], "memory size"),
        (["--max-memory", "64KB"], "budget"),
        (["--threads", "0"], "threads"),
    ],
)
def test_bad_option_values(model_file, prompt, opts, fragment):
    _user_error(run(prompt, "--model", model_file, *opts), fragment)


def test_click_usage_errors_exit_2(model_file, prompt):
    r = run(prompt, "--model", model_file, "--bogus")
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    r = run(prompt, "--model", model_file, "--backend", "tensorflow")
    assert r.exit_code == 2 and "Traceback" not in r.stderr


ANSWER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


def test_json_schema_holds_the_answer(default_model_file, tmp_path):
    pytest.importorskip("llguidance")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(ANSWER))
    prompt = tmp_path / "q.txt"
    prompt.write_text("Name the capital of France and its country, in JSON.")
    args = ["--model", str(default_model_file), "--max-tokens", "60"]
    r = run(str(prompt), *args, "--json-schema", str(schema), "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop", out["text"]
    answer = json.loads(out["text"])
    assert set(answer) == {"city", "country"} and all(isinstance(v, str) for v in answer.values())
    r = run(str(prompt), *args, "--json-object")
    assert r.exit_code == 0, r.stderr
    assert isinstance(json.loads(r.stdout), dict)


def test_bad_json_schema_files(model_file, prompt, tmp_path):
    pytest.importorskip("llguidance")
    _user_error(run(prompt, "--model", model_file, "--json-schema", str(tmp_path / "none.json")), "cannot read")
    (tmp_path / "bad.json").write_text("{not json")
    _user_error(run(prompt, "--model", model_file, "--json-schema", str(tmp_path / "bad.json")), "is not JSON")
    (tmp_path / "list.json").write_text("[1, 2]")
    _user_error(run(prompt, "--model", model_file, "--json-schema", str(tmp_path / "list.json")), "a JSON schema")
    (tmp_path / "s.json").write_text(json.dumps(ANSWER))
    args = ["--json-schema", str(tmp_path / "s.json"), "--json-object"]
    _user_error(run(prompt, "--model", model_file, *args), "exclude each other")
