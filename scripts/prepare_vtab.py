"""Prepare (download + convert) the TFDS datasets of VTAB-1k tasks, or check what is prepared.

    python scripts/prepare_vtab.py --data-dir vtab_data                      # all 19 tasks
    python scripts/prepare_vtab.py --data-dir vtab_data --tasks vtab-dtd 'vtab-clevr(task="count_all")'
    python scripts/prepare_vtab.py --data-dir vtab_data --check              # table of OK / MISSING
    python scripts/prepare_vtab.py --data-dir vtab_data --check --deep       # also read every record

Prepared data is never re-downloaded. diabetic_retinopathy and resisc45 need a manual download
first (instructions are printed); sun397 and diabetic_retinopathy need OpenCV (pip install -r
requirements-prepare.txt). oxford_iiit_pet and kitti are prepared at the versions TFDS 4.9 can still
build (4.0.0, 3.3.0: it reads but no longer builds VPT's 3.x and 3.2.0); see
`src.data.loader.resolve_spec`.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.configs.defaults import get_cfg
from src.data.loader import (
    EXPECTED_SIZES,
    check_task_data,
    import_tfds,
    open_builder,
    prepare_command,
    resolve_spec,
    split_sizes,
)
from src.data.tasks import TASKS, VTABTask, get_task
from src.errors import VQTError, run_cli
from src.utils.cli import HelpFormatter
from src.utils.quiet import quiet_tensorflow

NETWORK_HOST = ("storage.googleapis.com", 443)  # TFDS downloads prepared data and some sources from GCS

MANUAL_STEPS = {
    "diabetic_retinopathy_detection/btgraham-300": """\
  1. Accept the rules of the Kaggle competition and download its data:
     https://www.kaggle.com/c/diabetic-retinopathy-detection/data
     (e.g. `kaggle competitions download -c diabetic-retinopathy-detection`).
  2. Concatenate the split archives: `cat train.zip.* > train.zip` (check there are 5 train parts,
     train.zip.001 .. train.zip.005) and `cat test.zip.* > test.zip`.
  3. Unpack into {manual}: train.zip -> train/, test.zip -> test/, sample.zip -> sample/, and the files
     trainLabels.csv and sampleSubmissions.csv (`jar xvf train.zip` copes with the huge zip where unzip fails).
  4. `pip install -r requirements-prepare.txt` (OpenCV: the btgraham-300 preprocessing uses cv2).
     Preparing also fetches the test labels (retinopathy_solution.csv) from storage.googleapis.com, \
so it needs the network.
  5. Run again: {command}""",
    "resisc45": """\
  1. Download NWPU-RESISC45.rar (OneDrive link in the TFDS catalog: https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs).
  2. Extract it into {manual}, so that {manual}/NWPU-RESISC45/<class>/<class>_001.jpg exist
     (e.g. `unrar x NWPU-RESISC45.rar {manual}/`).
  3. Run again: {command}""",
}
MANUAL_FILES = {  # what must exist in the manual dir before preparing
    "diabetic_retinopathy_detection/btgraham-300": ("train", "test", "sample", "trainLabels.csv"),
    "resisc45": ("NWPU-RESISC45",),
}
NEEDS_CV2 = ("sun397/tfds", "diabetic_retinopathy_detection/btgraham-300")
NOTES = {
    "sun397/tfds": "TFDS 4.9 skips the undecodable image t/track/outdoor/sun_aophkoiosslinihb.jpg itself "
                   "(VPT patched TFDS's sun.py for it).",
    "kitti": "VPT reads kitti:3.2.0, which TFDS 4.9 reads but cannot build (it builds only the canonical "
             "3.3.0: same images and splits, adds `occluded` labels); 3.3.0 is prepared and read unless 3.2.0 "
             "data exists.",
    "oxford_iiit_pet": "VPT read oxford_iiit_pet 3.2.0, which TFDS 4.9 cannot build; 4.0.0 ('fixes corrupt "
                       "images') is prepared and read unless 3.x data exists, so the 800/200 selection may differ.",
}


def network_ok(timeout: float = 5.0) -> bool:
    """Whether the TFDS download host answers within `timeout` seconds (DNS included)."""
    result = []

    def connect():
        try:
            socket.create_connection(NETWORK_HOST, timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(result)


def _prepare_one(task: VTABTask, data_dir: str, online: dict) -> str:
    """Prepare the dataset of `task`; returns "" on success, else why it was not prepared."""
    spec = task.prepare_spec
    command = prepare_command(data_dir, task)
    manual = os.path.join(data_dir, "downloads", "manual")
    if task.tfds_name in NOTES:
        print(f"    note: {NOTES[task.tfds_name]}")
    missing = [f for f in MANUAL_FILES.get(task.tfds_name, ()) if not os.path.exists(os.path.join(manual, f))]
    if missing:
        print(f"    {task.tfds_name} needs a manual download ({', '.join(missing)} missing in {manual}):")
        print(MANUAL_STEPS[task.tfds_name].format(manual=manual, command=command))
        return "manual download needed"
    if task.tfds_name in NEEDS_CV2 and importlib.util.find_spec("cv2") is None:
        print(f"    {task.tfds_name} needs OpenCV: pip install -r requirements-prepare.txt, then run again: {command}")
        return "cv2 missing"
    if task.tfds_name != "resisc45":  # everything else downloads something
        if "ok" not in online:
            online["ok"] = network_ok()
        if not online["ok"]:
            print(f"    offline: {NETWORK_HOST[0]} is unreachable, so {spec} cannot be downloaded. "
                  f"Run this on a machine with internet access and copy {data_dir}/ here.")
            return "offline"
    tfds = import_tfds()
    try:
        tfds.builder(spec, data_dir=data_dir).download_and_prepare()
    except Exception as e:  # noqa: BLE001 - report and go on with the next task
        print(f"    failed: {type(e).__name__}: {e}")
        return "failed"
    return ""


def prepare(tasks: list[VTABTask], data_dir: str) -> int:
    """Prepare every task's dataset (once per TFDS dataset); non-zero if any is not prepared."""
    problems: dict[str, str] = {}
    online: dict = {}
    for i, task in enumerate(tasks, 1):
        start = time.time()
        print(f"[{i}/{len(tasks)}] {task.name}: TFDS {task.prepare_spec}", flush=True)
        if task.tfds_name in problems:
            status = problems[task.tfds_name]
        else:
            try:
                print(f"    already prepared ({resolve_spec(task, data_dir)})")
                continue
            except VQTError:
                status = _prepare_one(task, data_dir, online)
        if status:
            problems[task.tfds_name] = status
            print(f"    NOT PREPARED: {status}", flush=True)
        else:
            print(f"    prepared in {time.time() - start:.0f} s", flush=True)
    print(f"done: {len(tasks) - sum(t.tfds_name in problems for t in tasks)}/{len(tasks)} tasks prepared in {data_dir}")
    return 1 if problems else 0


def check(tasks: list[VTABTask], data_dir: str, deep: bool = False) -> int:
    """Print the VTAB-1k split sizes of every task; non-zero if any is missing or wrong. With `deep`,
    every record of the task's splits is read too (CORRUPT, and why, when one cannot be)."""
    width = max(len(t.name) for t in tasks)
    print(f"{'task':<{width}}  {'TFDS':<52} {'train800':>8} {'val200':>6} {'trainval':>8} {'test':>6}  status")
    bad = 0
    for task in tasks:
        try:
            builder = open_builder(task, data_dir)
            sizes = split_sizes(task, builder)
        except VQTError:
            print(f"{task.name:<{width}}  {task.prepare_spec:<52} {'-':>8} {'-':>6} {'-':>8} {'-':>6}  MISSING")
            bad += 1
            continue
        ok = all(sizes[s] == n for s, n in EXPECTED_SIZES.items()) and sizes["test"] > 0
        problem = _read_all(task, data_dir) if ok and deep else ""
        status = "CORRUPT" if problem else ("OK" if ok else "WRONG SIZES")
        bad += status != "OK"
        print(f"{task.name:<{width}}  {builder.info.full_name:<52} {sizes['train800']:>8} {sizes['val200']:>6} "
              f"{sizes['train800val200']:>8} {sizes['test']:>6}  {status}")
        if problem:
            print(f"    {problem}")
    print(f"{len(tasks) - bad}/{len(tasks)} tasks OK in {data_dir}")
    return 1 if bad else 0


def _read_all(task: VTABTask, data_dir: str) -> str:
    """Why some record of the task's splits cannot be read, or "" when all can."""
    cfg = get_cfg()
    cfg.DATA.NAME, cfg.DATA.DATAPATH, cfg.DATA.NUMBER_CLASSES = task.name, data_dir, task.num_classes
    try:
        check_task_data(cfg)
    except VQTError as e:
        return str(e)
    return ""


def main(argv: list[str] | None = None) -> int:
    """Prepare or check; 0 when every task is prepared (or OK), 1 otherwise, 2 on bad input."""
    quiet_tensorflow()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-dir", default="vtab_data", help="TFDS data_dir (DATA.DATAPATH)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="DATA.NAME",
                   help="VTAB-1k tasks (default: all 19)")
    p.add_argument("--check", action="store_true", help="only report which tasks are prepared, with their split sizes")
    p.add_argument("--deep", action="store_true", help="with --check: read every record (finds corrupt files)")
    args = p.parse_args(argv)
    if args.deep and not args.check:
        p.error("--deep goes with --check")
    run = functools.partial(check, deep=args.deep) if args.check else prepare
    return run_cli(lambda: run([get_task(n) for n in args.tasks], args.data_dir))


if __name__ == "__main__":
    sys.exit(main())
