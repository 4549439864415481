"""Read VTAB-1k splits as native-resolution uint8 images + int64 labels.

Sources (DATA.SOURCE): "tfds" reads data prepared by `scripts/prepare_vtab.py` in the TFDS
data_dir DATA.DATAPATH (never downloads); "imagefolder" reads NOAH-style VTAB-1k folders
(`<DATAPATH>/<task folder>/{train800,val200,train800val200,test}.txt`) without TensorFlow; "folder"
reads your own class folders (src/data/folder.py).
TFDS splits are read in index order (one file at a time), so train800val200 is train800
followed by val200.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import re
import shlex
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from src.data.folder import check_folder_data, folder_source, read_image
from src.data.tasks import SPLITS, VTABTask, get_task
from src.errors import VQTError
from src.utils.logging import get_logger
from src.utils.quiet import quiet_tensorflow

log = get_logger()

EXPECTED_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}

Batch = tuple[list[np.ndarray], np.ndarray]


@dataclass
class ImageSet:
    """A split in memory: uint8 HxWx3 images at native resolution and int64 labels."""

    images: list[np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


@functools.cache
def import_tfds():
    """tensorflow_datasets, with TF logging quietened and GPUs hidden from TensorFlow."""
    quiet_tensorflow()
    import tensorflow as tf
    import tensorflow_datasets as tfds

    # TFDS's own PartialDecoding uses a deprecated attribute and warns once per feature.
    logging.getLogger("absl").addFilter(lambda record: "FeatureConnector.dtype" not in record.getMessage())

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF devices were already initialised elsewhere
        pass
    return tfds


def prepare_command(data_dir: str, task: VTABTask) -> str:
    """The shell command that prepares `task` in `data_dir`."""
    return f"python scripts/prepare_vtab.py --data-dir {shlex.quote(data_dir)} --tasks {shlex.quote(task.name)}"


def _is_prepared(data_dir: str, spec: str) -> bool:
    name, _, version = spec.partition(":")
    pattern = os.path.join(glob.escape(data_dir), *name.split("/"), version or "*", "dataset_info.json")
    return bool(glob.glob(pattern))


def resolve_spec(task: VTABTask, data_dir: str) -> str:
    """The TFDS spec to read: `task.tfds_spec` if prepared in `data_dir`, else `task.fallback_spec`.

    Modern TFDS (4.9) cannot prepare two of VPT's versions: oxford_iiit_pet 3.x (only 4.0.0,
    which "fixes corrupt images", so its 800/200 selection may differ from VPT's) and kitti
    3.2.0 (only 3.3.0, which adds `occluded` labels). Data of the old version prepared earlier
    is preferred; otherwise the version that `scripts/prepare_vtab.py` prepares is read.
    Only looks at the file system, so a missing dataset fails fast (no download attempt).
    """
    if not data_dir:
        raise VQTError("DATA.DATAPATH is empty: set it to the TFDS data_dir, e.g. DATA.DATAPATH vtab_data")
    for spec in (task.tfds_spec, task.fallback_spec):
        if spec and _is_prepared(data_dir, spec):
            if task.fallback_spec:
                log.info("%s: reading TFDS %s from %s", task.name, spec, data_dir)
            return spec
    wanted = task.tfds_spec + (f" or {task.fallback_spec}" if task.fallback_spec else "")
    raise VQTError(
        f"{task.name}: TFDS dataset {wanted} is not prepared in data_dir {data_dir!r}. "
        f"Prepare it with: {prepare_command(data_dir, task)}"
    )


def open_builder(task: VTABTask, data_dir: str):
    """The TFDS builder of the prepared data of `task` (VQTError when it is missing)."""
    spec = resolve_spec(task, data_dir)
    tfds = import_tfds()
    try:
        return tfds.builder(spec, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - any TFDS failure becomes one clear message
        raise VQTError(f"{task.name}: cannot open TFDS {spec} in {data_dir!r} ({type(e).__name__}: {e}). "
                       f"Re-prepare it with: {prepare_command(data_dir, task)}") from None


def split_exprs(task: VTABTask, builder) -> dict[str, str]:
    """VTAB-1k split name -> TFDS split expression for the prepared split sizes of `builder`."""
    num_examples = {name: info.num_examples for name, info in builder.info.splits.items()}
    return {split: task.split_expr(split, num_examples) for split in SPLITS}


def split_sizes(task: VTABTask, builder) -> dict[str, int]:
    """Number of examples of each VTAB-1k split in the prepared data of `builder` (no reading)."""
    return {split: _num_examples(builder, expr) for split, expr in split_exprs(task, builder).items()}


def _num_examples(builder, expr: str) -> int:
    try:
        return builder.info.splits[expr].num_examples
    except (KeyError, ValueError, AssertionError) as e:
        raise VQTError(f"TFDS {builder.info.full_name} in {builder.data_dir}: split {expr!r} is not available ({e}); "
                       "the data is incomplete or too small for VTAB-1k: "
                       "re-prepare it with scripts/prepare_vtab.py") from None


def data_identity(cfg) -> str:
    """What identifies the task's data: the TFDS dataset (name, version, its dataset_info.json), the
    image-folder lists, or your folder's files (relative paths, labels, sizes)."""
    if cfg.DATA.SOURCE == "folder":
        from src.data.folder import scan
        root, h = cfg.DATA.DATAPATH, hashlib.sha256()
        for split, files in sorted(scan(root).files.items()):
            h.update(repr([(split, os.path.relpath(p, root), y, os.path.getsize(p)) for p, y in files]).encode())
        return "folder " + h.hexdigest()[:16]
    task = get_task(cfg.DATA.NAME)
    if cfg.DATA.SOURCE == "tfds":
        spec = resolve_spec(task, cfg.DATA.DATAPATH)
        info = open_builder(task, cfg.DATA.DATAPATH).data_dir
        with open(os.path.join(info, "dataset_info.json"), "rb") as f:
            return f"tfds {spec} " + hashlib.sha256(f.read()).hexdigest()[:16]
    h = hashlib.sha256()
    for split in ("train800", "val200", "test"):
        list_file, entries = _folder_entries(cfg, task, split)
        h.update(repr([(os.path.relpath(path, os.path.dirname(list_file)), y) for path, y in entries]).encode())
    return f"imagefolder {task.folder} " + h.hexdigest()[:16]


def _decoders(task: VTABTask):
    """Decode only the features the task reads (skips e.g. pet masks and CLEVR questions)."""
    tfds = import_tfds()
    objects = {"clevr_count": ["size"], "clevr_distance": ["pixel_coords"], "kitti_distance": ["type", "location"]}
    if task.mapping in objects:
        features = {"image": True, "objects": objects[task.mapping]}
    else:
        features = {"image": True, task.label_key: True}
    return tfds.decode.PartialDecoding(features)


def _tfds_dataset(cfg, task: VTABTask, split: str, decoders):
    """(builder, number of examples, tf.data dataset) of a VTAB-1k split, its size checked."""
    data_dir = cfg.DATA.DATAPATH
    builder = open_builder(task, data_dir)
    expr = split_exprs(task, builder)[split]
    n = _num_examples(builder, expr)
    expected = EXPECTED_SIZES.get(split)
    if (expected is not None and n != expected) or n == 0:
        raise VQTError(f"{task.name}: split {split} = {builder.info.full_name} {expr!r} has {n} examples, "
                       f"expected {expected or 'some'}; the data in {data_dir!r} is incomplete. "
                       f"Re-prepare it with: {prepare_command(data_dir, task)}")
    tfds = import_tfds()
    read_config = tfds.ReadConfig(interleave_cycle_length=1,
                                  num_parallel_calls_for_decode=max(1, int(cfg.DATA.NUM_WORKERS)))
    ds = builder.as_dataset(split=expr, shuffle_files=False, decoders=decoders, read_config=read_config)
    return builder, n, ds


def _unreadable(task: VTABTask, builder, split: str, data_dir: str, err: Exception) -> VQTError:
    detail = str(getattr(err, "message", err)).strip().splitlines()[0]
    detail = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", detail).strip()  # TF's op and function names
    return VQTError(f"{task.name}: split {split} of TFDS {builder.info.full_name} in {data_dir!r} cannot be read "
                    f"({type(err).__name__}: {detail}): the data is corrupt. Delete {builder.data_dir} and "
                    f"re-prepare it with: {prepare_command(data_dir, task)}")


def _tfds_source(cfg, task: VTABTask, split: str) -> tuple[int, Iterator[tuple[np.ndarray, int]]]:
    builder, n, ds = _tfds_dataset(cfg, task, split, _decoders(task))
    return n, _tfds_examples(ds, task, builder, split, cfg.DATA.DATAPATH)


def _tfds_examples(ds, task: VTABTask, builder, split: str, data_dir: str) -> Iterator[tuple[np.ndarray, int]]:
    import tensorflow as tf

    try:
        for ex in import_tfds().as_numpy(ds):
            yield task.example_to_image_label(ex)
    except tf.errors.OpError as e:
        raise _unreadable(task, builder, split, data_dir, e) from None


def _count_tfds_records(cfg, task: VTABTask, split: str) -> int:
    """Read every record of a split (images not decoded, so corrupt records are found fast)."""
    import tensorflow as tf

    tfds = import_tfds()
    decoders = tfds.decode.PartialDecoding({"image": True}, decoders={"image": tfds.decode.SkipDecoding()})
    builder, n, ds = _tfds_dataset(cfg, task, split, decoders)
    try:
        count = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
    except tf.errors.OpError as e:
        raise _unreadable(task, builder, split, cfg.DATA.DATAPATH, e) from None
    if count != n:
        raise VQTError(f"{task.name}: split {split} of TFDS {builder.info.full_name} in {cfg.DATA.DATAPATH!r} has "
                       f"{count} records, its metadata says {n}: the data is incomplete. Delete {builder.data_dir} "
                       f"and re-prepare it with: {prepare_command(cfg.DATA.DATAPATH, task)}")
    return count


def check_task_data(cfg) -> dict[str, int]:
    """Read every record of the splits a task uses (train800, val200, test; train800val200 is their
    union) without decoding images, so corrupt or missing data stops a run before any training.
    Returns the number of examples of each; VQTError naming the dataset and the fix otherwise.
    Image folders: every listed file must exist. Your own folders (SOURCE folder): see src/data/folder.py."""
    if cfg.DATA.SOURCE == "folder":
        return check_folder_data(cfg)
    task = get_task(cfg.DATA.NAME)
    counts = {}
    for split in ("train800", "val200", "test"):
        if cfg.DATA.SOURCE == "tfds":
            counts[split] = _count_tfds_records(cfg, task, split)
        else:
            list_file, entries = _folder_entries(cfg, task, split)
            missing = next((path for path, _ in entries if not os.path.isfile(path)), None)
            if missing:
                raise VQTError(f"{task.name}: {missing}, listed in {list_file}, does not exist: restore the "
                               "image or re-create the VTAB-1k folder")
            counts[split] = len(entries)
    return counts


def _folder_entries(cfg, task: VTABTask, split: str) -> tuple[str, list[tuple[str, int]]]:
    """(list file, [(image path, label)]) of a split in NOAH's VTAB-1k layout."""
    root = os.path.join(cfg.DATA.DATAPATH, task.folder)
    list_file = os.path.join(root, f"{split}.txt")
    if not os.path.isfile(list_file):
        raise VQTError(f"{task.name}: list file {list_file} does not exist; the image-folder source expects "
                       f"NOAH's VTAB-1k layout <DATA.DATAPATH>/{task.folder}/{{{','.join(SPLITS)}}}.txt")
    entries = []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise VQTError(f"{list_file}:{lineno}: expected '<relative image path> <int label>', "
                               f"got {line.strip()!r}")
            entries.append((os.path.join(root, parts[0]), int(parts[1])))
    return list_file, entries


def _folder_source(cfg, task: VTABTask, split: str) -> tuple[int, Iterator[tuple[np.ndarray, int]]]:
    list_file, entries = _folder_entries(cfg, task, split)
    expected = EXPECTED_SIZES.get(split)
    if expected is not None and len(entries) != expected:
        log.warning("%s lists %d images; VTAB-1k has %d", list_file, len(entries), expected)
    return len(entries), _read_images(entries, max(1, int(cfg.DATA.NUM_WORKERS)))


def _read_images(entries: list[tuple[str, int]], workers: int, chunk: int = 256) -> Iterator[tuple[np.ndarray, int]]:
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(entries), chunk):
            part = entries[start:start + chunk]
            yield from zip(pool.map(read_image, [p for p, _ in part]), (label for _, label in part))


def _source(cfg, split: str) -> tuple[int, Iterator[tuple[np.ndarray, int]]]:
    if cfg.DATA.SOURCE == "folder":
        return folder_source(cfg, split)
    task = get_task(cfg.DATA.NAME)
    if split not in SPLITS:
        raise VQTError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if cfg.DATA.SOURCE == "tfds":
        n, examples = _tfds_source(cfg, task, split)
    else:
        n, examples = _folder_source(cfg, task, split)
    return n, _checked(examples, task, cfg.DATA.DATAPATH)


def _checked(examples: Iterable[tuple[np.ndarray, int]], task: VTABTask,
             where: str) -> Iterator[tuple[np.ndarray, int]]:
    for image, label in examples:
        if not 0 <= label < task.num_classes:
            raise VQTError(f"{task.name}: label {label} in {where!r} is outside [0, {task.num_classes}); "
                           "the data does not belong to this task")
        yield image, label


def load_split(cfg, split: str) -> ImageSet:
    """A whole VTAB-1k split (train800 | val200 | train800val200 | test) in memory as uint8."""
    n, examples = _source(cfg, split)
    images, labels = next(_batches(examples, max(n, 1)), ([], np.zeros(0, dtype=np.int64)))
    return ImageSet(images, labels)


def stream_split(cfg, split: str, batch_size: int) -> tuple[int, Iterator[Batch]]:
    """(number of examples, iterator of (uint8 image list, int64 labels) batches), reading lazily."""
    n, examples = _source(cfg, split)
    return n, _batches(examples, batch_size)


def _batches(examples: Iterable[tuple[np.ndarray, int]], batch_size: int) -> Iterator[Batch]:
    images, labels = [], []
    for image, label in examples:
        images.append(image)
        labels.append(label)
        if len(images) == batch_size:
            yield images, np.asarray(labels, dtype=np.int64)
            images, labels = [], []
    if images:
        yield images, np.asarray(labels, dtype=np.int64)
