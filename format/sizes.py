"""Byte sizes as the CLI, the memory plans and the converter's budget print them (binary units)."""

MB = 1024**2


def fmt_bytes(n: float) -> str:
    """1536 -> '1.50 KB'; binary units, as `--max-memory` reads them (1 GB = 2**30)."""
    for unit, size in (("GB", 1024**3), ("MB", MB), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
