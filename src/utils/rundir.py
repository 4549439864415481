"""Run folders: results are written atomically and a DONE marker last, so a folder without DONE
is an interrupted run and is redone; a lock keeps two processes off the same task."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Self

import torch

from src.errors import VQTError

DONE = "DONE"


def fmt(x: float) -> str:
    """Python's str(float), as the original's folder names (lr0.025, wd0.0001, wd0.0)."""
    return str(float(x))


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file, then rename over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class RunDir:
    path: str

    @property
    def done(self) -> dict | None:
        """The DONE record ({"status": "ok" | "diverged", "message", "epochs"}) or None if not finished."""
        try:
            with open(os.path.join(self.path, DONE)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None

    @property
    def incomplete(self) -> bool:
        return os.path.isdir(self.path) and self.done is None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def start(self) -> None:
        """Create the folder afresh (an interrupted run's leftovers are removed)."""
        if os.path.isdir(self.path):
            shutil.rmtree(self.path)
        os.makedirs(self.path)

    def finish(self, status: str, message: str, epochs: int) -> None:
        rec = {"status": status, "message": message, "epochs": epochs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(json.dumps(rec) + "\n", self.file(DONE))


class TaskLock:
    """Exclusive, non-blocking lock on `folder/.lock` (released when the process exits)."""

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, ".lock")
        self.fd = None

    def __enter__(self) -> Self:
        self.fd = open(self.path, "a+")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fd.seek(0)
            holder = self.fd.read().strip() or "another process"
            self.fd.close()
            raise VQTError(f"{self.path} is held by {holder}: another run of this task is in progress; "
                           "wait for it or stop it") from None
        self.fd.truncate(0)
        self.fd.write(f"pid {os.getpid()}\n")
        self.fd.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.fd.close()
