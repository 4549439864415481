"""Genuine small on-disk VTAB datasets with synthetic content, written offline (tests, built-in demo).

`write_fake_tfds` subclasses the real TFDS builder (real name, config, version and features)
and only replaces the example generator, so the result is read exactly like prepared data.
The label fields a task reads are generated consistently (e.g. CLEVR object counts, KITTI
vehicle types and depths), so every task's label mapping yields valid, roughly balanced labels.
"""
from __future__ import annotations

import math
import os
import zlib

import numpy as np

from src.data.loader import import_tfds
from src.data.tasks import TASKS, VTABTask, get_task
from src.errors import VQTError

_CLEVR_DEPTHS = (4.0, 8.25, 8.75, 9.25, 9.75, 12.0)  # one depth inside each distance class
_KITTI_DEPTHS = (4.0, 14.0, 40.0)  # vehicle depth of kitti classes 0..2 (3: no vehicle)
_TEST_SIZE = 100


def default_sizes(task: VTABTask) -> dict[str, int]:
    """Smallest split sizes holding disjoint VTAB-1k slices for every task of this TFDS dataset."""
    sizes: dict[str, int] = {"train": 800}
    for t in (t for t in TASKS.values() if t.tfds_name == task.tfds_name):
        if t.val_percent:  # val200 (and maybe test) are percentage-derived slices of train
            n = 1000
            while not _fits(t, n):
                n += 100
            sizes["train"] = max(sizes["train"], n)
        else:
            sizes[t.val_split] = max(sizes.get(t.val_split, 0), 200)
        if not t.test_percent:  # a split of its own, or (smallnorb) the half after val200's split
            base = t.test_split.split("[")[0]
            sizes[base] = max(sizes.get(base, 0), 400 if base == t.val_split else _TEST_SIZE)
    return sizes


def _fits(t: VTABTask, n: int) -> bool:
    start = t.val_percent * n // 100
    test_start = start + (t.test_percent - t.val_percent) * n // 100
    return start >= 800 and start + 200 <= n and (not t.test_percent or n - test_start >= _TEST_SIZE)


def _fake_value(feature, rng: np.random.Generator, n_objects: int):
    """A random value of a TFDS feature (low-entropy images so the files stay small)."""
    F = import_tfds().features
    if isinstance(feature, F.Image):
        h, w, c = feature.shape
        h, w = h or int(rng.integers(32, 65)), w or int(rng.integers(32, 65))
        img = np.full((h, w, c), rng.integers(0, 256, size=c), dtype=np.uint8)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y:y + h // 4 + 1, x:x + w // 4 + 1] = rng.integers(0, 256, size=c)
        return img
    if isinstance(feature, F.ClassLabel):
        return int(rng.integers(feature.num_classes))
    if isinstance(feature, F.Text):
        return f"fake_{int(rng.integers(1 << 30))}"
    if isinstance(feature, F.BBoxFeature):
        y0, x0 = rng.uniform(0.0, 0.5, 2)
        return F.BBox(ymin=y0, xmin=x0, ymax=y0 + 0.3, xmax=x0 + 0.3)
    if isinstance(feature, F.Sequence):
        inner = feature.feature
        if isinstance(inner, F.FeaturesDict):  # equal-length fields, like real objects
            return {k: [_fake_value(v, rng, 0) for _ in range(n_objects)] for k, v in inner.items()}
        return [_fake_value(inner, rng, 0) for _ in range(n_objects)]
    if isinstance(feature, F.FeaturesDict):
        return {k: _fake_value(v, rng, n_objects) for k, v in feature.items()}
    if isinstance(feature, F.Tensor):
        shape = tuple(d or 2 for d in feature.shape)
        if np.issubdtype(feature.np_dtype, np.floating):
            return rng.standard_normal(shape).astype(feature.np_dtype)
        return rng.integers(0, 10, size=shape).astype(feature.np_dtype)
    raise VQTError(f"write_fake_tfds: no synthetic value for TFDS feature {type(feature).__name__}")


def _set_label_fields(example: dict, tasks: list[VTABTask], rng: np.random.Generator) -> None:
    """Make the fields the tasks read consistent and roughly balanced over their classes."""
    mappings = {t.mapping for t in tasks}
    objects = example.get("objects")
    if mappings & {"clevr_count", "clevr_distance"}:
        n = len(objects["size"])
        depth = _CLEVR_DEPTHS[int(rng.integers(len(_CLEVR_DEPTHS)))]
        coords = np.asarray(objects["pixel_coords"], np.float32).reshape(n, 3)
        coords[:, 2] = depth + rng.uniform(0.0, 0.2, n).astype(np.float32)
        coords[int(rng.integers(n)), 2] = depth
        objects["pixel_coords"] = list(coords)
    if "kitti_distance" in mappings:
        n = len(objects["type"])
        types = rng.integers(3, 8, n)  # non-vehicles
        z = rng.uniform(1.0, 60.0, n).astype(np.float32)
        cls = int(rng.integers(4))
        if cls < 3:
            types[0], z[0] = rng.integers(0, 3), _KITTI_DEPTHS[cls]
        location = np.asarray(objects["location"], np.float32).reshape(n, 3)
        location[:, 2] = z
        objects["type"], objects["location"] = [int(t) for t in types], list(location)


def _draw(shape: tuple[int, ...], labels: list[int], classes: list[int], peak: int = 255) -> np.ndarray:
    """An image that encodes the labels on a dark background.

    RGB: block colour <- first label, block position <- last label. Single channel (dsprites,
    smallnorb): a block of value `peak` at row <- first label, column <- last label.
    """
    h, w, c = shape
    if c == 1:
        img = np.zeros(shape, np.uint8)
        bh, bw = max(1, h // classes[0]), max(1, w // classes[-1])
        img[labels[0] * bh:(labels[0] + 1) * bh, labels[-1] * bw:(labels[-1] + 1) * bw] = peak
        return img
    levels = math.ceil(classes[0] ** (1 / 3))
    colour = [40 + 215 * ((labels[0] // levels ** k) % levels) // max(1, levels - 1) for k in range(3)]
    img = np.full(shape, 20, dtype=np.uint8)
    grid = math.ceil(math.sqrt(classes[-1]))
    bh, bw = max(1, h // grid), max(1, w // grid)
    row, col = divmod(labels[-1], grid)
    img[row * bh:(row + 2) * bh, col * bw:(col + 2) * bw] = colour
    return img


def _example(features, tasks: list[VTABTask], rng: np.random.Generator, learnable: bool) -> dict:
    """One synthetic example; the image encodes the task labels, or random ones unless `learnable`."""
    example = {k: _fake_value(v, rng, int(rng.integers(3, 11))) for k, v in features.items()}
    _set_label_fields(example, tasks, rng)
    classes = [t.num_classes for t in tasks]
    if learnable:
        labels = [t.example_to_image_label(example)[1] for t in tasks]
    else:
        labels = [int(rng.integers(c)) for c in classes]
    peak = 1 if tasks[0].mapping == "dsprites" else 255  # dsprites pixels are 0/1
    example["image"] = _draw(example["image"].shape, labels, classes, peak)
    return example


def write_fake_tfds(task_name: str, data_dir: str, sizes: dict[str, int] | None = None,
                    learnable: bool = False, seed: int = 0, version: str | None = None) -> str:
    """Write the TFDS dataset of DATA.NAME `task_name` with synthetic content; returns its directory.

    `sizes` maps TFDS split names to example counts (default: `default_sizes`). The version is
    the one `scripts/prepare_vtab.py` prepares (`task.prepare_spec`); `version` forces another
    one of a builder without configs (e.g. "3.2.0" for oxford_iiit_pet). An existing copy is kept.
    With `learnable`, images encode the labels of every task reading this dataset. Writes
    quietly: TFDS's "Downloading and preparing" / "downloaded and prepared" lines are dropped and its
    progress bars are switched off for the rest of the process.
    """
    tfds = import_tfds()
    task = get_task(task_name)
    tasks = [t for t in TASKS.values() if t.tfds_name == task.tfds_name]
    name, _, config = task.tfds_name.partition("/")
    cls = tfds.builder_cls(name)
    sizes = sizes or default_sizes(task)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split, n):
        rng = np.random.default_rng([seed, zlib.crc32(f"{task.tfds_name}|{split}".encode())])
        for i in range(n):
            yield f"{split}_{i}", _example(self.info.features, tasks, rng, learnable)

    attrs = {"name": cls.name, "__module__": cls.__module__,
             "_split_generators": _split_generators, "_generate_examples": _generate_examples,
             "_log_download_bytes": lambda self: None, "_log_download_done": lambda self: None}
    if version:
        attrs.update(VERSION=tfds.core.Version(version), SUPPORTED_VERSIONS=[], RELEASE_NOTES={version: "synthetic"})
    fake = type(f"Fake{cls.__name__}", (cls,), attrs, skip_registration=True)
    kwargs = {"config": config} if config else {}
    pattern = version or task.prepare_spec.partition(":")[2] or None
    builder = fake(data_dir=data_dir, version=pattern, **kwargs)
    tfds.disable_progress_bar()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return os.fspath(builder.data_dir)


def write_fake_imagefolder(task_name: str, root: str, sizes: dict[str, int] | None = None) -> str:
    """Write NOAH's VTAB-1k layout `<root>/<folder>/{split}.txt` + small PNGs; returns the task folder.

    `sizes` gives train800, val200 and test counts (default 800/200/100); train800val200.txt is
    train800 followed by val200. Images encode their (uniformly drawn) label.
    """
    from PIL import Image

    task = get_task(task_name)
    sizes = {"train800": 800, "val200": 200, "test": _TEST_SIZE, **(sizes or {})}
    folder = os.path.join(root, task.folder)
    lines: dict[str, list[str]] = {}
    for split in ("train800", "val200", "test"):
        os.makedirs(os.path.join(folder, "images", split), exist_ok=True)
        rng = np.random.default_rng(zlib.crc32(f"{task.folder}|{split}".encode()))
        lines[split] = []
        for i in range(sizes[split]):
            label = int(rng.integers(task.num_classes))
            shape = (int(rng.integers(24, 49)), int(rng.integers(24, 49)), 3)
            rel = f"images/{split}/{i:05d}.png"
            Image.fromarray(_draw(shape, [label], [task.num_classes])).save(os.path.join(folder, rel))
            lines[split].append(f"{rel} {label}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, split_lines in lines.items():
        with open(os.path.join(folder, f"{split}.txt"), "w") as f:
            f.writelines(split_lines)
    return folder
