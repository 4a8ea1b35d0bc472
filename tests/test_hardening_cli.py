"""Every error is one line (issue 9, cases 6, 7, 8, 9): OS errors during conversion and output, malformed
config.json values, text that is not UTF-8, click's own usage errors, Ctrl-C and an outgrown context in
chat, and the small things (capped --threads, the convert summary, Ctrl-C during start-up)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hy_edge_format.errors import HyEdgeError
from runtime_helpers import converted

import edge_runtime
from edge_runtime.cli import convert as cli_convert
from edge_runtime.cli import main

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def model_file(hunyuan_f32_dir):
    return str(converted(hunyuan_f32_dir, "e4m3"))


@pytest.fixture
def prompt(tmp_path):
    p = tmp_path / "prompt.txt"
    p.write_text("Hello, world!\n", encoding="utf-8")
    return str(p)


def one_line(stderr: str, *words: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hy-edge: error: "), stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def child_env(**extra) -> dict:
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1", **extra)


# -- case 6: OS errors ------------------------------------------------------------------------------


def test_disk_full_during_conversion_is_one_line(hunyuan_f32_dir, tmp_path, monkeypatch):
    from hy_edge_convert import writer

    real_add, calls = writer.ExternalData.add, []

    def add(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(writer.ExternalData, "add", add)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    r = CliRunner().invoke(main, ["convert", str(hunyuan_f32_dir), "-o", str(out)])
    assert r.exit_code == 2, r.output  # before: an OSError traceback
    assert "Traceback" not in r.stderr
    one_line(r.stderr.strip().splitlines()[-1], "No space left")  # after the progress bar
    assert list(out.parent.iterdir()) == []  # the partial file is removed


def test_convert_into_a_read_only_directory_is_one_line(hunyuan_f32_dir, tmp_path):
    code = (
        "import os, sys, readonly_fs; readonly_fs.install([os.environ['NUMBA_CACHE_DIR']]); "
        "from edge_runtime.cli import main; main(sys.argv[1:], prog_name='hy-edge')"
    )
    out = tmp_path / "m.onnx"
    r = subprocess.run(
        [sys.executable, "-c", code, "convert", str(hunyuan_f32_dir), "-o", str(out)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr  # before: an EROFS traceback
    one_line(r.stderr, "Read-only file system")


def test_closed_stdout_is_one_line(model_file, prompt):
    r = subprocess.run(
        ["sh", "-c", '"$@" >&-', "sh", sys.executable, "-m", "edge_runtime", "run", prompt, "--model", model_file],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2  # before: exit 0, the text gone
    one_line(r.stderr, "stdout is closed")


def test_stdout_reader_gone_is_one_line(model_file, prompt):
    p = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime", "run", prompt, "--model", model_file, "--max-tokens", "8"],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdout.close()  # the reader is gone before the first token
    stderr = p.stderr.read()
    assert p.wait(timeout=300) == 2, stderr
    one_line(stderr, "stdout was closed")


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}  # fmt: skip


@pytest.mark.parametrize(
    "change,key",
    [
        ({"head_dim": "abc"}, "head_dim"),
        ({"rope_parameters": {"rope_type": "dynamic", "alpha": "1000", "rope_theta": 10000.0}}, "alpha"),
        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "alpha": [1]}}, "alpha"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}}, "low_freq_factor"),
        (
            {"rope_parameters": None, "rope_scaling": {**LLAMA3, "original_max_position_embeddings": 8.5}},
            "original_max_position_embeddings",
        ),
        ({"rope_parameters": None, "rope_scaling": {**LLAMA3, "high_freq_factor": 0.5}}, "low_freq_factor"),
        ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": "x"}}}, "g"),
        ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": [1]}}, "config_groups"),
        ({"shared_layers": 3}, "shared_layers"),
    ],
)
def test_malformed_config_values_name_the_key(hunyuan_f32_dir, tmp_path, change, key):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(hunyuan_f32_dir, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(change)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["convert", str(ckpt), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2, r.output  # before: ValueError / AttributeError / TypeError tracebacks
    one_line(r.stderr, key)


# -- case 7: text input ---------------------------------------------------------------------------------


def test_non_utf8_chat_line_is_one_line_and_the_chat_goes_on(model_file):
    stdin = b"caf\xe9 au lait\nHello\n"
    r = CliRunner().invoke(main, ["chat", "--model", model_file, "--max-tokens", "3"], input=stdin)
    assert r.exit_code == 0, r.output  # before: a TypeError traceback that ended the chat
    errors = [line for line in r.stderr.splitlines() if line.startswith("hy-edge: error:")]
    assert len(errors) == 1 and "UTF-8" in errors[0]
    assert "generated tokens" in r.stderr  # the second line got its reply


def test_non_utf8_system_message_is_one_line(model_file, prompt):
    for cmd in (["run", prompt], ["chat"]):
        r = CliRunner().invoke(main, [*cmd, "--model", model_file, "--system", "caf\udce9"], input="")
        assert r.exit_code == 2, r.output
        one_line(r.stderr, "--system", "UTF-8")


def test_utf16_prompt_is_named_utf16(model_file, tmp_path):
    for encoding in ("utf-16", "utf-16-le"):
        p = tmp_path / f"{encoding}.txt"
        p.write_bytes("Hello there".encode(encoding))
        r = CliRunner().invoke(main, ["run", str(p), "--model", model_file])
        assert r.exit_code == 2
        one_line(r.stderr, "UTF-16")  # before: "is a binary file"


def test_seed_minus_one_is_a_random_seed(model_file, prompt):
    args = ["run", prompt, "--model", model_file, "--max-tokens", "3", "--temperature", "0.8", "--json"]
    r = CliRunner().invoke(main, [*args, "--seed", "-1"])
    assert r.exit_code == 0, r.output  # before: a ValueError traceback from numpy
    r = CliRunner().invoke(main, [*args, "--seed", "-5"])
    assert r.exit_code == 2
    one_line(r.stderr, "--seed")
    with pytest.raises(HyEdgeError, match="seed"):
        edge_runtime.make_sampler(0.8, seed=-2)


@pytest.mark.parametrize(
    "args,word",
    [
        (["run", "p.txt", "--backend", "foo"], "--backend"),
        (["run", "p.txt", "--seed", "abc"], "--seed"),
        (["run", "p.txt", "--bogus"], "--bogus"),
        (["run"], "PROMPT_FILE"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_click_usage_errors_are_one_line(args, word):
    r = subprocess.run(
        [sys.executable, "-m", "edge_runtime", *args], env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2  # before: click's three-line "Usage: ... Try ... Error: ..."
    one_line(r.stderr, word)


# -- case 8: chat --------------------------------------------------------------------------------------


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(model_file, monkeypatch):
    real_stream, calls = edge_runtime.Model.stream, []

    def stream(self, *args, **kwargs):
        calls.append(1)
        for i, r in enumerate(real_stream(self, *args, **kwargs)):
            if len(calls) == 1 and i == 2:
                raise KeyboardInterrupt  # Ctrl-C during the first reply
            yield r

    monkeypatch.setattr(edge_runtime.Model, "stream", stream)
    r = CliRunner().invoke(main, ["chat", "--model", model_file, "--max-tokens", "6"], input="Hello\nAgain\n")
    assert r.exit_code == 0, r.output  # before: exit 130 in the middle of the first reply
    assert "(interrupted)" in r.stderr and len(calls) == 2
    assert "generated tokens" in r.stderr  # the second turn's stats


def test_chat_drops_the_oldest_turns_when_the_context_is_full(model_file):
    lines = "".join(f"Tell me about topic number {i} in some detail please\n" for i in range(8))
    r = CliRunner().invoke(
        main,
        ["chat", "--model", model_file, "--max-tokens", "8", "--max-context", "80", "--system", "Be brief."],
        input=lines,
    )
    assert r.exit_code == 0, r.output
    assert "hy-edge: error" not in r.stderr  # before: every turn after the context filled failed
    assert "dropped the oldest" in r.stderr


def test_chat_history_keeps_the_system_message_when_dropping(model_file):
    from edge_runtime.cli.chat import ChatSession
    from edge_runtime.cli.common import Sampling

    sampling = Sampling(0.0, 0, 1.0, 0.0, 1.0, None, 8, ())
    model = edge_runtime.load(model_file, threads=1, max_context=80)
    chat = ChatSession(model, sampling, system="Be brief.", template={})
    notices = []
    for i in range(8):
        chat.turn(f"Tell me about topic number {i} in some detail please", lambda t: None, notices.append)
    assert notices and chat.messages[0] == {"role": "system", "content": "Be brief."}
    assert chat.messages[1]["role"] == "user" and "topic number 0" not in chat.messages[1]["content"]


# -- case 9: small things ---------------------------------------------------------------------------------


def test_threads_beyond_the_cpus_are_capped_with_a_note(model_file, prompt):
    r = CliRunner().invoke(main, ["run", prompt, "--model", model_file, "--max-tokens", "2", "--threads", "1000"])
    assert r.exit_code == 0, r.output
    assert "capped" in r.stderr and "--threads 1000" in r.stderr


def test_threads_beside_busy_processes_warn_in_one_line(model_file, prompt, monkeypatch):
    from edge_runtime.engine import threads

    busy = iter(range(0, 10**6, 100))  # /proc/stat: our CPUs' busy seconds advance 100 per sample...
    monkeypatch.setattr(threads, "_busy_seconds_on", lambda cpus: float(next(busy)))
    monkeypatch.setattr(threads, "_own_seconds", lambda: 0.0)  # ...none of them this process's
    monkeypatch.setattr(threads, "_checked", False)
    r = CliRunner().invoke(main, ["run", prompt, "--model", model_file, "--max-tokens", "2", "--threads", "2"])
    assert r.exit_code == 0, r.output
    warned = [line for line in r.stderr.splitlines() if line.startswith("hy-edge: warning:")]
    assert len(warned) == 1 and "2 threads asked for" in warned[0], r.stderr


def test_convert_summary_says_larger_for_a_larger_output():
    assert cli_convert._ratio(100, 50) == "2.00x smaller"
    assert cli_convert._ratio(100, 169) == "1.69x larger"  # before: "0.59x smaller"


def test_ctrl_c_during_startup_imports_gives_no_traceback(tmp_path):
    fake = tmp_path / "fake" / "click"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise KeyboardInterrupt\n")  # Ctrl-C while click is imported
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), env["PYTHONPATH"]])
    for argv in ([sys.executable, "-m", "edge_runtime", "--help"], [sys.executable, "-c", _script_entry()]):
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr


def _script_entry() -> str:
    """What the installed `hy-edge` console script runs (setup.cfg's entry point)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(TESTS.parent / "setup.cfg")
    target = cfg["options.entry_points"]["console_scripts"].split("=", 1)[1].strip()
    module, func = target.split(":")
    return f"import sys; from {module} import {func}; sys.exit({func}())"
