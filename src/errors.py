"""The one exception type that vqt raises for bad input: its message says what and how to fix."""


class VQTError(Exception):
    """A user-facing error; the CLI prints its message in one line and exits non-zero."""
