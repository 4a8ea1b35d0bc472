"""`python -m edge_runtime ...` is `hy-edge ...`."""

from .cli import main

main(prog_name="hy-edge")
