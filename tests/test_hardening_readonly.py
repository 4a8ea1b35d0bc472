"""Unattended deployment on a read-only system (issue 9, case 1): the runtime picks numba's kernel cache
itself ($CACHE_DIRECTORY / $STATE_DIRECTORY from systemd, its own XDG cache) and runs without caching,
with one warning, when nothing is writable; no HOME and a UID without a passwd entry neither crash nor
create a directory named '~'.

The child processes simulate the read-only file system with tests/readonly_fs.py (root ignores
permission bits, and CI may not allow mounts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import readonly_fs
from hy_edge_format.errors import HyEdgeError
from runtime_helpers import converted

from edge_runtime import cache_dirs
from edge_runtime.cli import model as cli_model


@pytest.fixture(scope="module")
def model_file(hunyuan_f32_dir):
    return converted(hunyuan_f32_dir, "e4m3")


def readonly_cli(
    args: list[str], writable: list[Path], env: dict, cwd: Path, drop_home: bool = False
) -> subprocess.CompletedProcess:
    """`hy-edge ARGS` in a child whose file system is read-only except `writable` (HY_EDGE_NO_PASSWD:
    and whose UID has no passwd entry)."""
    argv, child_env = readonly_fs.cli_command(args, writable, env, drop_home)
    return subprocess.run(argv, env=child_env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_read_only_system_uses_the_systemd_cache_directory(model_file, tmp_path):
    home, cache = tmp_path / "home", tmp_path / "cache-directory"
    home.mkdir()
    cache.mkdir()
    env = {"HOME": str(home), "CACHE_DIRECTORY": str(cache)}
    r = readonly_cli(["info", str(model_file)], [cache], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no locator" not in r.stderr and "warning" not in r.stderr
    assert any((cache / "numba").rglob("*")), "numba placed its index under $CACHE_DIRECTORY/numba"
    assert not list(home.iterdir())


def test_read_only_system_with_nothing_writable_runs_without_cache(model_file, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = readonly_cli(["info", str(model_file)], [], {"HOME": str(home)}, tmp_path)
    assert r.returncode == 0, r.stderr  # before: RuntimeError: cannot cache function ...: no locator available
    assert r.stderr.count("hy-edge: warning:") == 1 and "JIT cache" in r.stderr
    assert "Traceback" not in r.stderr


def test_read_only_system_generates_without_cache(uncached_run):
    """The no-cache path really compiles and runs the kernels (not only defines them). The child compiles
    every kernel (about a minute of one core): conftest starts it at the first test, beside the others."""
    r = uncached_run()
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("hy-edge: warning:") == 1 and "tok/s" in r.stderr


def test_uid_without_passwd_entry_and_no_home(model_file, tmp_path):
    """A container UID with no passwd entry and no HOME, the working directory writable: no crash, and
    no directory named '~' (numba's own fallback, expanduser('~'), would create ./~/.cache/numba)."""
    work = tmp_path / "cwd"
    work.mkdir()
    env = {"HY_EDGE_NO_PASSWD": "1"}
    r = readonly_cli(["info", str(model_file)], [work], env, work, drop_home=True)
    assert r.returncode == 0, r.stderr
    assert not (work / "~").exists() and not list(work.iterdir())


def test_no_home_no_passwd_entry_gives_no_tilde_path(monkeypatch):
    def no_entry(uid):
        raise KeyError(uid)

    monkeypatch.setattr(cache_dirs.pwd, "getpwuid", no_entry)
    env = {"PATH": "/usr/bin"}
    assert cache_dirs.home_dir(env) is None
    assert cache_dirs.model_cache_dir(env) is None
    assert cache_dirs.jit_cache_candidates(env) == []
    for key in ("HOME", "XDG_CACHE_HOME", "HY_EDGE_CACHE", "CACHE_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(HyEdgeError, match="HY_EDGE_CACHE"):
        cli_model.cache_dir()


def test_jit_cache_order(tmp_path):
    user = {"NUMBA_CACHE_DIR": "/somewhere", "CACHE_DIRECTORY": str(tmp_path / "c")}
    assert cache_dirs.choose_jit_cache_dir(user) == (Path("/somewhere"), True)
    env = {
        "CACHE_DIRECTORY": f"{tmp_path / 'c'}:{tmp_path / 'c2'}",
        "STATE_DIRECTORY": str(tmp_path / "s"),
        "HOME": str(tmp_path / "h"),
    }
    assert cache_dirs.choose_jit_cache_dir(env) == (tmp_path / "c" / "numba", False)
    env.pop("CACHE_DIRECTORY")
    assert cache_dirs.choose_jit_cache_dir(env) == (tmp_path / "s" / "numba", False)
    env.pop("STATE_DIRECTORY")
    assert cache_dirs.choose_jit_cache_dir(env) == (tmp_path / "h" / ".cache" / "hy-edge" / "numba", False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cache_dirs.choose_jit_cache_dir({"HOME": str(blocker)}) == (None, False)


def test_model_cache_prefers_systemd_directories(tmp_path):
    env = {"HOME": "/home/x", "STATE_DIRECTORY": str(tmp_path / "s")}
    assert cache_dirs.model_cache_dir(env) == tmp_path / "s"
    assert cache_dirs.model_cache_dir({**env, "HY_EDGE_CACHE": "/c"}) == Path("/c")
    assert cache_dirs.model_cache_dir({"HOME": "/home/x"}) == Path("/home/x/.cache/hy-edge")


def test_jit_cache_follows_every_kernel_source(tmp_path, monkeypatch):
    # numba checks a cached kernel against its own file only; a kernel compiled into another (the layer
    # loop holds the linear kernels) would come back stale after a change to ops/ alone, so the cache
    # directory is named by all kernel sources
    ops = tmp_path / "ops"
    ops.mkdir()
    (ops / "linear.py").write_text("A = 1\n")
    (ops / "attention.py").write_text("B = 1\n")
    spec = SimpleNamespace(submodule_search_locations=[str(ops)])
    monkeypatch.setattr(cache_dirs.importlib.util, "find_spec", lambda name: spec)
    first = cache_dirs.kernel_sources_hash()
    assert first == cache_dirs.kernel_sources_hash() and len(first) == 12
    (ops / "linear.py").write_text("A = 2\n")
    assert cache_dirs.kernel_sources_hash() != first
    monkeypatch.undo()
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "CACHE_DIRECTORY")}
    env.update(HOME=str(tmp_path / "home"), STATE_DIRECTORY="")
    code = "import edge_runtime, numba; print(numba.config.CACHE_DIR)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    want = tmp_path / "home" / ".cache" / "hy-edge" / "numba" / f"src-{cache_dirs.kernel_sources_hash()}"
    assert Path(out.strip()) == want
