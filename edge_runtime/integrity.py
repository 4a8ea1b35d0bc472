"""Is a converted file whole? Its header (the .onnx bytes: metadata, graph, inline tensors), the extent of
its weight data (a truncated `.onnx.data`) and, when the converter stored them (format.META_CHECKSUMS),
the CRC-32 of every external tensor: flipped bytes in FP8 weights otherwise decode silently to garbage.

The header's CRC covers the whole .onnx file but its own checksums entry: one flipped bit in `rope_theta`
changes the output as surely as one in a weight. It costs ~1 ms and is checked on every read. The
tensors' CRC-32 runs at well over 1 GB/s, so Hunyuan-0.5B's 0.66 GB costs about half a second: checked
on a file's first use (`verify_on_first_use`) and remembered by the device, inode, size and
modification time of the .onnx and its data files, so later starts pay nothing; `hy-edge info --verify`
checks them every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hy_edge_format import format as F
from hy_edge_format.errors import ModelFileError
from hy_edge_format.onnx_header import EXTERNAL
from hy_edge_format.safe_json import JSONInputError, is_int
from hy_edge_format.safe_json import loads as json_loads

_NUMBER = re.compile(r"[0-9]{1,19}")  # an offset or length as the external_data entries write it
READ_CHUNK = 8 << 20  # the tensors are checked through a buffer of this size, not a memory map (no RSS)
MAX_RECORDS = 256  # verification records kept (the oldest go first)


@dataclass(frozen=True)
class Extent:
    """Where a file's external tensors live: name -> (location, offset, length), in which data files."""

    tensors: dict[str, tuple[str, int, int | None]]  # length None: not written (the dims decide)

    def needed(self, location: str) -> int:
        return max((o + (n or 0) for loc, o, n in self.tensors.values() if loc == location), default=0)

    @property
    def locations(self) -> set[str]:
        return {loc for loc, _, _ in self.tensors.values()}


def external_entry(t, path: Path) -> tuple[str, int, int | None]:
    """(location, offset, length) of an external tensor, each checked: a location inside the model's
    directory, offsets and lengths as decimal numbers. ModelFileError naming the tensor."""
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    parts = PurePosixPath(location).parts
    if not location or location.startswith("/") or ".." in parts or "\\" in location or "\0" in location:
        raise ModelFileError(f"{path.name}: tensor '{t.name}' has external data at {location!r}, not a file beside it")
    numbers = []
    for key in ("offset", "length"):
        value = info.get(key)
        if value is not None and not _NUMBER.fullmatch(value):
            raise ModelFileError(f"{path.name}: tensor '{t.name}' has external data {key} {value[:40]!r}")
        numbers.append(None if value is None else int(value))
    return location, numbers[0] or 0, numbers[1]


def extent(proto, path: Path = Path("model.onnx")) -> Extent:
    return Extent({t.name: external_entry(t, path) for t in proto.graph.initializer if t.data_location == EXTERNAL})


def check_data_size(proto, path: Path) -> None:
    """ModelFileError (one line) when a data file is missing or shorter than its tensors need: checked
    before the file is mapped (a read past the end of a mapping is a bus error, not an exception)."""
    ext = extent(proto, path)
    for location in sorted(ext.locations):
        data = path.parent / location
        if not data.is_file():
            raise ModelFileError(f"{path.name}: external data file not found: {data}")
        have, need = data.stat().st_size, ext.needed(location)
        if have < need:
            raise ModelFileError(
                f"{path.name}: data file {data.name} is truncated: {have:,} bytes, its tensors need {need:,} "
                f"(an interrupted copy or conversion; convert again)"
            )


@dataclass(frozen=True)
class Checksums:
    tensors: dict[str, int]  # name -> CRC-32 of its bytes in the data file
    header: int | None  # CRC-32 of the .onnx without the checksums entry (None: converted before it existed)


def stored_checksums(proto, path: Path = Path("model.onnx")) -> Checksums | None:
    """What the converter recorded, or None for a file converted before checksums existed."""
    meta = F.metadata(proto)
    if F.META_CHECKSUMS not in meta:
        return None
    malformed = ModelFileError(f"{path.name}: metadata '{F.META_CHECKSUMS}' is malformed")
    try:
        payload = json_loads(meta[F.META_CHECKSUMS], max_depth=2)
    except JSONInputError:
        raise malformed from None
    if not isinstance(payload, dict) or not isinstance(payload.get("tensors"), dict):
        raise malformed
    if payload.get("algorithm") != "crc32":
        raise ModelFileError(f"{path.name}: checksum algorithm {str(payload.get('algorithm'))[:20]!r} is not supported")
    tensors, header = payload["tensors"], payload.get("header")
    if not all(is_int(v) for v in tensors.values()) or not (header is None or is_int(header)):
        raise malformed
    return Checksums(tensors, header)


def header_crc(data: bytes, proto) -> int:
    """CRC-32 of the .onnx bytes without its checksums entry (the converter's checksum of its header)."""
    for entry in proto.metadata_props:
        if entry.key == F.META_CHECKSUMS:
            start, end = entry.span
            return zlib.crc32(data[end:], zlib.crc32(data[:start]))
    return zlib.crc32(data)


def verify_header(data: bytes, proto, path: Path) -> None:
    """ModelFileError when the .onnx bytes do not match the header checksum the converter stored."""
    sums = stored_checksums(proto, path)
    if sums is not None and sums.header is not None and header_crc(data, proto) != sums.header:
        raise ModelFileError(
            f"{path.name}: checksum mismatch in its header (metadata, graph or small tensors): the file is "
            f"corrupt; convert again"
        )


def verify_checksums(proto, path: Path) -> int:
    """Check every external tensor against its stored CRC-32; returns how many were checked.
    ModelFileError naming the first bad tensor (and how many more) on a mismatch. Read with read(2)
    through one buffer: the page cache holds the file, this process's RSS does not."""
    check_data_size(proto, path)
    sums = stored_checksums(proto, path)
    if sums is None:
        raise ModelFileError(
            f"{path.name}: no checksums stored (converted by an older hy-edge); convert again to verify it"
        )
    ext = extent(proto, path)
    buf = memoryview(bytearray(READ_CHUNK))
    bad, files = [], {}
    try:
        for name, (location, offset, length) in sorted(ext.tensors.items(), key=lambda kv: kv[1][:2]):
            expected = sums.tensors.get(name)
            if location not in files:
                files[location] = open(path.parent / location, "rb")  # noqa: SIM115 (closed below)
            if expected is None or _crc(files[location], offset, length or 0, buf) != expected:
                bad.append(name)  # changed bytes, or a tensor the converter did not write
    finally:
        for f in files.values():
            f.close()
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ModelFileError(
            f"{path.name}: checksum mismatch in tensor '{bad[0]}'{more}: the data file is corrupt; convert again"
        )
    return len(ext.tensors)


def _crc(f, offset: int, length: int, buf: memoryview) -> int:
    f.seek(offset)
    crc = 0
    while length > 0:
        n = f.readinto(buf[: min(length, len(buf))])
        if not n:
            return -1  # the file ended early (changed since its size was checked)
        crc = zlib.crc32(buf[:n], crc)
        length -= n
    return crc


def _identity(proto, path: Path) -> str:
    """Device, inode, size and modification time of the .onnx and each of its data files, hashed."""
    parts = []
    for p in [path] + [path.parent / loc for loc in sorted(extent(proto, path).locations)]:
        st = p.stat()
        parts.append(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def content_digest(path: Path, meta: dict[str, str]) -> str:
    """What names a converted file's content (a saved prompt cache is tied to it): a hash of the checksums the
    converter stored, the CRC-32 of its header (metadata, spec, graph) and of every tensor; for a file
    converted before checksums existed, of its parts' device, inode, size and modification time."""
    if F.META_CHECKSUMS in meta:
        return "crc32:" + hashlib.sha256(meta[F.META_CHECKSUMS].encode()).hexdigest()[:32]
    from hy_edge_format.onnx_header import HeaderError, parse

    try:
        return "stat:" + _identity(parse(path.read_bytes()), path)
    except (OSError, HeaderError) as e:
        raise ModelFileError(f"{path.name}: cannot be read ({e})") from None


def verify_on_first_use(proto, path: Path, records: Path | None) -> bool:
    """Verify the file's tensors (`verify_checksums`) unless a record in `records` says this very file
    (same device, inode, size and mtime of every part) was verified before; record it after. Without a
    writable `records` directory the file is verified on every use. A file without stored checksums
    (converted by an older hy-edge) passes. Returns whether the tensors were read now."""
    if stored_checksums(proto, path) is None:
        return False
    record = None if records is None else records / _identity(proto, path)
    if record is not None and record.exists():
        return False
    verify_checksums(proto, path)
    if record is not None:
        with contextlib.suppress(OSError):  # a read-only cache: verified again next time
            records.mkdir(parents=True, exist_ok=True)
            record.touch()
            _prune(records)
    return True


def _prune(records: Path) -> None:
    """Keep the MAX_RECORDS newest records (a test run or a busy cache makes many)."""
    entries = list(os.scandir(records))
    if len(entries) > MAX_RECORDS:
        entries.sort(key=lambda e: e.stat().st_mtime_ns)
        for e in entries[: len(entries) - MAX_RECORDS]:
            with contextlib.suppress(OSError):
                os.unlink(e.path)
