"""The one exception type that vqt raises for bad input: its message says what and how to fix."""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable


class VQTError(Exception):
    """A user-facing error; the CLI prints its message in one line and exits non-zero."""


def run_cli(main: Callable[[], int | None]) -> int:
    """Call a CLI's `main`; a VQTError becomes one `error: ...` line on stderr and exit code 2.
    SIGTERM is handled like Ctrl-C (KeyboardInterrupt, so `finally:` cleanups run): the line
    "interrupted" and exit code 130."""
    handle_term = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if handle_term else None
    try:
        return main() or 0
    except VQTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if handle_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt
