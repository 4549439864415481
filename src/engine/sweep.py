"""Run VTAB-1k tasks of the table in `src.data.tasks` as submitit jobs (Slurm, local processes, or in-process)."""
from __future__ import annotations

import collections
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from src.data.tasks import VTABTask
from src.errors import VQTError

TRAIN_TEMPLATE = "bash scripts/VQT/run_vqt_vtab.sh {gpu} {name} {classes} {q} {optimizer} {feature}"
SPARSITY_TEMPLATE = (
    "bash scripts/VQT/run_vqt_vtab_sparsity.sh {gpu} {name} {classes} {q} {optimizer} {feature} {fraction}"
)
TEMPLATE_FIELDS = ("gpu", "name", "classes", "q", "optimizer", "feature", "fraction")
STDERR_TAIL_LINES = 20


@dataclass(frozen=True)
class TaskJob:
    """What one job runs: the task, its settings and the command templates (see `task_commands`)."""

    task: VTABTask
    feature: str
    optimizer: str
    workdir: str
    train_template: str = TRAIN_TEMPLATE
    sparsity_template: str = SPARSITY_TEMPLATE


@dataclass(frozen=True)
class TaskResult:
    """Outcome of one task: `returncode` is None when the job itself died (timeout, killed, ...)."""

    name: str
    ok: bool
    returncode: int | None
    message: str
    stderr_tail: str = ""


def _format(template: str, fields: dict[str, object]) -> list[str]:
    """Split a template like a shell would, then fill each word (so names with quotes stay one argument)."""
    try:
        return [word.format(**fields) for word in shlex.split(template)]
    except (KeyError, IndexError, ValueError) as err:
        raise VQTError(
            f"bad command template {template!r} ({err!r}); use only the fields {{{'}, {'.join(TEMPLATE_FIELDS)}}}"
        ) from err


def task_commands(job: TaskJob, gpu: str) -> list[list[str]]:
    """argv of the training command, then of the sparsity command when the task has a keep fraction."""
    t = job.task
    fields = {"gpu": gpu, "name": t.name, "classes": t.num_classes, "q": t.q, "optimizer": job.optimizer,
              "feature": job.feature, "fraction": t.fraction}
    commands = [_format(job.train_template, fields)]
    if t.fraction is not None:
        commands.append(_format(job.sparsity_template, fields))
    return commands


def run_task(job: TaskJob) -> TaskResult:
    """Job body: run the task's commands in order in `workdir`, streaming their output; never raises.

    GPUIDX is the job's own CUDA_VISIBLE_DEVICES (set by Slurm or the local scheduler), else "0"."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES") or "0"
    for argv in task_commands(job, gpu):
        tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        try:
            proc = subprocess.Popen(argv, cwd=job.workdir, stderr=subprocess.PIPE, text=True, errors="replace")
        except OSError as err:
            return TaskResult(job.task.name, False, None, f"cannot start {shlex.join(argv)}: {err}")
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
        code = proc.wait()
        if code != 0:
            return TaskResult(job.task.name, False, code, f"exit {code} from {shlex.join(argv)}", "".join(tail))
    return TaskResult(job.task.name, True, 0, "ok")


def visible_gpus() -> list[int]:
    """GPU indices this machine offers: CUDA_VISIBLE_DEVICES when set, else all devices torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        import torch

        return list(range(torch.cuda.device_count()))
    ids = [s.strip() for s in env.split(",") if s.strip()]
    if not all(s.isdigit() for s in ids):
        raise VQTError(f"CUDA_VISIBLE_DEVICES={env!r} is not a list of integer indices; set it to e.g. 0,1")
    return [int(s) for s in ids]


def _job_failure(name: str, job, err: Exception) -> TaskResult:
    """A TaskResult for a job whose result could not be read (the job process died)."""
    tail = "\n".join((job.stderr() or "").splitlines()[-STDERR_TAIL_LINES:])
    return TaskResult(name, False, None, f"{_headline(err)} (log: {job.paths.stderr})", tail)


def _headline(err: Exception) -> str:
    """An exception message in one line, without the log excerpt submitit appends after a '----' rule."""
    return " ".join(str(err).split("\n----")[0].split())[:300] or type(err).__name__


def launch(jobs: Sequence[TaskJob], cluster: str, log_dir: str | Path, *, partition: str | None = None,
           gpus_per_job: int = 1, timeout_min: int = 1440, max_parallel: int | None = None,
           poll_s: float = 2.0) -> list[TaskResult]:
    """Run every job (one per task) on `cluster` ("slurm", "local" or "debug") and wait for all of them.

    local: one job per `gpus_per_job` visible GPUs at a time, each with its own CUDA_VISIBLE_DEVICES;
    without GPUs, `max_parallel` CPU jobs at a time (default 1). slurm: all at once unless
    `max_parallel`. debug: in this process, one after the other. Results keep the order of `jobs`."""
    import submitit

    if gpus_per_job < 0:
        raise VQTError(f"--gpus-per-job must be >= 0, got {gpus_per_job}")
    if max_parallel is not None and max_parallel < 1:
        raise VQTError(f"--max-parallel must be >= 1, got {max_parallel}")
    for job in jobs:  # a bad template fails here, before anything is submitted
        task_commands(job, "0")
    # one folder per job (%j: its id), except local jobs: submitit's local controller would also create
    # a folder literally named %j, so their files go to log_dir as <pid>_0_log.err etc.
    folder = Path(log_dir) if cluster == "local" else Path(log_dir) / "%j"
    slots: list[list[int] | None]
    if cluster == "slurm":
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        except RuntimeError as err:
            raise VQTError(f"--cluster slurm: {err} (use --cluster local on a machine without Slurm)") from err
        executor.update_parameters(timeout_min=timeout_min, gpus_per_node=gpus_per_job, name="vqt_sweep",
                                   **({"slurm_partition": partition} if partition else {}))
        slots = [None] * (max_parallel or len(jobs))
    elif cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=timeout_min)
        slots = _local_slots(gpus_per_job, max_parallel)
    elif cluster == "debug":
        executor = submitit.DebugExecutor(folder=folder)
        slots = [None]
    else:
        raise VQTError(f"unknown --cluster {cluster!r}; use slurm, local or debug")

    sweep = _Sweep(executor, jobs, slots)
    try:
        return sweep.run(poll_s)
    except KeyboardInterrupt:
        ids = ", ".join(str(sjob.job_id) for sjob, _ in sweep.running.values()) or "(none)"
        if cluster == "slurm":
            raise VQTError(f"interrupted; Slurm jobs {ids} keep running (scancel them to stop)") from None
        for sjob, _ in sweep.running.values():
            sjob.cancel(check=False)
        raise VQTError(f"interrupted; cancelled jobs {ids}") from None


class _Sweep:
    """Submits jobs while a slot is free and collects them as they finish."""

    def __init__(self, executor, jobs: Sequence[TaskJob], slots: list[list[int] | None]) -> None:
        self.executor, self.jobs, self.slots = executor, jobs, slots
        self.pending = list(range(len(jobs)))
        self.running: dict[int, tuple[object, list[int] | None]] = {}  # job index -> (submitit job, slot)
        self.results: dict[int, TaskResult] = {}

    def run(self, poll_s: float) -> list[TaskResult]:
        """Run all jobs with a progress bar; results in job order."""
        from tqdm import tqdm

        with tqdm(total=len(self.jobs), desc="tasks", unit="task") as bar:
            while self.pending or self.running:
                while self.pending and len(self.running) < len(self.slots):
                    self._submit(self.pending.pop(0), bar)
                for i, (sjob, _) in list(self.running.items()):
                    if sjob.done():
                        del self.running[i]
                        try:
                            self._finish(i, sjob.result(), bar)
                        except Exception as err:  # noqa: BLE001 - submitit wraps a dead job in various exception types
                            self._finish(i, _job_failure(self.jobs[i].task.name, sjob, err), bar)
                if self.running:
                    time.sleep(poll_s)
        return [self.results[i] for i in range(len(self.jobs))]

    def _submit(self, i: int, bar) -> None:
        used = [slot for _, slot in self.running.values()]
        slot = next(s for s in self.slots if not s or s not in used)  # None/[]: slots without GPUs
        if slot is not None:
            self.executor.update_parameters(gpus_per_node=len(slot), visible_gpus=slot)
        try:
            self.running[i] = (self.executor.submit(run_task, self.jobs[i]), slot)
        except Exception as err:  # noqa: BLE001 - e.g. sbatch rejecting the job: report it, go on with the others
            failure = TaskResult(self.jobs[i].task.name, False, None, f"submission failed: {_headline(err)}")
            self._finish(i, failure, bar)

    def _finish(self, i: int, result: TaskResult, bar) -> None:
        self.results[i] = result
        bar.update(1)
        bar.set_postfix(running=len(self.running), failed=sum(not r.ok for r in self.results.values()))


def _local_slots(gpus_per_job: int, max_parallel: int | None) -> list[list[int] | None]:
    """GPU lists of the local jobs that may run at once; CPU-only: `max_parallel` (default 1) empty lists."""
    gpus = visible_gpus() if gpus_per_job > 0 else []
    if not gpus:
        return [[]] * (max_parallel or 1)
    if len(gpus) < gpus_per_job:
        raise VQTError(f"--gpus-per-job {gpus_per_job} but only GPUs {gpus} are visible")
    slots: list[list[int] | None] = [gpus[i:i + gpus_per_job]
                                     for i in range(0, len(gpus) - gpus_per_job + 1, gpus_per_job)]
    return slots[:max_parallel] if max_parallel else slots

