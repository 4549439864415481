"""collect_demo_exp_results.py on a fake experiment tree with complete, incomplete, diverged and missing runs."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

import collect_demo_exp_results as collect
from src.utils.layout import STARTED

REPO = Path(__file__).resolve().parents[1]
FEAT = "sup_vitb16_imagenet1k"
SPARSE, FINAL20 = "VQTSup_1_adam_sparsefinal", "VQTSup_20_adam_final"
KITTI = 'vtab-kitti(task="closest_vehicle_distance")'
TASKS = ["vtab-dtd", "vtab-caltech101", "vtab-svhn", "vtab-dmlab", "vtab-eurosat", KITTI]


def _run(folder: Path, name: str, top1: float | None, epochs: int = 3, status: str | None = "ok") -> None:
    """A run folder as the engine writes it; top1=None leaves out the test metrics, status=None the DONE file."""
    folder.mkdir(parents=True)
    (folder / STARTED).touch()
    results = {f"epoch_{e}": {"classification": {f"val_{name}": {"top1": 0.5, "top5": 0.9}}} for e in range(epochs)}
    if top1 is not None:
        results[f"epoch_{epochs - 1}"]["classification"][f"test_{name}"] = {"top1": top1, "top5": 0.99}
    torch.save(results, folder / "eval_results.pth")
    (folder / "logs.txt").write_text("log\n")
    if status is not None:
        (folder / "DONE").write_text(json.dumps({"status": status, "message": "loss is nan" if status == "diverged"
                                                 else "", "epochs": epochs}))


def _tree(root: Path) -> None:
    hp = "lr0.05_wd0.01_bs128"
    dtd = root / SPARSE / "vtab-dtd" / FEAT
    for k, v in enumerate([0.60, 0.62, 0.64, 0.66, 0.68], 1):
        _run(dtd / hp / "keep_frac_0.7" / f"run{k}", "vtab-dtd", v)
        _run(dtd / hp / "compress" / f"run{k}", "vtab-dtd", 0.01)  # not the reported stage
    _run(dtd / "lr0.5_wd0.0_bs128" / "keep_frac_0.7" / "run1", "vtab-dtd", 0.99)  # a stray second lr/wd folder
    cal = root / SPARSE / "vtab-caltech101" / FEAT / hp / "keep_frac_0.7"
    _run(cal / "run1", "vtab-caltech101", 0.9)
    _run(cal / "run2", "vtab-caltech101", 0.8)
    _run(cal / "run3", "vtab-caltech101", 0.7, status=None)       # interrupted
    _run(cal / "run4", "vtab-caltech101", 0.1, status="diverged")  # NaN loss
    for k in range(1, 6):                                           # run5 missing
        _run(root / FINAL20 / "vtab-svhn" / FEAT / hp / f"run{k}", "vtab-svhn", 0.5, epochs=4)
        _run(root / SPARSE / "vtab-eurosat" / FEAT / hp / "keep_frac_0.7" / f"run{k}", "vtab-eurosat", 0.95)
        _run(root / "VQTSup_1_adam_final" / "vtab-eurosat" / FEAT / hp / f"run{k}", "vtab-eurosat", 0.1)
    kitti = root / FINAL20 / KITTI / FEAT / hp
    _run(kitti / "run1", KITTI, 0.4)
    _run(kitti / "run2", KITTI, None)  # DONE ok but no test metrics: unreadable
    # vtab-dmlab: nothing at all


def _result(folder: Path, suffix: str) -> Path:
    """The one result file with `suffix` in `folder` (named by the selection, e.g. results_6tasks-ab12cd.csv)."""
    (path,) = folder.glob(f"results*{suffix}")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "h2t_vit_experiments"
    _tree(root)
    return root


def test_task_settings_follow_run_demo_exp():
    assert len(collect.TASK_SETTINGS) == 19
    assert collect.TASK_SETTINGS["vtab-dtd"] == SPARSE
    assert collect.TASK_SETTINGS['vtab-clevr(task="closest_object_distance")'] == "VQTSup_10_adam_final"
    assert collect.TASK_SETTINGS["vtab-svhn"] == FINAL20
    assert collect.DEFAULT_SETTINGS == (SPARSE, "VQTSup_10_adam_final", FINAL20)
    assert sorted(collect.PRINT_ORDER) == sorted(collect.TASK_SETTINGS)


def test_table_files_and_problems(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert collect.main(["--root", str(tree), "--out", str(out), "--tasks", *TASKS]) == 0
    stdout = capsys.readouterr().out
    dtd = stdout[stdout.index("--- vtab-dtd"):]
    assert dtd.startswith(f"--- vtab-dtd - {FEAT} - lr0.05_wd0.01_bs128\nnote: several lr/wd folders")
    assert "=====> 5\n64.00 ± 2.83  (epochs: 3)" in dtd
    assert "=====> 2\n85.00 ± 5.00  (epochs: 3)" in stdout          # caltech: only the two ok runs count
    assert "=====> 5\n50.00 ± 0.00  (epochs: 4)" in stdout          # svhn: last epoch is epoch_3
    assert "=====> 1\n40.00 ± 0.00" in stdout                       # kitti
    assert "10.00" not in stdout and "VQTSup_1_adam_final" not in stdout  # settings not asked for are not read
    # the original order of sections and tasks
    assert stdout.index(f"====== {SPARSE}") < stdout.index("--- vtab-caltech101") < stdout.index("--- vtab-dtd")
    assert "--- vtab-dmlab" not in stdout  # a missing folder is skipped in the table, listed under problems
    problems = stdout[stdout.index("====== problems"):]
    assert f"missing     {FINAL20} / vtab-dmlab: no {FEAT} folder" in problems
    assert "missing     " + SPARSE + " / vtab-caltech101 / lr0.05_wd0.01_bs128: run5" in problems
    assert "incomplete  " + SPARSE + " / vtab-caltech101 / lr0.05_wd0.01_bs128: run3 (no DONE" in problems
    assert "diverged    " + SPARSE + " / vtab-caltech101 / lr0.05_wd0.01_bs128: run4 (loss is nan)" in problems
    assert f"unreadable  {FINAL20} / {KITTI} / lr0.05_wd0.01_bs128: run2" in problems
    assert "Natural: 66.33  (3/3 tasks)" in stdout and "Structured: 40.00  (1/2 tasks)" in stdout
    assert "All (mean over tasks): 66.80  (5/6 tasks)" in stdout

    with open(_result(out, ".csv")) as f:
        rows = {r["task"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["vtab-caltech101", "vtab-dtd", "vtab-svhn", "vtab-eurosat", "vtab-dmlab", KITTI]
    assert rows["vtab-dtd"]["setting"] == f"{SPARSE}/keep_frac_0.7" and rows["vtab-dtd"]["group"] == "Natural"
    assert (rows["vtab-dtd"]["n_runs"], rows["vtab-dtd"]["mean"], rows["vtab-dtd"]["std"]) == ("5", "64.0000", "2.8284")
    assert [rows["vtab-dtd"][f"run{k}"] for k in range(1, 6)] == ["60.0000", "62.0000", "64.0000", "66.0000", "68.0000"]
    assert [rows["vtab-caltech101"][f"run{k}"] for k in range(1, 6)] == ["90.0000", "80.0000", "", "", ""]
    assert rows["vtab-dmlab"]["n_runs"] == "0" and rows["vtab-dmlab"]["mean"] == ""
    assert rows["vtab-eurosat"]["mean"] == "95.0000" and rows["vtab-svhn"]["epochs"] == "4"

    md = _result(out, ".md").read_text()
    assert f"| `vtab-dtd` | Natural | {SPARSE}/keep_frac_0.7 | 5/5 | 3 | 64.00 ± 2.83 |" in md
    assert "| `vtab-dmlab` | Structured | – | 0/5 |  | n/a |" in md
    assert "| Natural | 66.33 | 3/3 tasks |" in md and "| Specialized | 95.00 | 1/1 tasks |" in md
    assert "| Structured | 40.00 | 1/2 tasks |" in md and "| All (mean over tasks) | 66.80 | 5/6 tasks |" in md
    assert "| All (mean of group means) | 67.11 | 3/3 groups |" in md
    assert "- incomplete  " in md

    png = _result(out, ".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).ndim == 3


def test_no_arguments_like_the_original(tree):
    proc = subprocess.run([sys.executable, str(REPO / "collect_demo_exp_results.py")], cwd=tree.parent,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr  # a report: missing runs do not fail it
    assert proc.stdout.startswith(f"====== {SPARSE} ======\n--- vtab-caltech101 - {FEAT} - lr0.05_wd0.01_bs128\n")
    assert "====== VQTSup_10_adam_final ======\n\n" in proc.stdout  # nothing ran with Q=10
    assert (f"vtab-sun397: no {FEAT} folder" in proc.stdout
            and "All (mean over tasks): 66.80  (5/19 tasks)" in proc.stdout)
    assert (tree / "results" / "results.csv").is_file() and (tree / "results" / "results.png").is_file()


def test_settings_override_reports_from_listed_setting(tree, tmp_path, capsys):
    assert collect.main(["--root", str(tree), "--out", str(tmp_path), "--settings", "VQTSup_1_adam_final",
                         "--tasks", "vtab-eurosat", "vtab-dtd"]) == 0
    stdout = capsys.readouterr().out
    assert "=====> 5\n10.00 ± 0.00" in stdout
    assert "missing     vtab-dtd: no complete runs under any of ['VQTSup_1_adam_final']" in stdout
    rows = list(csv.DictReader(_result(tmp_path, ".csv").read_text().splitlines()))
    assert rows[1]["task"] == "vtab-eurosat" and rows[1]["setting"] == "VQTSup_1_adam_final"


def test_bad_input(tmp_path, capsys):
    assert collect.main(["--root", str(tmp_path / "nope")]) == 2
    assert "experiment root" in capsys.readouterr().err
    assert collect.main(["--root", str(tmp_path), "--tasks", "vtab-bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown task(s) ['vtab-bogus']") and err.count("\n") == 1


def test_writes_only_next_to_what_was_read_and_never_over_another_selection(tree, tmp_path, capsys):
    stray = tmp_path / "not_an_experiment"
    stray.mkdir()
    assert collect.main(["--root", str(stray)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {stray} holds none of the settings")
    assert list(stray.iterdir()) == []
    assert collect.main(["--root", str(tree)]) == 0
    full = (tree / "results" / "results.csv").read_text()
    assert collect.main(["--root", str(tree), "--settings", FINAL20]) == 0
    capsys.readouterr()
    assert collect.main(["--root", str(tree), "--tasks", "vtab-eurosat", "vtab-svhn"]) == 0
    assert "====== VQTSup_10_adam_final" not in capsys.readouterr().out  # no Q=10 task selected: no empty section
    assert (tree / "results" / "results.csv").read_text() == full
    names = sorted(p.name for p in (tree / "results").glob("*.csv"))
    assert names[0] == "results.csv" and names[1].startswith("results_2tasks-") and names[2] == f"results_{FINAL20}.csv"
