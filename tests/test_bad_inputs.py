"""Bad input through the public entry points (train.py, predict.py, scripts/export.py): exit code 2, one
`error:` line naming what to fix, and nothing created where the user did not ask for it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_folder import ROOT, write_folder_dataset

import predict
import train
from scripts import export as export_script
from src.configs.vit_configs import VIT_DEMO
from src.models.checkpoints import write_random_npz
from src.utils.layout import Layout


def listing(root: Path) -> set[str]:
    """Every file and folder under `root` (relative paths)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def one_error(capsys, code: int, pattern: str) -> str:
    """The single `error:` line of a CLI call that exited 2 (its last stderr line; progress bars may come
    before it, a traceback may not); it must match `pattern`."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and [x for x in lines if "error" in x.lower()] == lines[-1:], err
    assert lines[-1].startswith("error: ") and "Traceback" not in err
    assert re.search(pattern, lines[-1]), lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder dataset `pets` and a random tiny zoo ViT `demo.npz`."""
    root = tmp_path_factory.mktemp("inputs")
    write_folder_dataset(root / "pets", {"train": 4, "test": 2})
    write_random_npz(str(root / "demo.npz"), VIT_DEMO, img_size=32)
    return root


def train_args(inputs: Path, *opts: str) -> list[str]:
    """train.py arguments of a tiny run (given lr/wd: no search) on `inputs`, then `opts`."""
    return ["--config-file", os.path.join(ROOT, "configs/h2t-prompt/vtab.yaml"), "--lr", "0.1", "--wd", "0.0001",
            "DATA.SOURCE", "folder", "DATA.DATAPATH", str(inputs / "pets"), "DATA.FEATURE", "demo_vit_tiny",
            "MODEL.WEIGHT_PATH", str(inputs / "demo.npz"), "DATA.CROPSIZE", "32", "MODEL.H2T.NUM_QUERY_TOKENS", "2",
            "SOLVER.TOTAL_EPOCH", "2", "SOLVER.WARMUP_EPOCH", "1", "DATA.BATCH_SIZE", "8", *opts]


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty working directory (the current one during the test)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("text, pattern", [
    ("DATA:\n  NAME: [pets\n", r"configs?.yaml is not valid YAML at line 3"),
    ("DATA:\n\tNAME: pets\n", r"not valid YAML at line 2, column 1 \(found character '\\t'.*not tabs"),
    ("- DATA.NAME\n- pets\n", r"holds a list at the top level: write KEY: VALUE"),
    ("DATA: 3\n", r"DATA must be a group of keys"),
    ("DATA:\n  BATCH_SIZE: [8]\n", r"DATA.BATCH_SIZE must be of type int"),
])
def test_bad_yaml(work, capsys, text, pattern):
    (work / "config.yaml").write_text(text)
    before = listing(work)
    one_error(capsys, train.main(["--config-file", "config.yaml"]), pattern)
    assert listing(work) == before


@pytest.mark.parametrize("opts, pattern", [
    (("DATA.SOURCE", "Folder"), r"DATA.SOURCE 'Folder' is not one of 'tfds', 'imagefolder', 'folder'"),
    (("DATA.NAME", "../escape"), r"DATA.NAME '\.\./escape' must be one folder name"),
    (("DATA.NAME", "/tmp/abs"), r"DATA.NAME '/tmp/abs' must be one folder name"),
    (("OUTPUT_DIR", ""), r"OUTPUT_DIR is empty"),
    (("OUTPUT_DIR", "a_file/out"), r"OUTPUT_DIR a_file/out: .*a_file is a file, not a folder"),
    (("MODEL.TIMM_NAME", "swin_tiny_patch4_window7_224.ms_in1k", "DATA.FEATURE", "sup_vitb16_224"),
     r"MODEL.TIMM_NAME swin.*SwinTransformer"),
    (("MODEL.WEIGHT_PATH", "nowhere.npz"), r"checkpoint nowhere.npz not found"),
])
def test_bad_settings_create_nothing(inputs, work, capsys, opts, pattern):
    (work / "a_file").write_text("")
    before = listing(work)
    one_error(capsys, train.main(train_args(inputs, *opts)), pattern)
    assert listing(work) == before


def test_default_output_dir_is_named_and_said_first(inputs, work, capsys):
    assert train.main(train_args(inputs)) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"results go to {work}/output/vqt_final (OUTPUT_DIR output/vqt)" in first
    assert sorted(os.listdir(work)) == ["output"] and sorted(os.listdir(work / "output")) == ["vqt_final"]


def test_full_disk_while_logging(inputs, work, capsys):
    log = Path(Layout("out", "pets", "demo_vit_tiny", 8).task_log("final"))
    log.parent.mkdir(parents=True)
    log.symlink_to("/dev/full")
    one_error(capsys, train.main(train_args(inputs, "OUTPUT_DIR", "out")),
              r"cannot write the log .*logs.txt: No space left on device; free space")


@pytest.fixture(scope="module")
def run_dir(inputs, tmp_path_factory) -> Path:
    """A finished final run folder (last_model.pth, config.yaml, classes.json above it)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    assert train.main(train_args(inputs, "OUTPUT_DIR", str(out))) == 0
    return Path(Layout(str(out), "pets", "demo_vit_tiny", 8).run("final", 0.1, 0.0001, 1).path)


@pytest.mark.parametrize("damage, pattern", [
    ("empty", r"run1 is broken \(last_model.pth differs from what DONE recorded \(0 bytes"),
    ("truncated", r"run1 is broken \(last_model.pth differs from what DONE recorded \(200 bytes"),
    ("config", r"config file .*config.yaml is not valid YAML"),
])
def test_damaged_run_folder(run_dir, inputs, tmp_path, capsys, damage, pattern):
    run = tmp_path / "final" / "lr" / "run1"
    shutil.copytree(run_dir, run)
    shutil.copy(run_dir.parent.parent / "classes.json", run.parent.parent)
    ckpt = run / "last_model.pth"
    if damage == "config":
        (run / "config.yaml").write_text("DATA:\n  NAME: [pets\n")
    else:
        ckpt.write_bytes(b"" if damage == "empty" else ckpt.read_bytes()[:200])
    one_error(capsys, predict.main([str(run), str(inputs / "pets" / "test")]), pattern)
    one_error(capsys, export_script.main([str(run), "--out", str(tmp_path / "m.pt")]), pattern)
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("out, pattern", [
    ("a_file/preds.csv", r"--out a_file/preds.csv: .*a_file is a file, not a folder"),
    ("folder", r"--out folder is a folder: give a file name"),
])
def test_out_checked_before_any_work(run_dir, inputs, work, capsys, out, pattern):
    (work / "a_file").write_text("")
    (work / "folder").mkdir()
    before = listing(work)
    one_error(capsys, predict.main([str(run_dir), str(inputs / "pets" / "test"), "--out", out]), pattern)
    one_error(capsys, export_script.main([str(run_dir), "--out", out]), pattern)
    assert listing(work) == before


def test_predict_into_a_closed_pipe_ends_quietly(run_dir, inputs):
    p = subprocess.Popen([sys.executable, "predict.py", str(run_dir), str(inputs / "pets" / "test"), "--device", "cpu"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # as `| head` does once it has its lines
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and err == ""


def test_too_many_query_tokens_refused_before_training(inputs, work, capsys):
    """Q = 10^8 on a tiny ViT: over a TB for the head and the query path, refused with the figures and
    the knobs before any run folder exists."""
    code = train.main(train_args(inputs, "OUTPUT_DIR", "out", "MODEL.H2T.NUM_QUERY_TOKENS", "100000000"))
    line = one_error(capsys, code, r"training 5 run\(s\) at once needs at least \d+\.\d GiB \(trained tensors .*query "
                                   r"path .*\) but .*: lower MODEL.H2T.NUM_QUERY_TOKENS \(now 100000000\) "
                                   r"or DATA.BATCH_SIZE")
    assert float(line.split("needs at least ")[1].split(" GiB")[0]) > 1024
    assert not [p for p in listing(work) if p.endswith("run1")]
