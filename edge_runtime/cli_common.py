"""What every hy-edge command shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import click

from .errors import HyEdgeError

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    """Print `hy-edge: error: message` and exit 2."""
    click.echo(f"hy-edge: error: {message}", err=True)
    sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into one line; anything else is a bug and keeps its traceback."""
    try:
        yield
    except HyEdgeError as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        fail(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    except KeyboardInterrupt:
        click.echo("", err=True)
        sys.exit(130)

