"""The README's one-task examples, run offline on demo assets (tiny ViT, synthetic data, 2 epochs)."""
from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_folder import CLASSES, write_folder_dataset

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TINY = "DATA.CROPSIZE 32 SOLVER.TOTAL_EPOCH 2 SOLVER.WARMUP_EPOCH 1"


def _readme_line(start: str) -> str:
    """The README line that starts with `start`, without a trailing `\\` continuation."""
    [line] = [ln.strip() for ln in README.splitlines() if ln.strip().startswith(start)]
    return line.removesuffix("\\").strip()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo assets for the README's example task, and the launchers' environment pointing at them."""
    root = tmp_path_factory.mktemp("readme")
    example = shlex.split(_readme_line("# e.g. bash scripts/VQT/run_vqt_vtab.sh").removeprefix("# e.g."))
    subprocess.run([sys.executable, "scripts/make_demo_assets.py", "--dest", str(root), "--tasks", example[3]],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    env = os.environ | {"PYTHON": sys.executable, "MODEL_ROOT": str(root / "pre-trained_weights"),
                        "DATA_PATH": str(root / "vtab_data"), "EXP_ROOT": str(root / "exp"), "VQT_EXTRA_OPTS": TINY}
    return root, env, example[:-1] + ["demo_vit_tiny"]  # the demo backbone instead of the ViT-B/16 download


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _done_runs(folder: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(folder)) for p in folder.rglob("DONE"))


def test_readme_launchers_then_train_py(demo):
    root, env, cmd = demo
    _, _, gpu, name, classes, q, optimizer, feature = cmd
    _run(cmd, env)  # bash scripts/VQT/run_vqt_vtab.sh 0 'vtab-clevr(task="count_all")' 8 1 adam demo_vit_tiny
    out = root / "exp" / f"VQTSup_{q}_{optimizer}"
    finals = _done_runs(Path(f"{out}_final") / name / feature)
    assert [f.split("/")[-1] for f in finals] == [f"run{k}" for k in range(1, 6)]

    _run(["bash", "scripts/VQT/run_vqt_vtab_sparsity.sh", gpu, name, classes, q, optimizer, feature, "0.7"], env)
    sparse = _done_runs(Path(f"{out}_sparsefinal") / name / feature)
    assert len(sparse) == 10 and sum("/keep_frac_0.7/" in s for s in sparse) == 5

    # python train.py --config-file configs/h2t-prompt/vtab.yaml --optimizer adam [--dont_search] ... KEY VALUE
    readme = shlex.split(_readme_line("python train.py --config-file").split("[")[0])
    assert readme[:2] == ["python", "train.py"] and "--optimizer" in readme
    opts = ["DATA.NAME", name, "DATA.NUMBER_CLASSES", classes, "DATA.FEATURE", feature, "MODEL.H2T.NUM_QUERY_TOKENS", q,
            "DATA.DATAPATH", env["DATA_PATH"], "MODEL.MODEL_ROOT", env["MODEL_ROOT"], "OUTPUT_DIR", str(out),
            "DATA.BATCH_SIZE", "128", "MODEL.H2T.DROPOUT", "0.1", *TINY.split()]  # the launcher's settings
    p = _run([sys.executable, *readme[1:], "--dont_search", *opts], env)  # the yaml says sgd: --optimizer wins
    assert "error" not in p.stderr
    assert _done_runs(Path(f"{out}_final") / name / feature) == finals  # finished runs are kept


def _own_data_commands() -> list[str]:
    """The command lines (continuations joined) of the README's "Use VQT on your own data" block."""
    block = README.split("## Use VQT on your own data", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [cmd.split("#")[0].strip() for cmd in block.replace("\\\n", " ").splitlines() if cmd.strip()]


def test_readme_own_data_commands(tmp_path):
    """The three commands from a timm model name and an image folder to predictions, with the README's
    model name. Offline: instead of the download, its weights (random values, timm's file format) are put
    where the download puts them (the Hugging Face cache); 2 epochs at 28 px."""
    download, train_cmd, predict_cmd = _own_data_commands()
    assert shlex.split(download)[:3] == ["python", "scripts/download_weights.py", "--timm"]
    name = shlex.split(download)[3]
    assert f"MODEL.TIMM_NAME {name}" in train_cmd

    import timm
    from safetensors.torch import save_file

    cfg = timm.models.get_pretrained_cfg(name)
    snapshot = tmp_path / "hf" / f"models--{cfg.hf_hub_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file(timm.create_model(name, pretrained=False, num_classes=0).state_dict(), snapshot / "model.safetensors")
    write_folder_dataset(tmp_path / "my_images", {"train": 6, "test": 2})
    write_folder_dataset(tmp_path / "new_photos", {"new": 1}, seed=1)
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}

    def local(cmd: str) -> str:
        for path in ("my_images", "runs/vqt", "new_photos/", "preds.csv"):
            cmd = cmd.replace(f" {path}", f" {tmp_path / path}")
        return cmd.replace("python ", f"{shlex.quote(sys.executable)} ", 1)

    _run(["bash", "-c", local(train_cmd) + " DATA.CROPSIZE 28 SOLVER.TOTAL_EPOCH 2 SOLVER.WARMUP_EPOCH 1"], env)
    p = _run(["bash", "-c", local(predict_cmd)], env)
    with open(tmp_path / "preds.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {Path(r["path"]).parent.name for r in rows} == set(CLASSES)
    assert all({r[f"class{k}"] for k in (1, 2, 3)} == set(CLASSES) for r in rows)
    assert all(abs(sum(float(r[f"prob{k}"]) for k in (1, 2, 3)) - 1) < 1e-3 for r in rows)
    assert "error" not in p.stderr
