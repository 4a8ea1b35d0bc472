"""The conversion cache under unattended deployment (issue 9, cases 2, 3 and the notice of case 9): a
complete conversion in a cache this process cannot write is used, not refused; two installs sharing a
cache do not reconvert each other's model; the "converting" notice comes only for a valid source."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import checkpoints as ck
import pytest
from click.testing import CliRunner

from edge_runtime.cli import main
from edge_runtime.cli import model as cli_model

TESTS = Path(__file__).parent


@pytest.fixture
def tiny_gguf(tmp_path):
    return ck.make_gguf_llama(tmp_path / "src" / "tiny.gguf", qtype="Q8_0")


def run_readonly(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`hy-edge ARGS` in a child where the whole file system, the cache included, is read-only."""
    code = (  # numba's kernel cache stays writable (this test is about the model cache)
        "import os, sys, readonly_fs; readonly_fs.install([os.environ['NUMBA_CACHE_DIR']]); "
        "from edge_runtime.cli import main; main(sys.argv[1:], prog_name='hy-edge')"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        PYTHONDONTWRITEBYTECODE="1",
        HY_EDGE_CACHE=str(cache),
    )
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True)


def test_complete_read_only_cache_is_used(tiny_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HY_EDGE_CACHE", str(cache))
    converted = cli_model.resolve_model(str(tiny_gguf), lambda m: None)
    prompt = tmp_path / "p.txt"
    prompt.write_text("Hi")
    r = run_readonly(["run", str(prompt), "--model", str(tiny_gguf), "--max-tokens", "2", "--raw"], cache, tmp_path)
    # before: "hy-edge: error: cache directory ... is not writable" (the write probe came first)
    assert r.returncode == 0, r.stderr
    assert "converting" not in r.stderr and "tok/s" in r.stderr
    assert sorted(p.name for p in cache.iterdir()) == sorted([converted.name, converted.name + ".data", ".lock"]), (
        "nothing was written"
    )


def test_cache_of_another_user_is_used_without_locking(tiny_gguf, tmp_path, monkeypatch):
    """A service user on a cache root converted: opening .lock for writing fails (EACCES)."""
    monkeypatch.setenv("HY_EDGE_CACHE", str(tmp_path / "cache"))
    first = cli_model.resolve_model(str(tiny_gguf), lambda m: None)

    def denied(directory):
        raise PermissionError(13, "Permission denied", str(directory / ".lock"))

    monkeypatch.setattr(cli_model, "_locked", denied)
    notices = []
    assert cli_model.resolve_model(str(tiny_gguf), notices.append) == first and notices == []


def test_two_installs_sharing_a_cache_convert_once_each(tmp_path, monkeypatch):
    """Two venvs ship the default model at two paths: alternating runs must not reconvert."""
    a = ck.make_gguf_llama(tmp_path / "venv-a" / "SmolLM2.gguf", qtype="Q8_0")
    b = tmp_path / "venv-b" / "SmolLM2.gguf"
    b.parent.mkdir()
    shutil.copy2(a, b)
    os.utime(b, ns=(2, 2))  # installed at another time
    monkeypatch.setenv("HY_EDGE_CACHE", str(tmp_path / "cache"))
    notices = []
    paths = []
    for src in (a, b, a, b, a):
        monkeypatch.setattr(cli_model, "default_gguf", lambda src=src: src)
        paths.append(cli_model.resolve_model(None, notices.append))
    assert len(notices) == 2, notices  # before: 5 (each install reconverted the other's file)
    assert paths[0] == paths[2] == paths[4] != paths[1] == paths[3]


def test_conversion_notice_only_after_the_source_is_valid(tmp_path, monkeypatch):
    monkeypatch.setenv("HY_EDGE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    prompt = tmp_path / "p.txt"
    prompt.write_text("Hi")
    r = CliRunner().invoke(main, ["run", str(prompt), "--model", str(bad)])
    assert r.exit_code == 2
    assert "converting" not in r.stderr and r.stderr.count("\n") == 1, r.stderr  # before: the notice, then the error
