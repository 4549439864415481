"""The one exception type that vqt raises for bad input: its message says what and how to fix."""
from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Callable

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # write failures the user fixes outside vqt


class VQTError(Exception):
    """A user-facing error; the CLI prints its message in one line and exits non-zero."""


def run_cli(main: Callable[[], int | None]) -> int:
    """Call a CLI's `main`; a VQTError (or a full or read-only disk) becomes one `error: ...` line on stderr and
    exit code 2; a closed stdout pipe ends it quietly (exit code 141).
    SIGTERM is handled like Ctrl-C (KeyboardInterrupt, so `finally:` cleanups run): the line
    "interrupted" and exit code 130."""
    handle_term = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if handle_term else None
    try:
        return main() or 0
    except VQTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head` closed the pipe: stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"error: cannot write {e.filename or 'the output'}: {e.strerror}; free space there or choose a folder "
              "you can write (OUTPUT_DIR, --out), then rerun", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if handle_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt
