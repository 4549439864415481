"""Logging: the `vqt` logger goes to the console and to the task's logs.txt; each run folder gets
its own logs.txt through RunLog."""
from __future__ import annotations

import logging
import os
import sys
import time

FMT = "[%(asctime)s %(name)s]: %(message)s"
DATEFMT = "%m/%d %H:%M:%S"


def get_logger() -> logging.Logger:
    return logging.getLogger("vqt")


def setup_logging(log_file: str | None = None) -> logging.Logger:
    """Console handler once; a file handler per distinct `log_file` (appending)."""
    logger = get_logger()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(getattr(h, "_vqt_console", False) for h in logger.handlers):
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter(FMT, DATEFMT))
        h._vqt_console = True
        logger.addHandler(h)
    if log_file:
        path = os.path.abspath(log_file)
        if not any(getattr(h, "baseFilename", None) == path for h in logger.handlers):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fh = logging.FileHandler(path)
            fh.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(name)s: %(message)s", DATEFMT))
            logger.addHandler(fh)
    return logger


class RunLog:
    """Appends timestamped lines to one run folder's logs.txt."""

    def __init__(self, path: str):
        self.f = open(path, "a")  # noqa: SIM115 (open for the whole run, closed by close())

    def __call__(self, msg: str) -> None:
        self.f.write(f"[{time.strftime(DATEFMT)}] {msg}\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
