"""The results layout, owned here alone (it is the original's, so tools written for it read ours):

    OUTPUT_DIR{_val,_final,_sparsefinal}/<DATA.NAME>/<DATA.FEATURE>/lr{lr}_wd{wd}_bs{bs}/[STAGE/]run{k}/
        config.yaml  logs.txt  eval_results.pth  [last_model.pth  {val,test}_<DATA.NAME>_logits.pth]  tb/  DONE

STAGE is `compress` or `keep_frac_{F}` in the sparsity phase. Results are written atomically and DONE
last, so a run folder without DONE is an interrupted run and is redone; a lock keeps two processes
off the same stage. `eval_results.pth` holds VPT's nested dict, one `epoch_{e}` entry per epoch.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Self

import torch

from src.errors import VQTError

PHASES = {"search": "_val", "final": "_final", "sparse": "_sparsefinal"}
DONE = "DONE"
_HP = re.compile(r"lr([0-9.e+-]+)_wd([0-9.e+-]+)_bs(\d+)$")


def fmt(x: float) -> str:
    """Python's str(float), as the original's folder names (lr0.025, wd0.0001, wd0.0)."""
    return str(float(x))


def hp_name(lr: float, wd: float, batch_size: int) -> str:
    return f"lr{fmt(lr)}_wd{fmt(wd)}_bs{batch_size}"


def parse_hp_name(name: str) -> tuple[float, float, int] | None:
    """(lr, wd, batch size) of an lr/wd folder name, None for any other name."""
    m = _HP.match(name)
    return (float(m.group(1)), float(m.group(2)), int(m.group(3))) if m else None


def stage_name(sparse_mode: str, keep_frac: float) -> str:
    """The sparsity stage folder: `compress` or `keep_frac_{F}` (F as the original prints it)."""
    return "compress" if sparse_mode == "compress" else f"keep_frac_{keep_frac}"


def run_name(k: int) -> str:
    """Folder of the k-th run (1-based) of an lr/wd folder or stage."""
    return f"run{k}"


def task_dir(phase_root: str, data_name: str, feature: str) -> str:
    """A task's folder under a phase folder (OUTPUT_DIR + suffix, the collector's "setting")."""
    return os.path.join(phase_root, data_name, feature)


def last_epoch(results: dict) -> int:
    """Index of the last epoch recorded in an eval_results dict."""
    return max(int(key.split("_", 1)[1]) for key in results if key.startswith("epoch_"))


@dataclass(frozen=True)
class Layout:
    """Where one task's runs live: OUTPUT_DIR, DATA.NAME, DATA.FEATURE and DATA.BATCH_SIZE."""

    output_dir: str
    data_name: str
    feature: str
    batch_size: int

    @classmethod
    def from_cfg(cls, cfg) -> Layout:
        return cls(cfg.OUTPUT_DIR, cfg.DATA.NAME, cfg.DATA.FEATURE, cfg.DATA.BATCH_SIZE)

    def task_dir(self, phase: str) -> str:
        return task_dir(self.output_dir + PHASES[phase], self.data_name, self.feature)

    def hp_dir(self, phase: str, lr: float, wd: float) -> str:
        return os.path.join(self.task_dir(phase), hp_name(lr, wd, self.batch_size))

    def run(self, phase: str, lr: float, wd: float, k: int, stage: str = "") -> RunDir:
        return RunDir(os.path.join(self.hp_dir(phase, lr, wd), stage, run_name(k)))

    def search_runs(self) -> list[tuple[float, float, RunDir]]:
        """(lr, wd, run folder) of every search run present at this batch size."""
        root = self.task_dir("search")
        names = sorted(os.listdir(root)) if os.path.isdir(root) else []
        return [(hp[0], hp[1], RunDir(os.path.join(root, n, run_name(1)))) for n in names
                if (hp := parse_hp_name(n)) and hp[2] == self.batch_size and os.path.isdir(os.path.join(root, n, run_name(1)))]

    def lock(self, phase: str, stage: str = "") -> TaskLock:
        return TaskLock(os.path.join(self.task_dir(phase), stage))

    def task_log(self, phase: str) -> str:
        return os.path.join(self.task_dir(phase), "logs.txt")

    def cache_dir(self) -> str:
        """Scratch folder of disk-memmap caches."""
        return self.output_dir + "_cache"


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
        """The DONE record ({"status": "ok" | "diverged", "message", "epochs"}); None if not finished or
        unreadable (then the run counts as interrupted)."""
        try:
            with open(os.path.join(self.path, DONE)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and "status" in rec else None

    @property
    def incomplete(self) -> bool:
        return os.path.isdir(self.path) and self.done is None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def results_file(self) -> str:
        return self.file("eval_results.pth")

    @property
    def checkpoint_file(self) -> str:
        return self.file("last_model.pth")

    def logits_file(self, split_name: str) -> str:
        """`val_<DATA.NAME>` / `test_<DATA.NAME>` -> its logits file."""
        return self.file(f"{split_name}_logits.pth")

    def load_results(self) -> dict:
        return torch.load(self.results_file, weights_only=True)

    def load_checkpoint(self) -> dict:
        return torch.load(self.checkpoint_file, map_location="cpu", weights_only=True)

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
