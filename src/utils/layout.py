"""The results layout, owned here alone (it is the original's, so tools written for it read ours):

    OUTPUT_DIR{_val,_final,_sparsefinal}/<DATA.NAME>/<DATA.FEATURE>/lr{lr}_wd{wd}_bs{bs}/[STAGE/]run{k}/
        .vqt_run  config.yaml  logs.txt  eval_results.pth  [last_model.pth  {val,test}_<DATA.NAME>_logits.pth]
        tb/  DONE
    OUTPUT_DIR{_val,...}/.vqt/<DATA.NAME>/<DATA.FEATURE>/   logs.txt, pick.json, *.lock (the phase's bookkeeping)

STAGE is `compress` or `keep_frac_{F}` in the sparsity phase. A feature folder holds only lr/wd folders
(the original collector takes its first entry). Results are written atomically and DONE last, so a
run folder without DONE is an interrupted run and is redone, but only when `.vqt_run` says we
created it. DONE records the run's identity (every setting that changes its numbers).
`eval_results.pth` holds VPT's nested dict, one `epoch_{e}` entry per epoch.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import re
import shutil
import time
import types
from dataclasses import dataclass
from typing import Any, Self

import torch

from src.errors import VQTError

PHASES = {"search": "_val", "final": "_final", "sparse": "_sparsefinal"}
DONE = "DONE"
STARTED = ".vqt_run"
PICK = "pick.json"
META = ".vqt"
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


def meta_dir(phase_root: str, data_name: str, feature: str) -> str:
    """A task's bookkeeping folder under a phase folder (logs.txt, pick.json, locks)."""
    return task_dir(os.path.join(phase_root, META), data_name, feature)


def read_pick(phase_root: str, data_name: str, feature: str) -> dict | None:
    """The lr/wd folder a phase trained (its pick.json), None when not recorded or unreadable."""
    try:
        with open(os.path.join(meta_dir(phase_root, data_name, feature), PICK)) as f:
            pick = json.load(f)
    except (OSError, ValueError):
        return None
    return pick if isinstance(pick, dict) and "folder" in pick else None


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

    def meta_dir(self, phase: str) -> str:
        """The phase's bookkeeping for this task, outside the folders the original collector lists."""
        return meta_dir(self.output_dir + PHASES[phase], self.data_name, self.feature)

    def lock(self, phase: str, stage: str = "") -> TaskLock:
        return TaskLock(os.path.join(self.meta_dir(phase), f"{stage or phase}.lock"))

    def task_log(self, phase: str) -> str:
        return os.path.join(self.meta_dir(phase), "logs.txt")

    def write_pick(self, phase: str, lr: float, wd: float, source: str) -> None:
        """Record which lr/wd folder the phase trains (pick.json: lr, wd, folder, how it was chosen)."""
        rec = {"lr": lr, "wd": wd, "folder": hp_name(lr, wd, self.batch_size), "source": source}
        try:
            os.makedirs(self.meta_dir(phase), exist_ok=True)
        except OSError as e:
            raise _write_failed(self.meta_dir(phase), e) from None
        atomic_write_text(json.dumps(rec) + "\n", os.path.join(self.meta_dir(phase), PICK))

    def cache_dir(self) -> str:
        """Scratch folder of disk-memmap caches."""
        return self.output_dir + "_cache"


def _write_failed(path: str, err: BaseException) -> VQTError:
    reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
    return VQTError(f"cannot write {path}: {reason}; check that {os.path.dirname(path) or '.'} is writable and its disk "
                    "has space (or point OUTPUT_DIR elsewhere), then rerun: unfinished runs are redone")


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file, then rename over `path`; a failed write is one VQTError line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError from its zip writer
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise _write_failed(path, e) from None


def atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise _write_failed(path, e) from None


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
        """eval_results.pth, ours or the original code's (a defaultdict holding numpy floats), loaded
        without unpickling anything else."""
        return torch.load(self.results_file, pickle_module=_RESULTS_PICKLE, weights_only=False)

    @property
    def ours(self) -> bool:
        """Whether vqt created this folder (it carries our STARTED marker)."""
        return os.path.isfile(self.file(STARTED))

    @property
    def external(self) -> bool:
        """Results someone else wrote here (the original code): eval_results.pth, no DONE, no marker of ours."""
        return self.done is None and not self.ours and os.path.isfile(self.results_file)

    @property
    def finished(self) -> dict | None:
        """The DONE record of a run whose results can be read back; None when the run is to be (re)done."""
        done = self.done
        if done is None:
            return None
        try:
            results = self.load_results()
            if not isinstance(results, dict) or (done["status"] == "ok" and not results):
                return None
        except Exception:  # noqa: BLE001 - any unreadable results file means the run is not finished
            return None
        return done

    def load_checkpoint(self) -> dict:
        return torch.load(self.checkpoint_file, map_location="cpu", weights_only=True)

    @property
    def leftover(self) -> bool:
        """Whether the folder holds files of an unfinished run (a VQTError if vqt did not create them)."""
        if not (os.path.isdir(self.path) and os.listdir(self.path)):
            return False
        if not self.ours:
            raise VQTError(f"{self.path} exists and was not written by vqt (no {STARTED} marker): move it away "
                           "or use another OUTPUT_DIR; vqt never deletes results it did not write")
        return True

    def start(self) -> None:
        """Create the folder afresh: a folder we created before (an interrupted or replaced run) is cleared;
        one we did not create is never touched."""
        if self.leftover:
            shutil.rmtree(self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
            open(self.file(STARTED), "w").close()
        except OSError as e:
            raise _write_failed(self.file(STARTED), e) from None

    def finish(self, status: str, message: str, epochs: int, identity: dict) -> None:
        """Write DONE (last): status, message, epochs and the run's identity."""
        rec = {"status": status, "message": message, "epochs": epochs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
               **identity}
        atomic_write_text(json.dumps(rec) + "\n", self.file(DONE))


class _ResultsUnpickler(pickle.Unpickler):
    """Unpickles nested dicts of numbers: what eval_results.pth holds, ours or the original code's (a
    collections.defaultdict of numpy scalars). Any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in {("collections", "defaultdict"), ("builtins", "dict"), ("__builtin__", "dict"),
                                     ("_codecs", "encode"), ("numpy", "dtype"), ("numpy._core.multiarray", "scalar"),
                                     ("numpy.core.multiarray", "scalar")}
        if allowed or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not expected in an eval_results.pth")


_RESULTS_PICKLE = types.SimpleNamespace(Unpickler=_ResultsUnpickler, __name__="pickle")


class TaskLock:
    """Exclusive, non-blocking lock on the file `path` (released when the process exits)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = None

    def holder(self) -> str | None:
        """Who holds the lock now ("pid N"), or None when nobody does."""
        if not os.path.isfile(self.path):
            return None
        with open(self.path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                return f.read().strip() or "another process"
            fcntl.flock(f, fcntl.LOCK_UN)
        return None

    def __enter__(self) -> Self:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as e:
            raise _write_failed(self.path, e) from None
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
