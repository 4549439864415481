"""The 19 VTAB-1k tasks in one table (TFDS specs, splits, label mappings, the paper's demo settings),
and DATA.NAME parsing.

Light module (numpy only); TensorFlow is imported by `src.data.loader` when data is read.
"""
from __future__ import annotations

import ast
import difflib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from src.errors import VQTError

SPLITS = ("train800", "val200", "train800val200", "test")

_CLEVR_DEPTH_THRESHOLDS = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])
_KITTI_DEPTH_THRESHOLDS = np.array([-100.0, 8.0, 20.0, 999.0])
_KITTI_NO_VEHICLE_DEPTH = 1000.0
_KITTI_VEHICLE_TYPES = 3  # ClassLabel ids 0, 1, 2: Car, Van, Truck


@dataclass(frozen=True)
class VTABTask:
    """One VTAB-1k task: where its data lives in TFDS, how examples become (image, label), and how the
    paper's demo runs it (`q` query tokens per layer; `fraction`, the sparsity stage's keep fraction, or
    None: no sparsity stage; `short`, a short label; `print_rank`, its place in the collector's table).

    Split layout (as VPT's): train800 = `train[:800]`; val200 = 200 examples of `val_split`,
    starting at T = val_percent * n // 100 (0: at its start); the test set is `test_split`,
    or with `test_percent` its tail from `val_percent*n//100 + (test_percent-val_percent)*n//100`
    (VTAB's train count + val count).  `fallback_spec` is read when no data of `tfds_spec`
    is prepared (a version modern TFDS can still prepare), see `src.data.loader.resolve_spec`;
    `prepare_spec` is the one `scripts/prepare_vtab.py` prepares.
    """

    name: str
    tfds_spec: str
    num_classes: int
    group: str
    folder: str
    q: int
    fraction: float | None
    short: str
    print_rank: int
    test_size: int  # test examples at the TFDS versions VPT used
    val_split: str = "validation"
    val_percent: int = 0
    test_split: str = "test"
    test_percent: int = 0
    mapping: str = "plain"  # plain | clevr_count | clevr_distance | kitti_distance | dsprites | smallnorb
    label_key: str = "label"
    attr_classes: int = 0  # dsprites: classes of the raw attribute before binning
    fallback_spec: str = ""

    @property
    def prepare_spec(self) -> str:
        """The TFDS spec that `scripts/prepare_vtab.py` prepares: `fallback_spec` if set, else `tfds_spec`."""
        return self.fallback_spec or self.tfds_spec

    @property
    def tfds_name(self) -> str:
        """TFDS dataset name with config, e.g. `eurosat/rgb` (no version)."""
        return self.tfds_spec.split(":")[0]

    def split_expr(self, split: str, num_examples: dict[str, int]) -> str:
        """TFDS split expression of a VTAB-1k split, given the prepared split sizes."""
        if split not in SPLITS:
            raise VQTError(f"unknown split {split!r} for {self.name}; use one of {', '.join(SPLITS)}")
        train800 = "train[:800]"
        start = self.val_percent * self._size(num_examples, self.val_split) // 100 if self.val_percent else 0
        val200 = f"{self.val_split}[{start}:{start + 200}]" if start else f"{self.val_split}[:200]"
        if split == "train800":
            return train800
        if split == "val200":
            return val200
        if split == "train800val200":
            return f"{train800}+{val200}"
        if not self.test_percent:
            return self.test_split
        n = self._size(num_examples, self.test_split)
        start = self.val_percent * n // 100 + (self.test_percent - self.val_percent) * n // 100
        return f"{self.test_split}[{start}:]"

    def _size(self, num_examples: dict[str, int], split: str) -> int:
        if split not in num_examples:
            raise VQTError(
                f"{self.name}: the prepared TFDS data of {self.tfds_name} has no {split!r} split "
                f"(has {sorted(num_examples)}); re-prepare it with scripts/prepare_vtab.py"
            )
        return int(num_examples[split])

    def example_to_image_label(self, example: dict) -> tuple[np.ndarray, int]:
        """Decoded TFDS example (numpy) -> (uint8 HxWx3 image, label), VTAB's base preprocess."""
        image = np.asarray(example["image"])
        if self.mapping == "dsprites":
            image = np.tile(image, (1, 1, 3)) * np.uint8(255)
        elif self.mapping == "smallnorb":
            image = np.tile(image, (1, 1, 3))
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise VQTError(f"{self.name}: expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
        return image, self._label(example)

    def _label(self, example: dict) -> int:
        if self.mapping in ("plain", "smallnorb"):
            return int(example[self.label_key])
        if self.mapping == "dsprites":
            factor = np.float32(self.attr_classes / self.num_classes)
            return int(np.floor(np.float32(example[self.label_key]) / factor))
        objects = example["objects"]
        if self.mapping == "clevr_count":
            return len(objects["size"]) - 3
        if self.mapping == "clevr_distance":
            depth = np.min(np.asarray(objects["pixel_coords"], np.float32).reshape(-1, 3)[:, 2], initial=np.inf)
            return _bucket(depth, _CLEVR_DEPTH_THRESHOLDS, self.name)
        if self.mapping == "kitti_distance":
            types = np.asarray(objects["type"]).reshape(-1)
            z = np.asarray(objects["location"], np.float32).reshape(-1, 3)[:, 2]
            depth = np.min(np.append(z[types < _KITTI_VEHICLE_TYPES], np.float32(_KITTI_NO_VEHICLE_DEPTH)))
            return _bucket(depth, _KITTI_DEPTH_THRESHOLDS, self.name)
        raise VQTError(f"{self.name}: unknown label mapping {self.mapping!r}")


def _bucket(value: float, thresholds: np.ndarray, task: str) -> int:
    """Largest index i with thresholds[i] < value (VTAB's reduce_max(where(thrs - d < 0)))."""
    below = np.flatnonzero(thresholds < value)
    if below.size == 0 or not np.isfinite(value):
        raise VQTError(f"{task}: object distance {value} is outside the label thresholds {thresholds.tolist()}")
    return int(below[-1])


def _task(name: str, spec: str, classes: int, group: str, folder: str, demo: tuple[int, float | None, str, int],
          test_size: int, **kw) -> VTABTask:
    q, fraction, short, print_rank = demo
    return VTABTask(name=name, tfds_spec=spec, num_classes=classes, group=group, folder=folder, q=q, fraction=fraction,
                    short=short, print_rank=print_rank, test_size=test_size, **kw)


GROUPS = ("Natural", "Specialized", "Structured")
_N, _SP, _ST = GROUPS
_CLEVR = {"val_split": "train", "val_percent": 90, "test_split": "validation"}
_DSPRITES = {"val_split": "train", "val_percent": 80, "test_split": "train", "test_percent": 90, "mapping": "dsprites"}
_SMALLNORB = {"val_split": "test", "test_split": "test[50%:]", "mapping": "smallnorb"}

# The 19 tasks in run_demo_exp.sh order. Per task: DATA.NAME, TFDS spec, classes, group, folder of the
# image-folder copy, (Q, sparsity keep fraction or None, short label, rank in the collector's print
# order) of the paper's demo, and the test size at the TFDS versions VPT used.
TASKS: dict[str, VTABTask] = {t.name: t for t in (
    _task("vtab-caltech101", "caltech101:3.*.*", 102, _N, "caltech101", (1, 0.7, "caltech101", 0), 6084,
          val_split="train", val_percent=90),
    _task("vtab-dtd", "dtd:3.*.*", 47, _N, "dtd", (1, 0.7, "dtd", 1), 1880),
    _task("vtab-oxford_flowers102", "oxford_flowers102:2.*.*", 102, _N, "oxford_flowers102",
          (1, 0.7, "flowers102", 3), 6149),
    _task("vtab-oxford_iiit_pet", "oxford_iiit_pet:3.*.*", 37, _N, "oxford_iiit_pet", (1, 0.7, "pets", 4), 3669,
          val_split="train", val_percent=80, fallback_spec="oxford_iiit_pet:4.*.*"),
    _task("vtab-cifar(num_classes=100)", "cifar100:3.*.*", 100, _N, "cifar", (1, 0.7, "cifar100", 2), 10000,
          val_split="train", val_percent=90),
    _task("vtab-patch_camelyon", "patch_camelyon:2.*.*", 2, _SP, "patch_camelyon", (1, 0.7, "camelyon", 6), 32768),
    _task("vtab-resisc45", "resisc45:3.*.*", 45, _SP, "resisc45", (1, 0.7, "resisc45", 7), 6300,
          val_split="train", val_percent=60, test_split="train", test_percent=80),
    _task('vtab-diabetic_retinopathy(config="btgraham-300")', "diabetic_retinopathy_detection/btgraham-300:3.*.*",
          5, _SP, "diabetic_retinopathy", (1, 0.7, "retinopathy", 9), 42670),
    _task("vtab-eurosat", "eurosat/rgb:2.*.*", 10, _SP, "eurosat", (1, 0.7, "eurosat", 8), 5400,
          val_split="train", val_percent=60, test_split="train", test_percent=80),
    _task('vtab-clevr(task="count_all")', "clevr:3.*.*", 8, _ST, "clevr_count", (1, 0.7, "clevr-count", 12), 15000,
          mapping="clevr_count", **_CLEVR),
    _task('vtab-dsprites(predicted_attribute="label_orientation",num_classes=16)', "dsprites:2.*.*", 16, _ST,
          "dsprites_ori", (1, 0.7, "dsprites-ori", 13), 73728,
          label_key="label_orientation", attr_classes=40, **_DSPRITES),
    _task("vtab-sun397", "sun397/tfds:4.*.*", 397, _N, "sun397", (1, 0.7, "sun397", 18), 21750),
    _task('vtab-smallnorb(predicted_attribute="label_elevation")', "smallnorb:2.*.*", 9, _ST, "smallnorb_ele",
          (10, None, "smallnorb-ele", 16), 12150, label_key="label_elevation", **_SMALLNORB),
    _task('vtab-clevr(task="closest_object_distance")', "clevr:3.*.*", 6, _ST, "clevr_dist",
          (10, None, "clevr-dist", 11), 15000, mapping="clevr_distance", **_CLEVR),
    _task("vtab-svhn", "svhn_cropped:3.*.*", 10, _N, "svhn", (20, None, "svhn", 5), 26032,
          val_split="train", val_percent=90),
    _task("vtab-dmlab", "dmlab:2.0.1", 6, _ST, "dmlab", (20, None, "dmlab", 10), 22735),
    _task('vtab-dsprites(predicted_attribute="label_x_position",num_classes=16)', "dsprites:2.*.*", 16, _ST,
          "dsprites_loc", (20, None, "dsprites-loc", 14), 73728,
          label_key="label_x_position", attr_classes=32, **_DSPRITES),
    _task('vtab-smallnorb(predicted_attribute="label_azimuth")', "smallnorb:2.*.*", 18, _ST, "smallnorb_azi",
          (20, None, "smallnorb-azi", 15), 12150, label_key="label_azimuth", **_SMALLNORB),
    _task('vtab-kitti(task="closest_vehicle_distance")', "kitti:3.2.0", 4, _ST, "kitti",
          (20, None, "kitti", 17), 711, mapping="kitti_distance", fallback_spec="kitti:3.3.0"),
)}
PRINT_ORDER: tuple[str, ...] = tuple(sorted(TASKS, key=lambda name: TASKS[name].print_rank))


def select_tasks(names: Sequence[str] | None) -> list[VTABTask]:
    """The tasks named (all when None or empty), in table order; unknown names raise VQTError."""
    if not names:
        return list(TASKS.values())
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise VQTError(f"unknown task(s) {unknown} in --tasks; valid names: {', '.join(TASKS)}")
    return [t for t in TASKS.values() if t.name in set(names)]


def parse_name(name: str) -> tuple[str, dict]:
    """`vtab-f(k=v, ...)` -> ("f", {k: v}); the part after the last `vtab-` is a Python expression."""
    if "vtab-" not in name:
        raise VQTError(f"DATA.NAME {name!r} is not a VTAB task (it must start with 'vtab-')")
    expr = name.rsplit("vtab-", 1)[1]
    try:
        node = ast.parse(expr, mode="eval").body
        if isinstance(node, ast.Name):
            return node.id, {}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
            return node.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except (SyntaxError, ValueError):
        pass
    raise VQTError(f"DATA.NAME {name!r}: {expr!r} is not a name or a call with keyword literals, "
                   'e.g. clevr(task="count_all")')


def get_task(name: str) -> VTABTask:
    """The task of an exact DATA.NAME string; anything else raises VQTError."""
    if name in TASKS:
        return TASKS[name]
    valid = "\n  ".join(TASKS)
    try:
        parsed = parse_name(name)
        same = [t for t in TASKS if parse_name(t) == parsed]
        hint = (f" It names the same task as {same[0]!r}, but quotes/spaces differ: use that exact string."
                if same else "")
    except VQTError as e:
        hint = f" ({e})"
    close = difflib.get_close_matches(name, TASKS, n=1)
    if close and "quotes" not in hint:
        hint += f" Did you mean {close[0]!r}?"
    raise VQTError(f"unknown DATA.NAME {name!r}.{hint} Valid names (exact strings):\n  {valid}")


def main(argv: list[str] | None = None) -> int:
    """`python -m src.data.tasks --rows [NAME ...]`: one tab-separated line per task for run_demo_exp.sh."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m src.data.tasks", description=main.__doc__)
    p.add_argument("--rows", action="store_true", required=True,
                   help="print DATA.NAME, classes, Q and keep fraction (- for none) of each task, in table order")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these tasks (default: all 19)")
    args = p.parse_args(argv)
    try:
        rows = [f"{t.name}\t{t.num_classes}\t{t.q}\t{'-' if t.fraction is None else t.fraction}"
                for t in select_tasks(args.names)]
    except VQTError as err:
        p.exit(2, f"error: {err}\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
