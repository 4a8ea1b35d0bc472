"""What of a file mapping is resident (from /proc/self/smaps), and how many pages a model's matrices span:
for the memory tests, in their own process or in a child they start (which imports this by path)."""

from __future__ import annotations

import mmap


def mapped_kb(path, field: str = "Rss:") -> int:
    """Resident kB (or another smaps field's kB) of this process's mappings of the file at `path`."""
    kb, mine = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields[0].endswith(":"):
                mine = len(fields) >= 6 and fields[5] == str(path)
            elif fields[0] == field and mine:
                kb += int(fields[1])
    return kb


def matrices_kb(weights) -> int:
    """kB of the pages the matrices a forward pass reads (the head and every layer's linears) span."""
    lins = [weights.output] + [x for layer in weights.layers for x in layer.linears()]
    page = mmap.PAGESIZE
    spans = {(x.w.ctypes.data // page, -(-(x.w.ctypes.data + x.w.nbytes) // page)) for x in lins}
    return sum(b - a for a, b in spans) * page // 1024
