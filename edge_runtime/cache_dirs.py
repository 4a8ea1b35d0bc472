"""Where hy-edge keeps what it writes: converted models and numba's compiled kernels.

An IoT box runs the runtime unattended: a read-only system (systemd `ProtectSystem=strict`), a service
user with no home (`DynamicUser=yes`, or a container UID without a passwd entry). systemd then hands the
service `$CACHE_DIRECTORY` / `$STATE_DIRECTORY`; otherwise the XDG cache under the home directory is
used. Nothing here ever produces a directory literally named `~`.

numba resolves a cache location for every `@njit(cache=True)` kernel when the kernel is *defined*
(hy_edge_ops import time) and raises "no locator available" when none is writable, so
`configure_jit_cache` runs when `edge_runtime` is imported, before anything imports hy_edge_ops.

numba validates a cached kernel by its own source file's time stamp only, while a compiled kernel
contains the kernels it calls from other files (engine/layers.py's layer loop holds the linear kernels): after
a change to ops/ alone it would load the old code. Our kernels are therefore cached in a subdirectory
named by a hash of every kernel source (`kernel_sources_hash`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

JIT_SUBDIR = "numba"


def home_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """$HOME, else the passwd entry's home; None when neither exists (Path.home() would give '~')."""
    env = os.environ if env is None else env
    if env.get("HOME"):
        return Path(env["HOME"])
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:  # a UID without a passwd entry (containers)
        return None
    return Path(home) if home else None


def _systemd_dirs(env: Mapping[str, str]) -> list[Path]:
    """$CACHE_DIRECTORY then $STATE_DIRECTORY (each may list several paths separated by ':')."""
    out = []
    for key in ("CACHE_DIRECTORY", "STATE_DIRECTORY"):
        first = env.get(key, "").split(":")[0]
        if first:
            out.append(Path(first))
    return out


def _xdg_cache(env: Mapping[str, str]) -> Path | None:
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "hy-edge"
    home = home_dir(env)
    return None if home is None else home / ".cache" / "hy-edge"


def model_cache_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """Where converted models are cached: $HY_EDGE_CACHE, else systemd's cache/state directory, else
    $XDG_CACHE_HOME/hy-edge or ~/.cache/hy-edge. None when there is no home and nothing is set."""
    env = os.environ if env is None else env
    if env.get("HY_EDGE_CACHE"):
        return Path(env["HY_EDGE_CACHE"])
    systemd = _systemd_dirs(env)
    return systemd[0] if systemd else _xdg_cache(env)


def verification_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """Where first-use verifications of model files are remembered (integrity.verify_on_first_use):
    beside the converted-model cache."""
    directory = model_cache_dir(env)
    return None if directory is None else directory / "verified"


def state_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """systemd's $STATE_DIRECTORY (its first path), where `hy-edge serve` keeps its prompt cache by default;
    None outside a unit that asks for one."""
    env = os.environ if env is None else env
    first = env.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(first) if first else None


def is_writable_dir(path: Path) -> bool:
    """Create `path` if needed and write a file into it (root ignores permission bits, so os.access
    would say yes on a read-only mount)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def jit_cache_candidates(env: Mapping[str, str]) -> list[Path]:
    """Directories for numba's cache, best first: systemd's, then the user's XDG cache, then
    $HY_EDGE_CACHE (the converted-model cache an operator pointed somewhere writable)."""
    out = [d / JIT_SUBDIR for d in _systemd_dirs(env)]
    xdg = _xdg_cache(env)
    if xdg is not None:
        out.append(xdg / JIT_SUBDIR)
    if env.get("HY_EDGE_CACHE"):
        out.append(Path(env["HY_EDGE_CACHE"]) / JIT_SUBDIR)
    return out


def choose_jit_cache_dir(env: Mapping[str, str] | None = None) -> tuple[Path | None, bool]:
    """(directory, chosen by the user). $NUMBA_CACHE_DIR is the user's and is kept as given; otherwise
    the first writable candidate, or None when nothing is writable."""
    env = os.environ if env is None else env
    if env.get("NUMBA_CACHE_DIR"):
        return Path(env["NUMBA_CACHE_DIR"]), True
    for d in jit_cache_candidates(env):
        if is_writable_dir(d):
            return d, False
    return None, False


def kernel_sources_hash() -> str:
    """12 hex digits of a hash of hy_edge_ops' sources and engine/layers.py (found without importing them:
    importing hy_edge_ops defines its kernels)."""
    spec = importlib.util.find_spec("hy_edge_ops")
    ops_dirs = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(p for d in ops_dirs for p in Path(d).glob("*.py"))
    files.append(Path(__file__).parent / "engine" / "layers.py")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


_configured: Path | None | bool = False  # False: not yet


def configure_jit_cache() -> Path | None:
    """Point numba's kernel cache at a writable directory before any kernel is defined; with none,
    compile without caching (one warning). Idempotent; returns the directory (None: no caching)."""
    global _configured
    if _configured is not False:
        return _configured  # type: ignore[return-value]
    directory, users = choose_jit_cache_dir()
    if directory is not None:
        if not users:
            directory = directory / f"src-{kernel_sources_hash()}"
            os.environ["NUMBA_CACHE_DIR"] = str(directory)
        if "numba" in sys.modules:  # numba reads the variable at import; keep its config in step
            sys.modules["numba"].config.CACHE_DIR = str(directory)
    else:
        _disable_numba_caching()
        sys.stderr.write(
            "hy-edge: warning: no writable directory for the JIT cache (tried $CACHE_DIRECTORY, "
            "$STATE_DIRECTORY, ~/.cache/hy-edge, $HY_EDGE_CACHE); kernels are compiled on every start\n"
        )
    _configured = directory
    return directory


def _disable_numba_caching() -> None:
    """Make `cache=True` a no-op in this process. With no writable directory numba's own locators all
    fail and it raises at kernel definition, so nothing else in the process could cache either."""
    from numba.core import dispatcher

    dispatcher.Dispatcher.enable_caching = lambda self: None
