"""`hy-edge serve` in a child process on loopback, for the server tests: started on a free port (--port 0,
the port read from its start-up line), waited for until /health says ready, stopped with SIGTERM (then
killed, if it does not exit in time). Its output goes to a file, never a pipe nobody reads."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

# Under emulation (make test-arm runs these as an aarch64 guest under qemu-user) everything is many times
# slower: every wait below is multiplied by HY_EDGE_TEST_TIME_SCALE (default 1).
TIME_SCALE = float(os.environ.get("HY_EDGE_TEST_TIME_SCALE") or 1)


def seconds(t: float) -> float:
    """A wait of `t` seconds on this machine, scaled for a slow (emulated) one."""
    return t * TIME_SCALE


START_TIMEOUT = seconds(300)  # a first start compiles the kernels into an empty cache
HTTP_TIMEOUT = seconds(120)  # one request, from sending it to its last byte


class ServerProcess:
    def __init__(self, args: list[str], env: dict | None = None, prefix: list[str] = (), cwd: str | None = None):
        self.log_path = Path(tempfile.mkstemp(prefix="hy-edge-serve-", suffix=".log")[1])
        os.chmod(self.log_path, 0o666)
        self._log = open(self.log_path, "wb")
        argv = [*prefix, sys.executable, "-m", "edge_runtime", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.url = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r" on (http://127\.0\.0\.1:\d+)", self.log())
            if m:
                self.url = m.group(1)
                return self.url
            if self.proc.poll() is not None:
                raise AssertionError(f"hy-edge serve exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"hy-edge serve did not start listening in {timeout} s:\n{self.log()}")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/health", timeout=seconds(5)).status_code == 200:
                    return self.url
            if self.proc.poll() is not None:
                raise AssertionError(f"hy-edge serve exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.2)
        raise AssertionError(f"hy-edge serve was not ready in {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = seconds(60)) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(seconds(10))
        self._log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def serving(args: list[str], **kwargs) -> Iterator[ServerProcess]:
    """A ready server; stopped (and its log removed) on the way out."""
    server = ServerProcess(args, **kwargs)
    try:
        server.wait_ready()
        yield server
    finally:
        server.cleanup()


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HY_EDGE_API_KEY", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.update(extra)
    return env


def metric(url: str, name: str, headers: dict | None = None) -> float:
    """The value of an unlabelled sample in /metrics."""
    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=HTTP_TIMEOUT).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))
