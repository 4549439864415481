"""Launch the VTAB-1k tasks of the task table (src/data/tasks.py) as one submitit job each and report how
every task ended.

Run from the repo root, e.g. `python scripts/launch_sweep.py --cluster slurm --partition gpu` or
`python scripts/launch_sweep.py --cluster local --tasks vtab-dtd vtab-svhn`.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src.data.tasks import select_tasks
from src.engine.sweep import SPARSITY_TEMPLATE, TRAIN_TEMPLATE, TaskJob, TaskResult, launch, task_commands
from src.errors import VQTError
from src.utils.cli import HelpFormatter
from src.utils.quiet import quiet_tensorflow


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), default="local",
                   help="submitit backend: Slurm jobs, local processes (one per GPU), or in-process (debugging)")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    p.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per task (0: CPU jobs)")
    p.add_argument("--timeout-min", type=int, default=1440, help="per-job time limit in minutes")
    p.add_argument("--max-parallel", type=int,
                   help="most jobs at once (local default: one per GPU, or 1 without GPUs; slurm: all)")
    p.add_argument("--tasks", nargs="+", metavar="NAME", help="subset of DATA.NAMEs (default: all 19)")
    p.add_argument("--log-dir", default="h2t_vit_experiments/submitit", help="submitit's job files and logs")
    p.add_argument("--feature", default="sup_vitb16_imagenet1k", help="DATA.FEATURE (FEATURE of the launchers)")
    p.add_argument("--optimizer", default="adam", help="OPTIMIZER of the launchers")
    p.add_argument("--command-template", default=TRAIN_TEMPLATE,
                   help="training command per task; fields {gpu} {name} {classes} {q} {optimizer} {feature}")
    p.add_argument("--sparsity-template", default=SPARSITY_TEMPLATE,
                   help="run after training for tasks with a keep fraction; also {fraction}")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    return p.parse_args(argv)


def _report(result: TaskResult) -> str:
    """One line per task, plus the indented stderr tail of a failure."""
    if result.ok:
        return f"[ok]     {result.name}"
    tail = "".join(f"\n    | {line}" for line in result.stderr_tail.rstrip().splitlines())
    return f"[FAILED] {result.name}: {result.message}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Launch, wait, print a per-task report; exit status 1 if any task failed, 2 on bad input."""
    quiet_tensorflow()
    args = parse_args(argv)
    try:
        if Path.cwd().resolve() != REPO:  # jobs import src/ and run scripts/VQT/*.sh relative to the cwd
            raise VQTError(f"run this from the repository root: cd {REPO}")
        jobs = [TaskJob(t, args.feature, args.optimizer, str(REPO), args.command_template,
                        args.sparsity_template) for t in select_tasks(args.tasks)]
        if args.dry_run:
            print("\n".join(shlex.join(c) for job in jobs for c in task_commands(job, "GPUIDX")))
            return 0
        results = launch(jobs, args.cluster, args.log_dir, partition=args.partition,
                         gpus_per_job=args.gpus_per_job, timeout_min=args.timeout_min,
                         max_parallel=args.max_parallel)
    except VQTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(_report(r) for r in results))
    failed = [r.name for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} tasks succeeded" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
