"""Data layer: task registry, split expressions, label mappings, TF-exact preprocessing, and loading
genuine on-disk TFDS / image-folder data written by `src.data.synthetic` (no mocks)."""
from __future__ import annotations

import glob
import importlib.util
import os
import time

import numpy as np
import pytest
import torch

from src.configs.defaults import get_cfg
from src.data.loader import check_task_data, load_split, resolve_spec, stream_split
from src.data.preprocess import preprocess
from src.data.synthetic import write_fake_imagefolder, write_fake_tfds
from src.data.tasks import SPLITS, TASKS, get_task, parse_name
from src.errors import VQTError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLEVR_COUNT = 'vtab-clevr(task="count_all")'
CLEVR_DIST = 'vtab-clevr(task="closest_object_distance")'
KITTI = 'vtab-kitti(task="closest_vehicle_distance")'
DSPRITES_ORI = 'vtab-dsprites(predicted_attribute="label_orientation",num_classes=16)'
DSPRITES_LOC = 'vtab-dsprites(predicted_attribute="label_x_position",num_classes=16)'
SMALLNORB_ELE = 'vtab-smallnorb(predicted_attribute="label_elevation")'
SMALLNORB_AZI = 'vtab-smallnorb(predicted_attribute="label_azimuth")'
FAKE_TASKS = (CLEVR_COUNT, "vtab-eurosat", KITTI, DSPRITES_ORI)  # written once per module
READY = {CLEVR_COUNT, CLEVR_DIST, "vtab-eurosat", KITTI, DSPRITES_ORI, DSPRITES_LOC}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("vtab_data"))
    for name in FAKE_TASKS:
        write_fake_tfds(name, data_dir, learnable=name != DSPRITES_ORI)
    return data_dir


def _cfg(name: str, data_dir: str, source: str = "tfds"):
    cfg = get_cfg()
    cfg.DATA.NAME, cfg.DATA.DATAPATH, cfg.DATA.SOURCE = name, data_dir, source
    cfg.DATA.NUMBER_CLASSES = get_task(name).num_classes
    cfg.DATA.NUM_WORKERS = 2
    return cfg


# ---------------------------------------------------------------- names


def test_the_19_names_parse_in_demo_order():
    assert len(TASKS) == 19
    assert list(TASKS)[:3] == ["vtab-caltech101", "vtab-dtd", "vtab-oxford_flowers102"]
    assert list(TASKS)[-1] == KITTI
    assert parse_name(DSPRITES_ORI) == ("dsprites", {"predicted_attribute": "label_orientation", "num_classes": 16})
    assert parse_name("vtab-dmlab") == ("dmlab", {})
    for name, task in TASKS.items():
        assert get_task(name) is task and task.name == name
    assert {t.group for t in TASKS.values()} == {"Natural", "Specialized", "Structured"}
    assert len({t.folder for t in TASKS.values()}) == 19
    classes = [t.num_classes for t in TASKS.values()]
    assert classes == [102, 47, 102, 37, 100, 2, 45, 5, 10, 8, 16, 397, 9, 6, 10, 6, 16, 18, 4]


@pytest.mark.parametrize("name,hint", [
    ("vtab-clevr(task='count_all')", "quotes/spaces differ"),
    ('vtab-dsprites(predicted_attribute="label_orientation", num_classes=16)', "quotes/spaces differ"),
    ("vtab-caltech", "Did you mean 'vtab-caltech101'"),
    ("vtab-cifar", "Valid names"),
    ("cifar100", "must start with 'vtab-'"),
    ("vtab-clevr(", "Valid names"),
])
def test_bad_names_raise(name, hint):
    with pytest.raises(VQTError, match="DATA.NAME") as e:
        get_task(name)
    assert hint in str(e.value)


# ---------------------------------------------------------------- splits (VPT's TFDS versions)

VPT_SIZES = {  # TFDS split sizes of the versions VPT used
    "caltech101": {"train": 3060, "test": 6084}, "cifar100": {"train": 50000, "test": 10000},
    "oxford_iiit_pet": {"train": 3680, "test": 3669}, "svhn_cropped": {"train": 73257, "test": 26032},
    "eurosat/rgb": {"train": 27000}, "resisc45": {"train": 31500}, "dsprites": {"train": 737280},
    "clevr": {"train": 70000, "validation": 15000, "test": 15000}, "smallnorb": {"train": 24300, "test": 24300},
}
SEPARATE_VAL = ("vtab-dtd", "vtab-oxford_flowers102", "vtab-sun397", "vtab-patch_camelyon",
                'vtab-diabetic_retinopathy(config="btgraham-300")', "vtab-dmlab", KITTI)
EXPECTED_EXPR = {  # name -> (val200, test), as VPT splits them
    "vtab-caltech101": ("train[2754:2954]", "test"),
    "vtab-cifar(num_classes=100)": ("train[45000:45200]", "test"),
    "vtab-oxford_iiit_pet": ("train[2944:3144]", "test"),
    "vtab-svhn": ("train[65931:66131]", "test"),
    "vtab-eurosat": ("train[16200:16400]", "train[21600:]"),
    "vtab-resisc45": ("train[18900:19100]", "train[25200:]"),
    CLEVR_COUNT: ("train[63000:63200]", "validation"),
    CLEVR_DIST: ("train[63000:63200]", "validation"),
    DSPRITES_ORI: ("train[589824:590024]", "train[663552:]"),
    DSPRITES_LOC: ("train[589824:590024]", "train[663552:]"),
    SMALLNORB_ELE: ("test[:200]", "test[50%:]"),
    SMALLNORB_AZI: ("test[:200]", "test[50%:]"),
    **{name: ("validation[:200]", "test") for name in SEPARATE_VAL},
}


def test_test_sizes_cover_every_task():
    """The benchmark's test sizes: VPT's versions (387,904 test images over the 19 tasks)."""
    assert sum(t.test_size for t in TASKS.values()) == 387904
    assert TASKS["vtab-svhn"].test_size == VPT_SIZES["svhn_cropped"]["test"]


@pytest.mark.parametrize("name", list(TASKS))
def test_split_expressions_match_vpt(name):
    task = get_task(name)
    sizes = VPT_SIZES.get(task.tfds_name, {"train": 5000, "validation": 1000, "test": 2000})
    val, test = EXPECTED_EXPR[name]
    assert task.split_expr("train800", sizes) == "train[:800]"
    assert task.split_expr("val200", sizes) == val
    assert task.split_expr("train800val200", sizes) == f"train[:800]+{val}"
    assert task.split_expr("test", sizes) == test
    with pytest.raises(VQTError, match="unknown split"):
        task.split_expr("train", sizes)


def test_tfds_specs():
    specs = {t.folder: t.tfds_spec for t in TASKS.values()}
    assert specs["kitti"] == "kitti:3.2.0" and specs["dmlab"] == "dmlab:2.0.1"
    assert specs["eurosat"] == "eurosat/rgb:2.*.*" and specs["cifar"] == "cifar100:3.*.*"
    assert specs["sun397"] == "sun397/tfds:4.*.*" and specs["oxford_iiit_pet"] == "oxford_iiit_pet:3.*.*"


# ---------------------------------------------------------------- label mappings


def _img(c: int = 3, value: int = 7, hw: tuple[int, int] = (5, 4)) -> np.ndarray:
    return np.full((*hw, c), value, np.uint8)


def _objects(depths):
    return {"size": np.zeros(len(depths), np.int64),
            "pixel_coords": np.array([[10.0, 20.0, d] for d in depths], np.float32).reshape(-1, 3)}


@pytest.mark.parametrize("depths,count,dist", [
    ([9.2, 12.0, 30.0], 0, 3), ([8.0] * 5, 2, 0), ([8.01] * 10, 7, 1), ([10.0, 11.0, 50.0, 60.0], 1, 4),
    ([50.0, 99.0, 10.5], 0, 5), ([8.75, 9.5, 9.9], 0, 2),
])
def test_clevr_labels(depths, count, dist):
    example = {"image": _img(), "objects": _objects(depths)}
    image, label = get_task(CLEVR_COUNT).example_to_image_label(example)
    assert label == count and image.shape == (5, 4, 3)
    assert get_task(CLEVR_DIST).example_to_image_label(example)[1] == dist


@pytest.mark.parametrize("types,z,label", [
    ([0, 4], [15.0, 3.0], 1), ([4, 5, 7], [1.0, 2.0, 3.0], 3), ([1], [8.0], 0), ([2, 0], [25.0, 30.0], 2),
    ([3, 1, 6], [2.0, 8.5, 1.0], 1), ([], [], 3), ([0], [999.0], 2),
])
def test_kitti_labels(types, z, label):
    location = np.array([[1.0, 2.0, v] for v in z], np.float32).reshape(-1, 3)
    example = {"image": _img(), "objects": {"type": np.array(types, np.int64), "location": location}}
    assert get_task(KITTI).example_to_image_label(example)[1] == label


def test_dsprites_labels_and_image():
    binary = np.zeros((64, 64, 1), np.uint8)
    binary[10:20, 5:9] = 1
    for attr, ori in [(0, 0), (2, 0), (3, 1), (4, 1), (5, 2), (37, 14), (38, 15), (39, 15)]:
        image, label = get_task(DSPRITES_ORI).example_to_image_label({"image": binary, "label_orientation": attr})
        assert label == ori
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert set(np.unique(image)) == {0, 255} and (image[15, 6] == 255).all() and (image[0, 0] == 0).all()
    for attr, loc in [(0, 0), (1, 0), (2, 1), (31, 15)]:
        assert get_task(DSPRITES_LOC).example_to_image_label({"image": binary, "label_x_position": attr})[1] == loc


def test_smallnorb_and_plain_labels():
    gray = np.arange(96 * 96, dtype=np.uint8).reshape(96, 96, 1)
    example = {"image": gray, "label_elevation": 8, "label_azimuth": 17}
    image, label = get_task(SMALLNORB_ELE).example_to_image_label(example)
    assert label == 8 and image.shape == (96, 96, 3) and (image == gray).all()
    assert get_task(SMALLNORB_AZI).example_to_image_label(example)[1] == 17
    assert get_task("vtab-dtd").example_to_image_label({"image": _img(), "label": 46})[1] == 46
    with pytest.raises(VQTError, match="HxWx3"):
        get_task("vtab-dtd").example_to_image_label({"image": _img(c=1), "label": 1})


# ---------------------------------------------------------------- preprocessing


def test_preprocess_matches_tf_legacy_bilinear():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    shapes = [(32, 32), (300, 200), (50, 80), (224, 224), (7, 301), (50, 80)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    for size in (224, 33):
        ref = np.stack([tf.compat.v1.image.resize(img, [size, size]).numpy() / 255.0 for img in images])
        ref = ref.transpose(0, 3, 1, 2)
        out = preprocess(images, size)
        assert out.dtype == torch.float32 and out.shape == (len(images), 3, size, size)
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-5, rtol=0)
    batch = np.stack(images[:1] * 2)
    np.testing.assert_allclose(preprocess(batch, 33).numpy(), preprocess(images[:1], 33).numpy().repeat(2, 0))
    with pytest.raises(VQTError, match="uint8"):
        preprocess([images[0].astype(np.float32)], 33)


# ---------------------------------------------------------------- TFDS source


@pytest.mark.parametrize("name", [CLEVR_COUNT, CLEVR_DIST, "vtab-eurosat", KITTI, DSPRITES_LOC])
def test_load_split_from_tfds(tfds_dir, name):
    cfg = _cfg(name, tfds_dir)
    train, val, trainval = (load_split(cfg, s) for s in ("train800", "val200", "train800val200"))
    assert (len(train), len(val), len(trainval)) == (800, 200, 1000)
    assert trainval.labels.dtype == np.int64 and trainval.labels.shape == (1000,)
    for a, b in zip(train.images + val.images, trainval.images):
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.concatenate([train.labels, val.labels]), trainval.labels)
    counts = np.bincount(trainval.labels, minlength=get_task(name).num_classes)
    assert (counts > 0).all(), counts  # every class occurs


def test_learnable_images_encode_the_label(tfds_dir):
    data = load_split(_cfg("vtab-eurosat", tfds_dir), "train800")  # fixed 64x64 images
    by_label = {}
    for image, label in zip(data.images, data.labels):
        by_label.setdefault(int(label), image)
        np.testing.assert_array_equal(by_label[int(label)], image)
    assert len({img.tobytes() for img in by_label.values()}) == len(by_label)


def test_stream_split_test(tfds_dir):
    n, batches = stream_split(_cfg("vtab-eurosat", tfds_dir), "test", batch_size=64)
    assert n == 280  # train[1120:] of the 1400 fake examples
    sizes = [len(labels) for images, labels in batches]
    assert sum(sizes) == n and sizes[:-1] == [64] * (len(sizes) - 1)
    n, batches = stream_split(_cfg(CLEVR_COUNT, tfds_dir), "test", batch_size=32)
    images, labels = next(batches)
    assert n == 100 and len(images) == 32 and labels.dtype == np.int64 and images[0].dtype == np.uint8


def test_missing_data_fails_fast(tmp_path):
    cfg = _cfg("vtab-svhn", str(tmp_path))
    start = time.time()
    with pytest.raises(VQTError, match="prepare_vtab.py") as e:
        load_split(cfg, "train800")
    assert time.time() - start < 2
    assert str(tmp_path) in str(e.value) and "svhn_cropped" in str(e.value) and "--tasks vtab-svhn" in str(e.value)
    cfg.DATA.DATAPATH = ""
    with pytest.raises(VQTError, match="DATA.DATAPATH"):
        stream_split(cfg, "test", 8)


def test_unknown_split_is_named(tfds_dir):
    with pytest.raises(VQTError, match="unknown split"):
        load_split(_cfg(CLEVR_COUNT, tfds_dir), "train")


def test_too_small_dataset_is_reported(tmp_path):
    write_fake_tfds("vtab-caltech101", str(tmp_path), sizes={"train": 1000, "test": 5})
    cfg = _cfg("vtab-caltech101", str(tmp_path))
    assert len(load_split(cfg, "train800")) == 800
    with pytest.raises(VQTError, match=r"'train\[900:1100\]' is not available"):  # T = 90% of 1000
        load_split(cfg, "val200")
    write_fake_tfds("vtab-dtd", str(tmp_path), sizes={"train": 700, "validation": 200, "test": 5})
    with pytest.raises(VQTError, match=r"'train\[:800\]' is not available.*prepare_vtab.py"):
        load_split(_cfg("vtab-dtd", str(tmp_path)), "train800")


@pytest.fixture(scope="module")
def corrupt_dtd(tmp_path_factory) -> str:
    """A data_dir whose vtab-dtd test shard has 16 zeroed bytes in its middle."""
    data_dir = str(tmp_path_factory.mktemp("corrupt"))
    (shard,) = glob.glob(os.path.join(write_fake_tfds("vtab-dtd", data_dir), "dtd-test.tfrecord-*"))
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        f.write(bytes(16))
    return data_dir


def test_check_task_data_reads_every_split(tfds_dir, tmp_path):
    assert check_task_data(_cfg("vtab-eurosat", tfds_dir)) == {"train800": 800, "val200": 200, "test": 280}
    folder = write_fake_imagefolder("vtab-dtd", str(tmp_path), {"train800": 4, "val200": 3, "test": 2})
    cfg = _cfg("vtab-dtd", str(tmp_path), source="imagefolder")
    assert check_task_data(cfg) == {"train800": 4, "val200": 3, "test": 2}
    os.remove(os.path.join(folder, "images", "test", "00001.png"))
    with pytest.raises(VQTError, match=r"00001.png, listed in .*test.txt, does not exist"):
        check_task_data(cfg)


def test_corrupt_record_is_one_clear_error(corrupt_dtd):
    cfg = _cfg("vtab-dtd", corrupt_dtd)
    with pytest.raises(VQTError) as e:
        check_task_data(cfg)
    msg = str(e.value)
    assert msg.startswith(f"vtab-dtd: split test of TFDS dtd/3.0.1 in '{corrupt_dtd}' cannot be read (DataLossError: "
                          "corrupted record at ")
    assert msg.endswith(f"re-prepare it with: python scripts/prepare_vtab.py --data-dir {corrupt_dtd} --tasks vtab-dtd")
    assert "\n" not in msg and "{{" not in msg
    assert len(load_split(cfg, "val200")) == 200
    for read in (lambda: load_split(cfg, "test"), lambda: list(stream_split(cfg, "test", 16)[1])):
        with pytest.raises(VQTError, match="^vtab-dtd: split test of TFDS dtd/3.0.1 .* cannot be read"):
            read()


def test_old_pet_version_is_preferred(tmp_path):
    task = get_task("vtab-oxford_iiit_pet")
    with pytest.raises(VQTError, match="oxford_iiit_pet:3.*.* or oxford_iiit_pet:4"):
        resolve_spec(task, str(tmp_path))
    write_fake_tfds(task.name, str(tmp_path), sizes={"train": 1000, "test": 4}, version="3.2.0")
    assert resolve_spec(task, str(tmp_path)) == "oxford_iiit_pet:3.*.*"
    assert len(load_split(_cfg(task.name, str(tmp_path)), "val200")) == 200


# ---------------------------------------------------------------- image-folder source


def test_imagefolder_round_trip(tmp_path):
    folder = write_fake_imagefolder("vtab-dtd", str(tmp_path), {"train800": 12, "val200": 5, "test": 7})
    assert folder == os.path.join(str(tmp_path), "dtd")
    cfg = _cfg("vtab-dtd", str(tmp_path), source="imagefolder")
    train, val, trainval = (load_split(cfg, s) for s in ("train800", "val200", "train800val200"))
    assert (len(train), len(val), len(trainval)) == (12, 5, 17)
    np.testing.assert_array_equal(np.concatenate([train.labels, val.labels]), trainval.labels)
    assert all(a.dtype == np.uint8 and a.shape[2] == 3 and (a == b).all()
               for a, b in zip(train.images, trainval.images))
    with open(os.path.join(folder, "train800.txt")) as f:
        assert [int(line.split()[1]) for line in f] == train.labels.tolist()
    n, batches = stream_split(cfg, "test", 3)
    assert n == 7 and [len(labels) for _, labels in batches] == [3, 3, 1]
    os.remove(os.path.join(folder, "images", "test", "00002.png"))
    with pytest.raises(VQTError, match="00002.png"):
        load_split(cfg, "test")
    os.remove(os.path.join(folder, "val200.txt"))
    with pytest.raises(VQTError, match="val200.txt"):
        load_split(cfg, "val200")


# ---------------------------------------------------------------- scripts/prepare_vtab.py


def _prepare_script():
    spec = importlib.util.spec_from_file_location("prepare_vtab", os.path.join(ROOT, "scripts", "prepare_vtab.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_check(tfds_dir, capsys):
    script = _prepare_script()
    assert script.main(["--data-dir", tfds_dir, "--check"]) == 1
    rows = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("vtab-")}
    assert set(rows) == set(TASKS)
    for name, status in rows.items():
        assert status == ("OK" if name in READY else "MISSING"), name
    assert script.main(["--data-dir", tfds_dir, "--check", "--tasks", "vtab-eurosat", KITTI]) == 0


def test_prepare_check_deep_reads_every_record(corrupt_dtd, capsys):
    script = _prepare_script()
    assert script.main(["--data-dir", corrupt_dtd, "--check", "--tasks", "vtab-dtd"]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("OK")
    assert script.main(["--data-dir", corrupt_dtd, "--check", "--deep", "--tasks", "vtab-dtd"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("CORRUPT") and lines[2].strip().startswith("vtab-dtd: split test of TFDS dtd/3.0.1")
    assert lines[-1] == f"0/1 tasks OK in {corrupt_dtd}"


def test_check_names_the_versions_prepare_builds(tmp_path, capsys):
    pet = get_task("vtab-oxford_iiit_pet")
    assert pet.prepare_spec == "oxford_iiit_pet:4.*.*" and get_task(KITTI).prepare_spec == "kitti:3.3.0"
    assert _prepare_script().main(["--data-dir", str(tmp_path), "--check", "--tasks", pet.name, KITTI]) == 1
    rows = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("vtab-")]
    assert rows == ["oxford_iiit_pet:4.*.*", "kitti:3.3.0"]


def test_prepare_manual_dataset_prints_instructions(tmp_path, capsys):
    assert _prepare_script().main(["--data-dir", str(tmp_path), "--tasks", "vtab-resisc45"]) == 1
    out = capsys.readouterr().out
    assert "NWPU-RESISC45" in out and os.path.join(str(tmp_path), "downloads", "manual") in out
    assert _prepare_script().main(["--data-dir", str(tmp_path), "--tasks", "vtab-nope"]) == 2


def test_splits_constant():
    assert SPLITS == ("train800", "val200", "train800val200", "test")
