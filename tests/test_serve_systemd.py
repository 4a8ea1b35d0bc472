"""`hy-edge serve` under systemd: the unit `hy-edge service install` writes passes `systemd-analyze verify`;
the server speaks sd_notify (READY=1 once warm, WATCHDOG=1 from the engine loop, STOPPING=1 on SIGTERM)
and exits 0 after a running stream has ended; it serves as a non-root user with a read-only install, no
HOME and only a state directory writable (the sandbox of the unit: DynamicUser, ProtectSystem=strict)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numba
import pytest
from click.testing import CliRunner
from serve_helpers import HTTP_TIMEOUT, START_TIMEOUT, ServerProcess, child_env, seconds

from edge_runtime.cli import main
from edge_runtime.serve import systemd

pytest.importorskip("uvicorn")


def systemd_analyze() -> str:
    """The systemd-analyze binary (Debian's systemd package, which .ci/run installs: no test installs
    anything). Where it is missing the test is skipped with the reason, except in CI, where a skip would
    hide that the unit is never verified."""
    path = shutil.which("systemd-analyze")
    if path:
        return path
    reason = "systemd-analyze is missing (Debian: apt-get install --no-install-recommends systemd)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run installs it")
    pytest.skip(reason)


# the unit hides /home and /root: where this checkout lies there (a CI clone in /root), the unit names another
PYTHON = ["--python", shutil.which("python3") or "/usr/bin/python3"] if systemd.hidden_by_unit(sys.executable) else []


def test_unit_file_passes_systemd_analyze_verify(default_model_file, tmp_path):
    analyze = systemd_analyze()
    key = tmp_path / "api-key"
    key.write_text("secret\n")
    args = ["service", "install", "--print", "--model", str(default_model_file), "--port", "8080", *PYTHON]
    r = CliRunner().invoke(main, [*args, "--max-memory", "1GB", "--api-key-file", str(key)])
    assert r.exit_code == 0, r.output
    unit = r.stdout
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "StateDirectory=hy-edge",
        "CacheDirectory=hy-edge",
        f"MemoryMax={1024 + systemd.MEMORY_HEADROOM // 2**20}M",
        f"LoadCredential=api-key:{key}",
    ):
        assert f"\n{line}\n" in unit, line
    assert "WatchdogSec=" in unit and " --api-key-file %d/api-key\n" in unit  # %d: $CREDENTIALS_DIRECTORY
    # the stop: the drain (the server's --shutdown-timeout), then the largest prompt cache at 10 MB/s
    from edge_runtime.serve.prompt_cache import MAX_SAVE_BYTES

    stop = int(unit.split("\nTimeoutStopSec=")[1].split("\n")[0])
    shutdown = float(unit.split("--shutdown-timeout ")[1].split()[0]) if "--shutdown-timeout " in unit else 30.0
    assert stop >= shutdown + MAX_SAVE_BYTES / 10e6
    odd = systemd.unit_file(["--model", "/srv/50% $HOME.onnx"], python="/opt/py", budget_bytes=2**30)
    assert "ExecStart=/opt/py -m edge_runtime serve --model '/srv/50%% $$HOME.onnx'\n" in odd  # no expansion
    path = tmp_path / "hy-edge.service"
    path.write_text(unit)
    v = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and "hy-edge.service" not in v.stderr, v.stderr
    # install / uninstall to a given path (the default is /etc/systemd/system/hy-edge.service)
    args = ["service", "install", "--unit-path", str(path), "--max-memory", "1GB", *PYTHON]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert path.read_text().startswith("[Unit]")
    assert CliRunner().invoke(main, ["service", "uninstall", "--unit-path", str(path)]).exit_code == 0
    assert not path.exists()
    r = CliRunner().invoke(main, ["service", "install", "--print", "--model", "/home/x/model.onnx"])
    assert r.exit_code == 2 and r.output.startswith("hy-edge: error:")


def test_unit_sandbox_scores_at_most_2_in_systemd_analyze_security(tmp_path):
    analyze = systemd_analyze()
    key = tmp_path / "key"
    key.write_text("k\n")
    python = ["--python", "/usr/bin/python3"]  # --offline checks no paths
    for host, extra, local in (("127.0.0.1", [], True), ("0.0.0.0", ["--api-key-file", str(key)], False)):
        r = CliRunner().invoke(
            main, ["service", "install", "--print", "--max-memory", "1GB", "--host", host, *python, *extra]
        )
        assert r.exit_code == 0, r.output
        unit = r.stdout
        for line in ("CapabilityBoundingSet=", "SystemCallArchitectures=native", "SystemCallFilter=@system-service",
                     "RestrictNamespaces=yes", "LockPersonality=yes", "PrivateUsers=yes"):  # fmt: skip
            assert f"\n{line}\n" in unit, line
        assert "\nMemoryDenyWriteExecute=" not in unit  # numba's JIT needs W+X mappings
        assert ("\nIPAddressAllow=localhost\n" in unit) == local
        path = tmp_path / "hy-edge.service"
        path.write_text(unit)
        v = subprocess.run(
            [analyze, "security", "--offline=true", str(path)], capture_output=True, text=True, timeout=60
        )
        if "--offline" in v.stderr:  # systemd < 250
            pytest.skip(f"systemd-analyze security has no --offline: {v.stderr.strip()}")
        score = re.search(r"Overall exposure level for hy-edge.service: ([\d.]+)", v.stdout)
        assert score and float(score.group(1)) <= 2.0, v.stdout[-3000:]


def test_install_refuses_an_open_host_without_a_key_and_a_python_the_unit_hides(tmp_path, monkeypatch):
    def install(*args: str):
        return CliRunner().invoke(main, ["service", "install", "--print", "--max-memory", "1GB", *args])

    def refused(r, says: str) -> None:
        assert r.exit_code == 2 and r.stderr.startswith("hy-edge: error:") and says in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    python = ["--python", "/opt/hy-edge/bin/python"]
    refused(install("--host", "0.0.0.0", *python), "--insecure-no-key")
    exec_start = next(line for line in install("--host", "0.0.0.0", "--insecure-no-key", *python).stdout.splitlines()
                      if line.startswith("ExecStart="))  # fmt: skip
    assert exec_start.startswith("ExecStart=/opt/hy-edge/bin/python -m edge_runtime serve --host 0.0.0.0 ")
    assert " --insecure-no-key" in exec_start
    key = tmp_path / "key"
    key.write_text("k\n")
    assert install("--host", "0.0.0.0", "--api-key-file", str(key), *python).exit_code == 0
    assert install("--host", "localhost", *python).exit_code == 0  # loopback needs no key
    refused(install("--python", "/home/me/venv/bin/python"), "ProtectHome")
    monkeypatch.setattr(sys, "executable", "/root/.venv/bin/python")  # the default: this Python
    refused(install(), "ProtectHome")


def test_watchdog_interval_and_notify_to_a_path_socket(tmp_path):
    assert not systemd.Watchdog({}).enabled
    assert systemd.Watchdog({"WATCHDOG_USEC": "4000000"}).interval == 2.0
    assert not systemd.Watchdog({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).enabled  # another process's
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(tmp_path / "notify"))
        assert systemd.notify("READY=1", "STATUS=x", env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert s.recv(4096) == b"READY=1\nSTATUS=x"
    assert not systemd.notify("READY=1", env={})


def test_watchdog_pings_never_block_the_engine(tmp_path):
    # a datagram reader that falls behind (systemd busy) makes the sender block once 10 messages are
    # queued: the engine loop's pings must be dropped, not wait; state changes wait a bounded time
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        dog = systemd.Watchdog({"WATCHDOG_USEC": "1", "NOTIFY_SOCKET": path})  # a ping at every call

        def flood() -> None:
            for _ in range(200):
                dog.ping()
            for _ in range(20):
                systemd.notify("STATUS=x", env={"NOTIFY_SOCKET": path}, wait=0.01)

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "a notification blocked its sender"
        assert s.recv(4096) == b"WATCHDOG=1"  # the first ones were delivered


class Notifications:
    """What the server sends to $NOTIFY_SOCKET, read continuously on a thread (as systemd does)."""

    def __init__(self, sock: socket.socket):
        self.seen: list[str] = []
        self._sock = sock
        sock.settimeout(0.1)
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                self.seen += self._sock.recv(4096).decode().split("\n")
            except TimeoutError:
                pass

    def wait_for(self, want: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while want not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {want} within {timeout} s; got {self.seen}")
            time.sleep(0.05)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)


def test_notify_ready_watchdog_and_sigterm_during_a_stream(default_model_file):
    name = f"hy-edge-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)  # an abstract socket, as systemd's NOTIFY_SOCKET may be
        env = child_env(NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="1000000")
        # the stream below must end within the grace SIGTERM gives it (30 s by default; scaled when emulated)
        args = ["--model", str(default_model_file), "--max-context", "256", "--shutdown-timeout", str(seconds(30))]
        server = ServerProcess(args, env=env)
        notes = Notifications(sock)
        try:
            notes.wait_for("READY=1", START_TIMEOUT)
            health = httpx.get(server.wait_listening() + "/health", timeout=HTTP_TIMEOUT)
            assert health.status_code == 200  # ready means ready
            notes.wait_for("WATCHDOG=1", seconds(10))
            assert notes.seen.index("READY=1") < notes.seen.index("WATCHDOG=1")
            body = {"prompt": "Once upon a time", "max_tokens": 150, "temperature": 0, "stream": True}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=HTTP_TIMEOUT) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                server.proc.send_signal(15)  # SIGTERM with the stream running
                rest = [line for line in lines if line]
            chunks = [json.loads(line[6:]) for line in rest[:-1]]
            assert rest[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert server.proc.wait(seconds(60)) == 0, server.log()
            notes.wait_for("STOPPING=1", seconds(5))
        finally:
            server.cleanup()
            notes.close()


def test_past_the_shutdown_timeout_streams_end_with_an_error_and_done(default_model_file):
    # SIGTERM: the listener stays open and new requests get 503; a stream still running after
    # --shutdown-timeout ends with an error event and [DONE]; the server exits 0 with no traceback
    args = ["--model", str(default_model_file), "--max-context", "1024", "--shutdown-timeout", str(seconds(3))]
    server = ServerProcess(args, env=child_env())
    try:
        url = server.wait_ready()
        no_eos = {str(t): -100 for t in range(3)}  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>
        body = {
            "prompt": "Once upon a time",
            "max_tokens": 1000,
            "temperature": 0,
            "stream": True,
            "logit_bias": no_eos,
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=HTTP_TIMEOUT) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            server.proc.send_signal(15)
            # the signal handler has run (it does not wait for anything, but runs on the main thread between
            # two kernels: scaled where the kernels run emulated)
            time.sleep(seconds(0.2))
            late = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=HTTP_TIMEOUT)
            assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"], late.text
            assert httpx.get(url + "/health", timeout=HTTP_TIMEOUT).json() == {"status": "stopping"}
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]", rest[-3:]
        last = json.loads(rest[-2][6:])
        assert last["error"]["type"] == "server_error" and "shutting down" in last["error"]["message"]
        assert len(rest) < 900  # ended by the timeout, not by max_tokens
        assert server.proc.wait(seconds(60)) == 0, server.log()
        assert "Traceback" not in server.log(), server.log()
    finally:
        server.cleanup()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to drop to nobody")
def test_non_root_read_only_install_no_home_only_a_state_directory(default_model_file):
    root = Path(tempfile.mkdtemp(prefix="hy-edge-nobody-"))
    try:
        root.chmod(0o755)
        models, state = root / "models", root / "state"
        models.mkdir()
        for f in (default_model_file, default_model_file.with_name(default_model_file.name + ".data")):
            shutil.copy(f, models / f.name)  # root-owned, 0644: read-only for the service user
        state.mkdir()
        jit = Path(numba.config.CACHE_DIR or "")
        if jit.is_dir():  # kernels compiled once, as on a provisioned box (a cold compile costs ~40 s here;
            # test_hardening_readonly compiles into $STATE_DIRECTORY); stale entries are compiled again
            shutil.copytree(jit, state / "numba" / jit.name, ignore=shutil.ignore_patterns("tests_*"))
        for p in (state, *state.rglob("*")):
            os.chown(p, 65534, 65534)
        env = {k: v for k, v in child_env().items() if k not in ("HOME", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR")}
        env["STATE_DIRECTORY"] = str(state)
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        args = ["--model", str(models / default_model_file.name), "--max-context", "128", "--max-batch", "2"]
        before = sorted(p.name for p in models.iterdir())
        server = ServerProcess(args, env=env, prefix=prefix, cwd=str(root))
        try:
            url = server.wait_ready()
            body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=HTTP_TIMEOUT)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
        finally:
            assert server.stop() == 0, server.log()
            log = server.log()
            server.cleanup()
        assert "warning" not in log.lower() and "Traceback" not in log, log
        assert any((state / "numba").rglob("*.nbi")), "numba's kernel cache is in $STATE_DIRECTORY"
        assert sorted(p.name for p in models.iterdir()) == before
        assert sorted(p.name for p in root.iterdir()) == ["models", "state"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
