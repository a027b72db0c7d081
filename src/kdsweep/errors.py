"""One base class for every error kdsweep explains itself, and the guard that prints it.

Stages and the CLI run under `explained_errors()`: a KdsweepError becomes one readable line on
stderr and exit status 1, never a traceback from deep inside torch or zarr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class KdsweepError(ValueError):
    """A problem with the user's params, data or artifacts that the message explains."""


@contextmanager
def explained_errors() -> Iterator[None]:
    try:
        yield
    except KdsweepError as err:
        print(f"kdsweep error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
