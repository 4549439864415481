"""The one exception type that vqt raises for bad input: its message says what and how to fix."""
from __future__ import annotations

import sys
from collections.abc import Callable


class VQTError(Exception):
    """A user-facing error; the CLI prints its message in one line and exits non-zero."""


def run_cli(main: Callable[[], int | None]) -> int:
    """Call a CLI's `main`; a VQTError becomes one `error: ...` line on stderr and exit code 2."""
    try:
        return main() or 0
    except VQTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
