"""Edit a converted file's header with onnx and save it as a converter would have written it: the header
checksum re-stamped (a file whose checksum no longer matches is refused before anything else is read,
so a test of a later check edits through here)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import onnx
from hy_edge_format import format as F


def restamp(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Set the header CRC-32 in the checksums entry to that of the file's bytes without the entry."""
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        payload = json.loads(meta[F.META_CHECKSUMS])
    except (KeyError, ValueError, RecursionError):
        return proto  # none, or not JSON: nothing to stamp
    if not isinstance(payload, dict):
        return proto
    del meta[F.META_CHECKSUMS]
    onnx.helper.set_model_props(proto, meta)
    payload["header"] = zlib.crc32(proto.SerializeToString())
    onnx.helper.set_model_props(proto, {**meta, F.META_CHECKSUMS: json.dumps(payload)})
    return proto


def save(proto: onnx.ModelProto, path: Path) -> Path:
    Path(path).write_bytes(restamp(proto).SerializeToString())
    return Path(path)
