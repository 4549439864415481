"""Logging: the `vqt` logger goes to the console and, while a phase runs, to that phase's task
logs.txt (`task_log`); each run folder gets its own logs.txt (src.engine.record)."""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata

from src.errors import VQTError

FMT = "[%(asctime)s %(name)s]: %(message)s"
DATEFMT = "%m/%d %H:%M:%S"


def get_logger() -> logging.Logger:
    return logging.getLogger("vqt")


class _Console(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (so redirections after setup apply)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _) -> None:
        pass


def setup_logging() -> logging.Logger:
    """The `vqt` logger at INFO with one console handler."""
    logger = get_logger()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, _Console) for h in logger.handlers):
        h = _Console()
        h.setFormatter(logging.Formatter(FMT, DATEFMT))
        logger.addHandler(h)
    return logger


def environment() -> list[str]:
    """What produced a log: command line, git commit, package versions."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (not a git checkout)"
    versions = []
    for pkg in ("torch", "tensorflow-cpu", "tensorflow", "tensorflow-datasets", "timm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{pkg} {metadata.version(pkg)}")
    return [f"command: {' '.join(sys.argv)}", f"git commit: {commit}", "packages: " + ", ".join(versions)]


class _TaskFile(logging.FileHandler):
    """A log file whose failed write (a full disk) stops the run with one line instead of logging's traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        raise VQTError(f"cannot write the log {self.baseFilename}: {getattr(err, 'strerror', None) or err}; free "
                       "space there (or point OUTPUT_DIR elsewhere), then rerun: unfinished runs are redone") from None


@contextlib.contextmanager
def task_log(path: str, header: list[str] = ()) -> Iterator[None]:
    """Also append the `vqt` logger's lines to `path` while the block runs; the file starts with `header`
    and ends with the wall time."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = _TaskFile(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(name)s: %(message)s", DATEFMT))
    logger = setup_logging()
    logger.addHandler(handler)
    start = time.time()
    try:
        for line in header:
            handler.emit(logger.makeRecord(logger.name, logging.INFO, __file__, 0, line, None, None))
        yield
    finally:
        logger.removeHandler(handler)
        with contextlib.suppress(VQTError):  # a full disk was already reported by the failed write
            handler.emit(logger.makeRecord(logger.name, logging.INFO, __file__, 0,
                                           f"wall time: {time.time() - start:.1f} s", None, None))
        with contextlib.suppress(OSError):
            handler.close()
