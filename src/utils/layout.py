"""The results layout, owned here alone (it is the original's, so tools written for it read ours):

    OUTPUT_DIR{_val,_final,_sparsefinal}/<DATA.NAME>/<DATA.FEATURE>/lr{lr}_wd{wd}_bs{bs}/[STAGE/]run{k}/
        .vqt_run  config.yaml  logs.txt  eval_results.pth  [last_model.pth  {val,test}_<DATA.NAME>_logits.pth]
        tb/  DONE
    OUTPUT_DIR{_val,...}/.vqt/<DATA.NAME>/<DATA.FEATURE>/   logs.txt, pick.json, *.lock (the phase's bookkeeping)

STAGE is `compress` or `keep_frac_{F}` in the sparsity phase. A feature folder holds only lr/wd folders
(the original collector takes its first entry). Results are written atomically and DONE last. DONE
records the run's identity (every setting that changes its numbers), the size and hash of each result
file, and the fingerprints of the runs it started from. `RunDir.status` is the one reading of a run's
state (protocol and collector alike); `RunDir.clear` is the one, crash-safe, way a folder is deleted.
`eval_results.pth` holds VPT's nested dict, one `epoch_{e}` entry per epoch.
"""
from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

from src.errors import VQTError

PHASES = {"search": "_val", "final": "_final", "sparse": "_sparsefinal"}
DONE = "DONE"
STARTED = ".vqt_run"
PICK = "pick.json"
META = ".vqt"
_SCRATCH = re.compile(r"tmp(\d+)$")
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


def setting_name(q: int, optimizer: str, baseline: str = "") -> str:
    """The launchers' OUTPUT_DIR name under EXP_ROOT: VQTSup_{Q}_{opt} for VQT with Q query tokens, or
    {baseline}_{opt} for a baseline as scripts/VPT/run_vpt_vtab.sh names it (linear, prompt-deep10, vqt1+lora)."""
    return f"{baseline}_{optimizer}" if baseline else f"VQTSup_{q}_{optimizer}"


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


def phase_lock(phase_root: str, data_name: str, feature: str, name: str) -> TaskLock:
    """The lock a phase (or sparsity stage) `name` holds while it trains a task's runs."""
    return TaskLock(os.path.join(meta_dir(phase_root, data_name, feature), f"{name}.lock"))


@contextlib.contextmanager
def scratch(folder: str) -> Iterator[str]:
    """`folder`/tmp<pid> as this process's temporary folder while the block runs (tempfile and TMPDIR: TensorFlow's
    autograph and TFDS's temporary files land there), after removing those of dead processes. Removed after the
    block, and `folder` with it when that leaves it empty; a killed process's is removed by the next call."""
    for dead in _left_by_dead(folder, _SCRATCH):
        shutil.rmtree(dead, ignore_errors=True)
    path = os.path.join(folder, f"tmp{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise _write_failed(path, e) from None
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = path
    try:
        yield path
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


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
                if (hp := parse_hp_name(n)) and hp[2] == self.batch_size
                and os.path.isdir(os.path.join(root, n, run_name(1)))]

    def meta_dir(self, phase: str) -> str:
        """The phase's bookkeeping for this task, outside the folders the original collector lists."""
        return meta_dir(self.output_dir + PHASES[phase], self.data_name, self.feature)

    def lock(self, phase: str, stage: str = "") -> TaskLock:
        return phase_lock(self.output_dir + PHASES[phase], self.data_name, self.feature, stage or phase)

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
    return VQTError(f"cannot write {path}: {reason}; check that {os.path.dirname(path) or '.'} is writable and its "
                    "disk has space (or point OUTPUT_DIR elsewhere), then rerun: unfinished runs are redone")


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file, then rename over `path`; a failed write is one VQTError line."""
    import torch  # imported where used: reading the layout (the collector's --help) needs no torch

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


class RunState(enum.Enum):
    """What a run folder holds, for the identity wanted (`RunDir.status`)."""

    MISSING = "missing"      # no folder, or an empty one
    RUNNING = "running"      # ours, no DONE, and its phase's lock is held
    PARTIAL = "partial"      # ours, no DONE: interrupted (redone)
    BROKEN = "broken"        # DONE, but a file it vouches for differs or the results do not load (redone)
    DONE = "done"            # finished ok (under the identity wanted, when one is given)
    DIVERGED = "diverged"    # finished: the loss stopped being finite (under the identity wanted)
    STALE = "stale"          # finished under another identity, or a run it started from changed
    FOREIGN = "foreign"      # not created by vqt (no marker): never touched
    EXTERNAL = "external"    # the original code's results (eval_results.pth, no DONE, no marker): read only


REDO = (RunState.PARTIAL, RunState.BROKEN)  # states a rerun redoes without asking
_OURS = re.compile(r"(config\.yaml|logs\.txt|eval_results\.pth|last_model\.pth|.+_logits\.pth|DONE|\.vqt_run|tb)"
                   r"(\.tmp\d+)?$")
_TEMP = re.compile(r".+\.tmp(\d+)$")
_CHUNK = 1 << 20


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _left_by_dead(folder: str, pattern: re.Pattern) -> list[str]:
    """Paths in `folder` whose name matches `pattern` with the pid (its group 1) of a process no longer alive
    (none when `folder` cannot be listed)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, name) for name in names
            if (m := pattern.match(name)) and not pid_alive(int(m.group(1)))]


def remove_dead_temps(folder: str) -> None:
    """Remove `*.tmp<pid>` files that processes of ours, now dead, left in `folder` (killed mid-write)."""
    for dead in _left_by_dead(folder, _TEMP):
        with contextlib.suppress(OSError):
            os.remove(dead)


def file_check(path: str) -> dict:
    """Size and a cheap sha256 (size, first and last MiB) of a file, as DONE records it."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_CHUNK))
        if size > _CHUNK:
            f.seek(max(_CHUNK, size - _CHUNK))
            h.update(f.read())
    return {"size": size, "sha256": h.hexdigest()}


@dataclass
class RunDir:
    """One run folder; `status` is the one answer to "what is this run", for the protocol and the collector."""

    path: str

    @property
    def record(self) -> dict | None:
        """The DONE record ({"status": "ok" | "diverged", "message", "epochs", identity, files, parents});
        None when absent or unreadable."""
        try:
            with open(os.path.join(self.path, DONE)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and "status" in rec else None

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

    @property
    def aside(self) -> str:
        """Where `clear` moves the folder before deleting it (a name only vqt gives)."""
        head, name = os.path.split(self.path)
        return os.path.join(head, f".{name}.vqt_clearing")

    def load_results(self) -> dict:
        """eval_results.pth, ours or the original code's (a defaultdict holding numpy floats), loaded
        without unpickling anything else."""
        import torch

        return torch.load(self.results_file, pickle_module=_RESULTS_PICKLE, weights_only=False)

    def load_checkpoint(self) -> dict:
        import torch

        return torch.load(self.checkpoint_file, map_location="cpu", weights_only=True)

    def top1(self, split_name: str) -> float:
        """Top-1 (0..1) of `split_name` (`val_<DATA.NAME>` / `test_<DATA.NAME>`) at the last epoch recorded."""
        results = self.load_results()
        return float(results[f"epoch_{last_epoch(results)}"]["classification"][split_name]["top1"])

    @property
    def epochs(self) -> int:
        """Epochs recorded in eval_results.pth."""
        return last_epoch(self.load_results()) + 1

    def status(self, wanted: str | None = None, lock: TaskLock | None = None) -> RunState:
        """The run's state: from the marker, DONE, the files DONE vouches for, the runs it started from, the
        phase's `lock` (RUNNING vs PARTIAL) and the identity `wanted` (None: any identity)."""
        names = _listdir(self.path)
        if not names:
            return RunState.MISSING
        rec = self.record
        if rec is None:
            if STARTED not in names:
                return RunState.EXTERNAL if "eval_results.pth" in names else RunState.FOREIGN
            return RunState.RUNNING if lock is not None and lock.holder() else RunState.PARTIAL
        if self.damage(rec):
            return RunState.BROKEN
        if (wanted is not None and rec.get("identity") != wanted) or self.changed_parents(rec):
            return RunState.STALE
        return RunState.DIVERGED if rec["status"] == "diverged" else RunState.DONE

    def damage(self, rec: dict | None = None) -> str:
        """Why the files DONE vouches for cannot be trusted ("" when they can)."""
        rec = rec or self.record or {}
        for name, want in (rec.get("files") or {}).items():
            try:
                got = file_check(self.file(name))
            except OSError:
                return f"{name} is missing"
            if got != want:
                return f"{name} differs from what DONE recorded ({got['size']} bytes, DONE says {want.get('size')})"
        try:
            results = self.load_results()
        except Exception as err:  # noqa: BLE001 - any unreadable results file is damage
            return f"eval_results.pth does not load ({type(err).__name__})"
        ok = isinstance(results, dict) and (results or rec.get("status") != "ok")
        return "" if ok else "eval_results.pth is empty"

    def changed_parents(self, rec: dict | None = None) -> list[str]:
        """The runs this one started from (recorded in DONE) that are no longer the same runs."""
        rec = rec or self.record or {}
        parents = rec.get("parents") or {}
        return [rel for rel, fp in parents.items()
                if RunDir(os.path.normpath(os.path.join(self.path, rel))).fingerprint() != fp]

    def fingerprint(self) -> str:
        """Names this finished run's numbers: its identity and the files DONE vouches for ("" if not finished)."""
        rec = self.record
        if rec is None or self.damage(rec):
            return ""
        text = json.dumps([rec.get("identity"), rec.get("files")], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def foreign_files(self) -> list[str]:
        """Files in the folder that vqt does not write (a user's own): a clear never deletes them."""
        return sorted(n for n in _listdir(self.path) if not _OURS.match(n))

    def tidy(self) -> None:
        """Finish a clear that a kill interrupted, and remove temporary files of dead processes of ours."""
        if os.path.isdir(self.aside):
            shutil.rmtree(self.aside, ignore_errors=True)
        remove_dead_temps(self.path)

    def check_clearable(self, state: RunState | None = None) -> None:
        """One line when `clear` must not delete this folder: one we did not create, or one holding a file vqt does
        not write. `state`: the folder's `status()`, when known."""
        if (state or self.status()) in (RunState.FOREIGN, RunState.EXTERNAL):
            raise VQTError(f"{self.path} exists and was not written by vqt (no {STARTED} marker): move it away "
                           "or use another OUTPUT_DIR; vqt never deletes results it did not write")
        if extra := self.foreign_files():
            raise VQTError(f"{self.file(extra[0])} was not written by vqt and would be deleted with its run folder: "
                           "move it elsewhere, then rerun")

    def clear(self) -> None:
        """Delete the folder of a run of ours, crash-safe: renamed aside (a name only vqt gives), then deleted;
        a kill leaves either our folder or nothing (`tidy` removes what is aside). A folder `check_clearable`
        refuses is never touched."""
        state = self.status()
        if state is RunState.MISSING:
            return
        self.check_clearable(state)
        self.tidy()
        try:
            os.replace(self.path, self.aside)
            shutil.rmtree(self.aside)
        except OSError as e:
            raise _write_failed(self.path, e) from None

    def start(self) -> None:
        """Create the run's folder and its marker; a folder that already holds files is refused (`clear` it)."""
        if _listdir(self.path):
            raise VQTError(f"{self.path} is not empty: it must be cleared before the run starts")
        try:
            os.makedirs(self.path, exist_ok=True)
            open(self.file(STARTED), "w").close()
        except OSError as e:
            raise _write_failed(self.file(STARTED), e) from None

    def finish(self, status: str, message: str, epochs: int, identity: dict, parents: list[RunDir] = (),
               usage: dict | None = None) -> None:
        """Write DONE (last): status, message, epochs, the run's identity, size and hash of each result file it
        vouches for, the fingerprints of the runs it started from, and what training used (`usage`: trainable
        parameters, seconds per epoch, peak memory)."""
        files = {n: file_check(self.file(n)) for n in sorted(_listdir(self.path))
                 if n == "eval_results.pth" or n == "last_model.pth" or n.endswith("_logits.pth")}
        rec = {"status": status, "message": message, "epochs": epochs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
               **identity, "files": files,
               "parents": {os.path.relpath(p.path, self.path): p.fingerprint() for p in parents}, **(usage or {})}
        atomic_write_text(json.dumps(rec) + "\n", self.file(DONE))


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


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
        """Who holds the lock now ("pid N"), or None when nobody does (read only: creates no file)."""
        try:
            f = open(self.path)  # noqa: SIM115 (closed by the with below)
        except OSError:
            return None
        with f:
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
