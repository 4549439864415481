"""Your own images (DATA.SOURCE folder): DATA.DATAPATH/train/<class>/*, optional .../val/<class>/* and
.../test/<class>/*. Class names are the folder names (sorted; label = index); any number of classes;
any image format Pillow reads, at any size, anywhere under the class folder (subfolders included).

The protocol's splits map onto the folders: train800 = train (less the validation slice), val200 = val,
train800val200 = both, test = test. Without a val folder, validation is a stratified `VAL_FRACTION` of
each train class drawn with seed `VAL_SEED` (the log says so). Images are resized once, when read, to
the backbone's size with its resampling filter (DATA.CROPSIZE and DATA.INTERPOLATION, as resolved).

Bad input stops with one line: a missing train or test folder, an empty class folder, class folders
that differ between splits. Files Pillow does not recognise as images (README.txt, .DS_Store, ...)
are skipped, and the log gives their count and an example; hidden folders are not entered; a recognised
image that then fails to decode stops the run with its file name.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from src.errors import VQTError
from src.utils.logging import get_logger

VAL_FRACTION, VAL_SEED = 0.2, 0
PARTS = {"train800": ("train",), "val200": ("val",), "train800val200": ("train", "val"), "test": ("test",)}
CLASSES_FILE = "classes.json"


@dataclass(frozen=True)
class FolderData:
    """The labelled files of each part (train, val, test) and the class names."""

    classes: list[str]
    files: dict[str, list[tuple[str, int]]]
    val_from_train: bool
    skipped: list[str]


def images_in(folder: str) -> tuple[list[str], list[str]]:
    """(image files, skipped files) under `folder` and its subfolders (hidden subfolders are not entered),
    sorted: every file Pillow recognises is an image, every other file (README.txt, .DS_Store) is skipped.
    The one rule of training's class folders and predict.py's folders."""
    from PIL import Image, UnidentifiedImageError

    images, skipped = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                with Image.open(path):
                    images.append(path)
            except (UnidentifiedImageError, OSError):
                skipped.append(path)
    return sorted(images), sorted(skipped)


def _class_folders(split_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(split_dir)
                  if not n.startswith(".") and os.path.isdir(os.path.join(split_dir, n)))


def _part(root: str, part: str, classes: list[str] | None) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """(class names, [(file, label)], skipped files) of root/part; class names must equal `classes`."""
    split_dir = os.path.join(root, part)
    names = _class_folders(split_dir)
    if not names:
        raise VQTError(f"{split_dir} has no class folders: put each class's images in {split_dir}/<class name>/")
    if classes is not None and names != classes:
        only_here, missing = sorted(set(names) - set(classes)), sorted(set(classes) - set(names))
        raise VQTError(f"the class folders of {split_dir} differ from those of {os.path.join(root, 'train')}: "
                       f"only in {part}: {only_here or 'none'}, missing from {part}: {missing or 'none'}; "
                       "use the same class folders in every split")
    files, skipped = [], []
    for label, name in enumerate(names):
        images, bad = images_in(os.path.join(split_dir, name))
        if not images:
            raise VQTError(f"class folder {os.path.join(split_dir, name)} has no images Pillow can read: add images "
                           "or remove the folder")
        files += [(path, label) for path in images]
        skipped += bad
    return names, files, skipped


def _stratified_val(files: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, val): per class, round(VAL_FRACTION * n) files (at least 1, never all) drawn with VAL_SEED."""
    rng = np.random.default_rng(VAL_SEED)
    labels = np.array([label for _, label in files])
    val = set()
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        k = min(max(1, round(VAL_FRACTION * len(idx))), len(idx) - 1)
        val.update(rng.permutation(idx)[:k].tolist())
    return [f for i, f in enumerate(files) if i not in val], [f for i, f in enumerate(files) if i in val]


@functools.cache
def scan(root: str) -> FolderData:
    """The files and classes under `root` (read once per process), or one line saying what is wrong."""
    for part in ("train", "test"):
        if not os.path.isdir(os.path.join(root, part)):
            raise VQTError(f"DATA.DATAPATH {root!r} has no {part}/ folder: DATA.SOURCE folder reads "
                           "DATAPATH/train/<class>/*, optionally DATAPATH/val/<class>/*, and DATAPATH/test/<class>/*")
    classes, train, skipped = _part(root, "train", None)
    if len(classes) < 2:
        raise VQTError(f"{os.path.join(root, 'train')} has {len(classes)} class folder: a classifier needs at least 2")
    files = {}
    val_from_train = not os.path.isdir(os.path.join(root, "val"))
    if val_from_train:
        if any(sum(1 for _, y in train if y == label) < 2 for label in range(len(classes))):
            raise VQTError(f"without a {os.path.join(root, 'val')} folder every train class needs at least 2 images "
                           "(one goes to validation): add images or a val/ folder")
        files["train"], files["val"] = _stratified_val(train)
    else:
        files["train"] = train
        _, files["val"], bad = _part(root, "val", classes)
        skipped += bad
    _, files["test"], bad = _part(root, "test", classes)
    return FolderData(classes, files, val_from_train, skipped + bad)


def folder_summary(data: FolderData, root: str) -> str:
    """One log line: classes, images per part, where validation comes from, skipped files."""
    counts = ", ".join(f"{part} {len(files)}" for part, files in data.files.items())
    val = (f"validation: a stratified {VAL_FRACTION:.0%} of train (seed {VAL_SEED}), as {root}/val does not exist"
           if data.val_from_train else f"validation: {root}/val")
    skipped = (f"; skipped {len(data.skipped)} files Pillow cannot read (e.g. {data.skipped[0]})"
               if data.skipped else "")
    return f"{root}: {len(data.classes)} classes, {counts} images; {val}{skipped}"


def to_rgb(img):
    """A Pillow image as an 8-bit RGB image upright: its EXIF orientation applied, 16- and 32-bit integer
    images (`I;16`, `I`) scaled by their 16-bit range (value / 257), float images (`F`) by their min..max."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
        else:
            a = a / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def read_image(image, size: int = 0, interpolation: str = "bicubic") -> np.ndarray:
    """An image file (or Pillow image) as uint8 (H, W, 3) RGB (`to_rgb`), resized to (size, size) with
    Pillow's `interpolation` filter when `size` > 0. The one decoder of training and prediction."""
    from PIL import Image

    try:
        with contextlib.nullcontext(image) if isinstance(image, Image.Image) else Image.open(image) as img:
            rgb = to_rgb(img)
            if size and rgb.size != (size, size):
                rgb = rgb.resize((size, size), getattr(Image.Resampling, interpolation.upper()))
            return np.asarray(rgb, dtype=np.uint8)
    except OSError as e:
        raise VQTError(f"cannot decode image {image} ({e}): replace or remove the file") from None


def read_images(paths: list[str], size: int, interpolation: str, workers: int) -> Iterator[np.ndarray]:
    """`read_image` over `paths` in order, on `workers` threads."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        yield from pool.map(lambda p: read_image(p, size, interpolation), paths)


def folder_source(cfg, split: str) -> tuple[int, Iterator[tuple[np.ndarray, int]]]:
    """(number of examples, (image, label) iterator) of a protocol split of the folder dataset, resized to
    DATA.CROPSIZE with DATA.INTERPOLATION (both resolved from the backbone, `protocol.resolve_cfg`)."""
    data = scan(cfg.DATA.DATAPATH)
    entries = [e for part in PARTS[split] for e in data.files[part]]
    images = read_images([p for p, _ in entries], cfg.DATA.CROPSIZE, cfg.DATA.INTERPOLATION, cfg.DATA.NUM_WORKERS)
    return len(entries), zip(images, (label for _, label in entries))


def check_folder_data(cfg) -> dict[str, int]:
    """Examples per protocol split (train800, val200, test), after checking the folders and
    DATA.NUMBER_CLASSES; logs what was found."""
    data = scan(cfg.DATA.DATAPATH)
    check_folder_classes(cfg, data.classes)
    get_logger().info(folder_summary(data, cfg.DATA.DATAPATH))
    return {split: sum(len(data.files[p]) for p in PARTS[split]) for split in ("train800", "val200", "test")}


def check_folder_classes(cfg, classes: list[str]) -> None:
    n = cfg.DATA.NUMBER_CLASSES
    if n not in (-1, len(classes)):
        raise VQTError(f"DATA.NUMBER_CLASSES is {n} but {cfg.DATA.DATAPATH}/train has {len(classes)} class folders: "
                       f"set DATA.NUMBER_CLASSES {len(classes)} or -1 (from the folders)")


def write_classes(folder: str, classes: list[str]) -> None:
    """`classes.json` (the class names, label order) in `folder`, read back by `read_classes`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CLASSES_FILE), "w") as f:
        json.dump({"classes": classes}, f, indent=1)


def read_classes(run_dir: str) -> list[str] | None:
    """The class names saved for a run: `classes.json` in the run folder or one of its 3 parents."""
    folder = os.path.abspath(run_dir)
    for _ in range(4):
        path = os.path.join(folder, CLASSES_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)["classes"]
        folder = os.path.dirname(folder)
    return None
