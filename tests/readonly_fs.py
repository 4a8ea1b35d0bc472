"""A read-only file system, simulated inside one (child) process: every write outside the allowed
directories fails with EROFS, as under systemd's ProtectSystem=strict. Root ignores permission bits and
CI may not allow mounts, so the tests patch the calls that create or write files instead.

    python -c "import readonly_fs; readonly_fs.install(['/allowed']); ..."
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def cli_command(args: list[str], writable: list[Path], env: dict, drop_home: bool = False) -> tuple[list[str], dict]:
    """argv and environment of `hy-edge ARGS` in a child whose file system is read-only except `writable`
    (env HY_EDGE_NO_PASSWD: and whose UID has no passwd entry)."""
    code = (
        "import sys, readonly_fs; readonly_fs.install(sys.argv[1].split(':') if sys.argv[1] else []); "
        "from edge_runtime.cli import main; main(sys.argv[2:], prog_name='hy-edge')"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "HY_EDGE_CACHE")}
    if drop_home:
        base.pop("HOME", None)
    base.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        PYTHONDONTWRITEBYTECODE="1",
        **env,
    )
    return [sys.executable, "-c", code, ":".join(str(w) for w in writable), *args], base


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install(writable: list[str] = ()) -> None:
    if os.environ.get("HY_EDGE_NO_PASSWD"):  # a container UID without a passwd entry
        import pwd

        def no_entry(uid):
            raise KeyError(f"getpwuid(): uid not found: {uid}")

        pwd.getpwuid = no_entry
    allowed = [os.path.realpath(w) for w in writable]

    def check(path, what: str) -> None:
        if isinstance(path, int):
            return
        real = os.path.realpath(os.fspath(path))
        if not any(real == a or real.startswith(a + os.sep) for a in allowed):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_replace, real_rename, real_unlink = os.replace, os.rename, os.unlink

    def ro_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file, "open")
        return real_open(file, mode, *args, **kwargs)

    def ro_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS:
            check(path, "open")
        return real_os_open(path, flags, *args, **kwargs)

    def ro_mkdir(path, *args, **kwargs):
        check(path, "mkdir")
        return real_mkdir(path, *args, **kwargs)

    def ro_replace(src, dst, *args, **kwargs):
        check(dst, "replace")
        return real_replace(src, dst, *args, **kwargs)

    def ro_rename(src, dst, *args, **kwargs):
        check(dst, "rename")
        return real_rename(src, dst, *args, **kwargs)

    def ro_unlink(path, *args, **kwargs):
        check(path, "unlink")
        return real_unlink(path, *args, **kwargs)

    builtins.open = io.open = ro_open
    os.open, os.mkdir, os.replace, os.rename, os.unlink = ro_os_open, ro_mkdir, ro_replace, ro_rename, ro_unlink
    Path.unlink = lambda self, missing_ok=False: _unlink(self, missing_ok, ro_unlink)


def _unlink(path: Path, missing_ok: bool, unlink) -> None:
    try:
        unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
