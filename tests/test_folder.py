"""Your own image folders (DATA.SOURCE folder) through the whole protocol, then predict.py and
scripts/export.py on the trained runs: predictions equal the logits the final runs saved."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train
from scripts import export as export_script
from src.configs.defaults import get_cfg
from src.configs.vit_configs import VIT_DEMO
from src.data.folder import VAL_FRACTION, folder_summary, read_classes, read_image, read_images, scan
from src.data.loader import check_task_data, load_split
from src.data.preprocess import preprocess
from src.errors import VQTError
from src.models.checkpoints import write_random_npz
from src.models.inference import FORMAT, load_model
from src.utils.layout import Layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["cat", "dog", "zebra"]


def write_folder_dataset(root, per_class: dict[str, int], seed: int = 0) -> None:
    """root/<part>/<class>/*: class-coloured images of mixed sizes, formats and modes (PNG RGB, JPEG, PNG L)."""
    rng = np.random.default_rng(seed)
    for part, n in per_class.items():
        for c, name in enumerate(CLASSES):
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(20, 60, 2)
                img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
                img[..., c] += 150
                kind = i % 3
                if kind == 2:
                    Image.fromarray(img[..., c]).save(folder / f"{i}.png")
                else:
                    Image.fromarray(img).save(folder / f"{i}.{'png' if kind == 0 else 'jpg'}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder dataset (no val/: a stratified slice), a random tiny zoo ViT and one protocol run."""
    root = tmp_path_factory.mktemp("folder")
    write_folder_dataset(root / "pets", {"train": 10, "test": 4})
    (root / "pets" / "train" / "cat" / "notes.txt").write_text("not an image")
    write_random_npz(str(root / "demo.npz"), VIT_DEMO, img_size=32)
    out = str(root / "out")
    args = ["--config-file", os.path.join(ROOT, "configs/h2t-prompt/vtab.yaml"), "--optimizer", "adam",
            "--lr", "0.1", "--wd", "0.0001", "DATA.SOURCE", "folder", "DATA.DATAPATH", str(root / "pets"),
            "DATA.FEATURE", "demo_vit_tiny", "MODEL.WEIGHT_PATH", str(root / "demo.npz"), "DATA.CROPSIZE", "32",
            "OUTPUT_DIR", out, "MODEL.H2T.NUM_QUERY_TOKENS", "2", "SOLVER.TOTAL_EPOCH", "3",
            "SOLVER.WARMUP_EPOCH", "1", "DATA.BATCH_SIZE", "8"]
    assert train.main(args) == 0
    final = Layout(out, "pets", "demo_vit_tiny", 8).task_dir("final")
    runs = sorted(os.path.join(d) for d, _, files in os.walk(final) if "DONE" in files)
    assert len(runs) == 5
    return root, runs


def _cfg(path, **over):
    cfg = get_cfg()
    cfg.DATA.SOURCE, cfg.DATA.DATAPATH, cfg.DATA.CROPSIZE, cfg.DATA.INTERPOLATION = "folder", str(path), 32, "bilinear"
    for k, v in over.items():
        setattr(cfg.DATA, k, v)
    return cfg


def test_scan_classes_stratified_val_and_skipped_files(trained):
    root, _ = trained
    data = scan(str(root / "pets"))
    assert data.classes == CLASSES and data.val_from_train
    labels = [y for _, y in data.files["val"]]
    assert labels.count(0) == round(VAL_FRACTION * 10) == 2 and len(labels) == 6
    assert not set(data.files["val"]) & set(data.files["train"]) and len(data.files["test"]) == 12
    assert [os.path.basename(p) for p in data.skipped] == ["notes.txt"]
    counts = check_task_data(_cfg(root / "pets"))
    assert counts == {"train800": 24, "val200": 6, "test": 12}
    train_set = load_split(_cfg(root / "pets"), "train800")
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in train_set.images)


def test_run_saves_classes_and_infers_class_count(trained):
    _, runs = trained
    assert read_classes(runs[0]) == CLASSES
    with open(os.path.join(runs[0], "config.yaml")) as f:
        assert "NUMBER_CLASSES: 3" in f.read()


def test_predictions_equal_saved_test_logits(trained):
    root, runs = trained
    paths = [p for p, _ in scan(str(root / "pets")).files["test"]]
    for run in runs[:2]:
        loaded = load_model(run)
        saved = torch.load(os.path.join(run, "test_pets_logits.pth"), weights_only=True)["joint_logits"]
        x = preprocess(list(read_images(paths, 32, loaded.image.interpolation, 1)), 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(x), saved, rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded.predict(paths, batch_size=5), saved.softmax(dim=1), rtol=0, atol=1e-5)


def test_export_load_predict_round_trip(trained, tmp_path, capsys):
    root, runs = trained
    out = tmp_path / "model.pt"
    assert export_script.main([runs[0], "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: 3 classes, backbone demo_vit_tiny")
    export = torch.load(out, weights_only=True)
    assert export["format"] == FORMAT and export["classes"] == CLASSES
    assert export["backbone"]["feature"] == "demo_vit_tiny" and os.path.isabs(export["backbone"]["weights"])
    assert export["image"]["size"] == 32
    test_dir = str(root / "pets" / "test")
    paths = [p for p, _ in scan(str(root / "pets")).files["test"]]
    torch.testing.assert_close(load_model(str(out)).predict(paths), load_model(runs[0]).predict(paths), rtol=0, atol=0)
    csv_file = tmp_path / "preds.csv"
    assert predict.main([str(out), test_dir, "--topk", "2", "--out", str(csv_file), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(paths[0]) and len(printed) == len(paths) + 1
    with open(csv_file) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class1", "prob1", "class2", "prob2"] and len(rows) == 1 + len(paths)
    assert {r[1] for r in rows[1:]} <= set(CLASSES)
    probs = load_model(str(out)).predict(paths)
    assert rows[1][1] == CLASSES[probs[0].argmax()] and abs(float(rows[1][2]) - probs[0].max().item()) < 1e-4


def test_relative_weights_found_from_the_run_parents(trained, tmp_path, monkeypatch):
    root, runs = trained
    cfg_file = os.path.join(runs[0], "config.yaml")
    text = Path(cfg_file).read_text()
    rel = tmp_path / "copy"
    shutil.copytree(os.path.dirname(os.path.dirname(runs[0])), rel / "final")
    shutil.copy(root / "demo.npz", rel / "demo.npz")
    run = str(rel / "final" / os.path.basename(os.path.dirname(runs[0])) / "run1")
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(text.replace(str(root / "demo.npz"), "demo.npz"))
    monkeypatch.chdir(tmp_path)
    assert load_model(run).classes == CLASSES
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(text.replace(str(root / "demo.npz"), "nowhere.npz"))
    with pytest.raises(VQTError, match="MODEL.WEIGHT_PATH 'nowhere.npz' .* --weights"):
        load_model(run)


@pytest.mark.parametrize("problem, message", [
    ("empty_class", "class folder .*/train/dog has no images Pillow can read"),
    ("extra_test_class", "differ from those of .*only in test: \\['yak'\\]"),
    ("no_test", "has no test/ folder"),
    ("classes", "DATA.NUMBER_CLASSES is 5 but .* has 3 class folders"),
])
def test_bad_folders_one_line(tmp_path, problem, message):
    root = tmp_path / "data"
    write_folder_dataset(root, {"train": 3, "val": 1, "test": 1})
    if problem == "empty_class":
        for f in (root / "train" / "dog").iterdir():
            f.unlink()
    elif problem == "extra_test_class":
        shutil.copytree(root / "test" / "cat", root / "test" / "yak")
    elif problem == "no_test":
        shutil.rmtree(root / "test")
    scan.cache_clear()
    with pytest.raises(VQTError, match=message) as err:
        check_task_data(_cfg(root, NUMBER_CLASSES=5 if problem == "classes" else -1))
    assert "\n" not in str(err.value)


def test_undecodable_image_names_the_file(tmp_path):
    root = tmp_path / "data"
    write_folder_dataset(root, {"train": 3, "val": 1, "test": 1})
    bad = root / "train" / "cat" / "0.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a PNG header, truncated data
    scan.cache_clear()
    with pytest.raises(VQTError, match="cannot decode image .*0.png"):
        load_split(_cfg(root), "train800")


def test_val_folder_used_when_present(tmp_path):
    root = tmp_path / "data"
    write_folder_dataset(root, {"train": 3, "val": 2, "test": 1})
    scan.cache_clear()
    data = scan(str(root))
    assert not data.val_from_train and len(data.files["val"]) == 6 and len(data.files["train"]) == 9
    assert json.loads(json.dumps(data.classes)) == CLASSES


def _exif_rotated_png(path, pixels: np.ndarray) -> None:
    """`pixels` stored with EXIF orientation 6 (a camera held upright: view rotated 90° clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif)


def test_16bit_and_exif_images_decode_alike_in_training_and_prediction(tmp_path):
    root = tmp_path / "data"
    write_folder_dataset(root, {"train": 3, "val": 1, "test": 1})
    level = (np.arange(32 * 32).reshape(32, 32) * 7 % 256).astype(np.uint8)
    Image.fromarray(np.minimum(level.astype(np.uint32) * 257 + 100, 65535).astype(np.uint16)).save(
        root / "train" / "cat" / "deep.png")  # I;16
    stored = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    _exif_rotated_png(root / "train" / "dog" / "phone.png", stored)
    upright = np.rot90(stored, k=-1)
    assert Image.open(root / "train" / "cat" / "deep.png").mode == "I;16"
    scan.cache_clear()
    paths = [p for p, _ in scan(str(root)).files["train"]]
    train_set = load_split(_cfg(root), "train800")
    deep, phone = (paths.index(str(root / "train" / c / n)) for c, n in (("cat", "deep.png"), ("dog", "phone.png")))
    np.testing.assert_array_equal(train_set.images[deep], np.stack([level] * 3, axis=-1))
    np.testing.assert_array_equal(train_set.images[phone], upright)
    predicted = list(read_images([paths[deep], paths[phone]], 32, "bicubic", 1))
    np.testing.assert_array_equal(predicted[0], train_set.images[deep])
    np.testing.assert_array_equal(predicted[1], upright)


def test_exif_orientation_of_a_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # view rotated 90° counter-clockwise
    pixels = np.zeros((16, 48, 3), np.uint8)
    pixels[:, :16] = 255  # white on the left of the stored image: at the bottom when upright
    Image.fromarray(pixels).save(tmp_path / "p.jpg", exif=exif, quality=95)
    upright = read_image(str(tmp_path / "p.jpg"))
    assert upright.shape == (48, 16, 3)
    assert upright[-16:].mean() > 240 and upright[:32].mean() < 15


def test_predict_takes_one_path_a_list_or_pillow_images(trained):
    root, runs = trained
    paths = [p for p, _ in scan(str(root / "pets")).files["test"]][:3]
    loaded = load_model(runs[0])
    many = loaded.predict(paths)
    assert many.shape == (3, len(CLASSES))
    torch.testing.assert_close(loaded.predict(paths[1]), many[1:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.predict(Path(paths[1])), many[1:2], rtol=0, atol=1e-6)
    with Image.open(paths[2]) as img:
        torch.testing.assert_close(loaded.predict([img]), many[2:], rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.predict(img), many[2:], rtol=0, atol=1e-6)


def test_one_file_rule_for_training_and_predict(tmp_path):
    """Images in subfolders of a class folder count (training and predict.py alike); .DS_Store and other
    files Pillow cannot read are skipped and counted; hidden folders are not entered."""
    root = tmp_path / "data"
    write_folder_dataset(root, {"train": 3, "val": 1, "test": 1})
    cat = root / "train" / "cat"
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cat / "2019").mkdir()
    shutil.copy(cat / "0.png", cat / "2019" / "nested.png")
    (cat / ".thumbnails").mkdir()
    shutil.copy(cat / "0.png", cat / ".thumbnails" / "hidden.png")
    scan.cache_clear()
    data = scan(str(root))
    cat_files = sorted(p for p, y in data.files["train"] if y == 0)
    assert [os.path.relpath(p, cat) for p in cat_files] == ["0.png", "1.jpg", "2.png", "2019/nested.png"]
    assert [os.path.basename(p) for p in data.skipped] == [".DS_Store"]
    assert "skipped 1 files Pillow cannot read" in folder_summary(data, str(root))
    assert predict.image_files([str(cat)]) == (cat_files, data.skipped)
