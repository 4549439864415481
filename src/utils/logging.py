"""Logging: the `vqt` logger goes to the console and, while a phase runs, to that phase's task
logs.txt (`task_log`); each run folder gets its own logs.txt (src.engine.record)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

FMT = "[%(asctime)s %(name)s]: %(message)s"
DATEFMT = "%m/%d %H:%M:%S"


def get_logger() -> logging.Logger:
    return logging.getLogger("vqt")


def setup_logging() -> logging.Logger:
    """The `vqt` logger at INFO with one console handler."""
    logger = get_logger()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(type(h) is logging.StreamHandler for h in logger.handlers):  # task logs and test captures aside
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter(FMT, DATEFMT))
        logger.addHandler(h)
    return logger


@contextlib.contextmanager
def task_log(path: str) -> Iterator[None]:
    """Also append the `vqt` logger's lines to `path` while the block runs."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(name)s: %(message)s", DATEFMT))
    logger = setup_logging()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
