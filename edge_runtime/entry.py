"""The `hy-edge` console script. Importing the CLI pulls in click and numpy (a second or more on
a Pi); a Ctrl-C in that time ends the command quietly, as it would once running."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        sys.exit(130)
    cli(prog_name="hy-edge")
