"""The README's one-task examples, run offline on demo assets (tiny ViT, synthetic data, 2 epochs)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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
