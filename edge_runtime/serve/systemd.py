"""systemd integration of `hy-edge serve`: the sd_notify protocol (a datagram to $NOTIFY_SOCKET, see
sd_notify(3)), the watchdog, and the unit file `hy-edge service install` writes."""

from __future__ import annotations

import os
import shlex
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

UNIT_PATH = Path("/etc/systemd/system/hy-edge.service")
MEMORY_HEADROOM = 256 * 1024**2  # above the budget: allocator slack and the HTTP stack, before the OOM kill


def notify(*states: str, env: Mapping[str, str] | None = None, wait: float = 1.0) -> bool:
    """Send e.g. "READY=1" to the service manager; False when not run by systemd (no $NOTIFY_SOCKET) or
    when the message could not be queued within `wait` seconds (a datagram socket blocks the sender once
    the reader is ten messages behind; 0: never block). An address starting with '@' is abstract."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(wait)
            s.connect(address)
            s.sendall("\n".join(states).encode())
    except OSError:  # timeouts included
        return False
    return True


class Watchdog:
    """WATCHDOG=1 pings, at most every half of $WATCHDOG_USEC (sd_watchdog_enabled(3)'s advice); `ping`
    is called from the engine loop, so a hung loop stops the pings and systemd restarts the service."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._env = dict(env)
        self._last = 0.0

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def ping(self) -> None:
        if self.interval is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            notify("WATCHDOG=1", env=self._env, wait=0)  # a manager that does not read must not stall the loop


def unit_file(
    serve_args: Sequence[str],
    *,
    python: str,
    budget_bytes: int,
    watchdog_s: int = 60,
    stop_timeout_s: int = 30,
    api_key_file: str | None = None,
    loopback_only: bool = False,
) -> str:
    """The hy-edge.service unit: Type=notify, watchdog, restart on failure, a memory limit of the budget
    plus headroom, and a sandbox (dynamic user, read-only system, no homes, private /tmp, no capabilities,
    a system-call allow-list) whose only writable places are the state and cache directories (converted
    models, numba's kernel cache). `loopback_only`: the server listens on loopback, so the unit allows no
    other IP traffic either."""
    # systemd expands %-specifiers and $VARIABLES in ExecStart=: a literal % or $ is doubled
    argv = [python, "-m", "edge_runtime", "serve", *serve_args]
    words = [shlex.quote(a).replace("%", "%%").replace("$", "$$") for a in argv]
    credential = ""
    if api_key_file:  # the dynamic user cannot read root's files: systemd hands the key over as a credential
        credential = f"LoadCredential=api-key:{api_key_file}\n"
        words += ["--api-key-file", "%d/api-key"]  # %d: the service's $CREDENTIALS_DIRECTORY
    command = " ".join(words)
    memory_mb = (budget_bytes + MEMORY_HEADROOM) // 1024**2
    ip = "IPAddressDeny=any\nIPAddressAllow=localhost\n" if loopback_only else ""
    return f"""[Unit]
Description=hy-edge: OpenAI-compatible LLM server
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={command}
Restart=on-failure
RestartSec=5
# the first start may convert the model and compile the kernels (minutes on a Pi): READY=1 comes after
TimeoutStartSec=15min
WatchdogSec={watchdog_s}
# SIGTERM: stop accepting, let running streams finish (the server's own bound), save the prompt cache (at most
# 256 MB: ~25 s at a slow SD card's 10 MB/s), then exit 0
TimeoutStopSec={stop_timeout_s + 45}
MemoryMax={memory_mb}M
{credential}DynamicUser=yes
StateDirectory=hy-edge
CacheDirectory=hy-edge
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
DevicePolicy=closed
PrivateUsers=yes
PrivateMounts=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# other processes hidden; not ProcSubset=pid: the budget and the thread count read /proc/meminfo, cpuinfo, stat
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
UMask=0077
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
{ip}SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# a call outside the list fails with EPERM (e.g. an OpenMP runtime asking for CPU affinity) instead of a kill
SystemCallErrorNumber=EPERM
# no MemoryDenyWriteExecute=: numba's LLVM JIT maps the compiled kernels writable, then executable
StandardOutput=journal
StandardError=journal
SyslogIdentifier=hy-edge

[Install]
WantedBy=multi-user.target
"""


def hidden_by_unit(path: str | Path) -> bool:
    """Whether the unit's ProtectHome=yes hides `path` (absolute; symlinks are not resolved: a venv's python
    links to /usr/bin but its packages stay in the venv)."""
    parts = Path(os.path.abspath(path)).parts
    return parts[1:2] in (("home",), ("root",), ("run",)) and (parts[1] != "run" or parts[2:3] == ("user",))


def systemd_running() -> bool:
    """Whether systemd is PID 1 here (sd_booted(3))."""
    return os.path.isdir("/run/systemd/system")
