"""`python -m edge_runtime ...` is `hy-edge ...`."""

from .entry import main

main()
