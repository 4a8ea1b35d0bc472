"""Writes examples/eval/race.txt, the quality race's evaluation text: four public-domain English texts of
different kinds, taken from the Canterbury corpus files that the `Brotli` 1.2.1 source package on PyPI
carries as test data (tests/testdata/), so the text can be rebuilt with pip alone:

    pip download --no-deps --no-binary :all: brotli==1.2.1 -d /tmp
    python bench/make_eval_text.py /tmp/brotli-1.2.1.tar.gz

Prose is unwrapped into one line per paragraph (the files are hard-wrapped at ~70 columns); verse and the
play keep their lines. See examples/eval/README.md for the sources and their status.
"""

from __future__ import annotations

import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "examples" / "eval" / "race.txt"
# (file in tests/testdata, first line, last line (1-based, inclusive), kind)
PARTS = (
    ("alice29.txt", 14, 472, "prose"),  # Lewis Carroll, Alice's Adventures in Wonderland, chapters I-II
    ("lcet10.txt", 642, 1164, "prose"),  # Library of Congress, Workshop on Electronic Texts (1992), from session I
    ("asyoulik.txt", 74, 726, "verse"),  # William Shakespeare, As You Like It, act I scenes I-II
    ("plrabn12.txt", 68, 613, "verse"),  # John Milton, Paradise Lost, book I to "Chaos and old Night"
)


def unwrap(lines: list[str]) -> str:
    """Paragraphs (separated by blank lines) joined into single lines, runs of spaces collapsed."""
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines))
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def keep_lines(lines: list[str]) -> str:
    """Lines kept, stripped; runs of blank lines become one."""
    text = "\n".join(" ".join(line.split()) for line in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def build(archive: Path) -> str:
    with tarfile.open(archive) as tar:
        files = {Path(m.name).name: m for m in tar.getmembers() if "/tests/testdata/" in m.name}
        parts = []
        for name, first, last, kind in PARTS:
            raw = tar.extractfile(files[name]).read().decode("latin-1").replace("\r", "")
            lines = raw.split("\n")[first - 1 : last]
            parts.append(unwrap(lines) if kind == "prose" else keep_lines(lines))
    return "\n\n\n".join(parts) + "\n"


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    text = build(Path(sys.argv[1]))
    tmp = OUT.with_name(OUT.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(OUT)
    print(f"{OUT}: {len(text.encode())} bytes, {len(text.split())} words")


if __name__ == "__main__":
    main()
