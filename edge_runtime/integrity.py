"""Is a converted file's weight data whole? Its extent (a truncated `.onnx.data`) and, when the converter
stored them (format.META_CHECKSUMS), the CRC-32 of every external tensor: flipped bytes in FP8 weights
otherwise decode silently to NaN logits.

CRC-32 runs at well over 1 GB/s, so checking Hunyuan-0.5B's 0.66 GB costs about half a second: done by
`hy-edge info --verify` and once per cached conversion (cli_model.py), not on every load.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import format as F
from .errors import ModelFileError
from .onnx_header import EXTERNAL


@dataclass(frozen=True)
class Extent:
    """Where a file's external tensors live: name -> (offset, length), in which data files."""

    tensors: dict[str, tuple[str, int, int]]  # name -> (location, offset, length)

    def needed(self, location: str) -> int:
        return max((o + n for loc, o, n in self.tensors.values() if loc == location), default=0)

    @property
    def locations(self) -> set[str]:
        return {loc for loc, _, _ in self.tensors.values()}


def extent(proto) -> Extent:
    out = {}
    for t in proto.graph.initializer:
        if t.data_location == EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out[t.name] = (info.get("location", ""), int(info.get("offset", 0)), int(info.get("length", 0)))
    return Extent(out)


def check_data_size(proto, path: Path) -> None:
    """ModelFileError (one line) when a data file is missing or shorter than its tensors need."""
    ext = extent(proto)
    for location in sorted(ext.locations):
        data = path.parent / location
        if not data.is_file():
            raise ModelFileError(f"{path.name}: its data file {data} is missing")
        have, need = data.stat().st_size, ext.needed(location)
        if have < need:
            raise ModelFileError(
                f"{path.name}: data file {data.name} is truncated: {have:,} bytes, its tensors need {need:,} "
                f"(an interrupted copy or conversion; convert again)"
            )


def stored_checksums(proto) -> dict[str, int] | None:
    """name -> CRC-32 the converter recorded, or None for a file converted before checksums existed."""
    meta = F.metadata(proto)
    if F.META_CHECKSUMS not in meta:
        return None
    try:
        payload = json.loads(meta[F.META_CHECKSUMS])
        if payload.get("algorithm") != "crc32":
            raise ModelFileError(f"checksum algorithm {payload.get('algorithm')!r} is not supported")
        return {str(k): int(v) for k, v in payload["tensors"].items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ModelFileError(f"metadata '{F.META_CHECKSUMS}' is malformed") from None


def verify_checksums(proto, path: Path) -> int:
    """Check every external tensor against its stored CRC-32; returns how many were checked.
    ModelFileError naming the first bad tensor (and how many more) on a mismatch."""
    check_data_size(proto, path)
    sums = stored_checksums(proto)
    if sums is None:
        raise ModelFileError(
            f"{path.name}: no checksums stored (converted by an older hy-edge); convert again to verify it"
        )
    ext = extent(proto)
    maps = {loc: np.memmap(path.parent / loc, dtype=np.uint8, mode="r") for loc in ext.locations}
    bad = []
    for name, (location, offset, length) in ext.tensors.items():
        expected = sums.get(name)
        if expected is None:
            bad.append(name)  # a tensor the converter did not write
        elif zlib.crc32(maps[location][offset : offset + length]) != expected:
            bad.append(name)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ModelFileError(
            f"{path.name}: checksum mismatch in tensor '{bad[0]}'{more}: the data file is corrupt; convert again"
        )
    return len(ext.tensors)
