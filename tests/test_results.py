"""Results are never stale, poisoned, leaked or lost: run identity, diverged and unreadable runs, folders
we did not write, the recorded pick, storage faults, interop with the original code's results, and a
protocol killed at random points whose rerun equals a clean run."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import collect_demo_exp_results as collect
import train
from src.configs.vit_configs import VIT_DEMO
from src.models.checkpoints import write_random_npz
from src.utils.layout import Layout, RunDir

NAME, FEAT = "vtab-eurosat", "demo_vit_tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(assets, out, *flags, weights=None, **over):
    opts = {"MODEL.H2T.NUM_QUERY_TOKENS": 1, "MODEL.H2T.DROPOUT": 0.1, "DATA.FEATURE": FEAT, "DATA.NAME": NAME,
            "DATA.NUMBER_CLASSES": 10, "DATA.DATAPATH": assets / "data", "MODEL.WEIGHT_PATH": weights or assets / "demo.npz",
            "OUTPUT_DIR": out, "SOLVER.OPTIMIZER": "adam", "DATA.CROPSIZE": 32, "SOLVER.TOTAL_EPOCH": 2,
            "SOLVER.WARMUP_EPOCH": 1, "DATA.BATCH_SIZE": 128} | {k.replace("__", "."): v for k, v in over.items()}
    return ["--config-file", os.path.join(ROOT, "configs/h2t-prompt/vtab.yaml"), *flags,
            *[str(x) for kv in opts.items() for x in kv]]


def _finals(out, lr="0.05", wd="0.0") -> list[RunDir]:
    layout = Layout(out, NAME, FEAT, 128)
    return [layout.run("final", float(lr), float(wd), k) for k in range(1, 6)]


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_changed_setting_is_not_silently_reused(assets, tmp_path, capsys):
    out = str(tmp_path / "exp")
    given = ("--lr", "0.05", "--wd", "0.0")
    assert train.main(_args(assets, out, *given)) == 0
    runs = _finals(out)
    stamps = [os.path.getmtime(r.file("DONE")) for r in runs]
    assert train.main(_args(assets, out, *given, SOLVER__TOTAL_EPOCH=3)) == 2
    err = _err(capsys)
    assert err.startswith("error: 5 finished final runs") and "SOLVER.TOTAL_EPOCH 2 -> 3" in err and "--overwrite" in err
    assert all(r.record["epochs"] == 2 for r in runs)
    # settings that do not change numbers stay out of the identity: reused
    assert train.main(_args(assets, out, *given, ENGINE__EVAL_BATCH_SIZE=64, SOLVER__LOG_EVERY_N=7)) == 0
    assert [os.path.getmtime(r.file("DONE")) for r in runs] == stamps
    # another checkpoint file is another identity
    other = tmp_path / "other.npz"
    write_random_npz(str(other), VIT_DEMO, img_size=32, seed=5)
    assert train.main(_args(assets, out, *given, weights=other)) == 2
    assert "weights" in _err(capsys)
    assert train.main(_args(assets, out, *given, "--overwrite", SOLVER__TOTAL_EPOCH=3)) == 0
    assert all(r.record["epochs"] == 3 for r in runs)


def _nan_checkpoint(path, good):
    arrays = dict(np.load(good))
    arrays["embedding/bias"] = np.full_like(arrays["embedding/bias"], np.nan)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_all_diverged_search_is_said_and_a_fixed_rerun_retrains(assets, tmp_path, capsys):
    out, weights = str(tmp_path / "exp"), tmp_path / "w.npz"
    _nan_checkpoint(weights, assets / "demo.npz")
    assert train.main(_args(assets, out, weights=weights, SOLVER__TOTAL_EPOCH=2)) == 2
    err = _err(capsys)
    assert "all 20 search runs diverged" in err and "loss is nan" in err
    weights.write_bytes((assets / "demo.npz").read_bytes())  # the cause fixed: a new identity
    assert train.main(_args(assets, out, weights=weights, SOLVER__TOTAL_EPOCH=2)) == 0
    search = [r for _, _, r in Layout(out, NAME, FEAT, 128).search_runs()]
    assert len(search) == 20 and all(r.record["status"] == "ok" for r in search)


def test_unreadable_records_are_redone(assets, tmp_path):
    out = str(tmp_path / "exp")
    given = ("--lr", "0.05", "--wd", "0.0")
    assert train.main(_args(assets, out, *given)) == 0
    runs = _finals(out)
    stamps = [os.path.getmtime(r.file("DONE")) for r in runs]
    Path(runs[1].file("DONE")).write_text("[]\n")                    # valid JSON, not a record
    Path(runs[2].results_file).write_bytes(Path(runs[2].results_file).read_bytes()[:100])  # truncated
    Path(runs[3].file("DONE")).write_text('{"status": "ok"')          # truncated JSON
    assert train.main(_args(assets, out, *given)) == 0
    for k, r in enumerate(runs):
        assert r.record["status"] == "ok"
        assert (os.path.getmtime(r.file("DONE")) == stamps[k]) == (k in (0, 4))


def test_folders_we_did_not_write_are_never_deleted(assets, tmp_path, capsys):
    out = str(tmp_path / "exp")
    foreign = _finals(out)[2]
    os.makedirs(foreign.path)
    Path(foreign.file("eval_results.pth")).write_text("someone else's result")
    assert train.main(_args(assets, out, "--lr", "0.05", "--wd", "0.0")) == 2
    err = _err(capsys)
    assert foreign.path in err and "not written by vqt" in err
    assert Path(foreign.file("eval_results.pth")).read_text() == "someone else's result"
    assert not os.path.exists(_finals(out)[0].path)  # stopped before training anything


def test_pick_is_recorded_and_the_collector_reports_it(assets, tmp_path, capsys):
    root = tmp_path / "exp"
    out = str(root / "VQTSup_1_adam")
    assert train.main(_args(assets, out)) == 0
    pick = json.loads(Path(Layout(out, NAME, FEAT, 128).meta_dir("final"), "pick.json").read_text())
    assert pick["source"] == "search" and os.path.isdir(os.path.join(out + "_final", NAME, FEAT, pick["folder"]))
    # a later run with an explicit lr/wd leaves a second complete lr/wd folder; the pick names it
    assert train.main(_args(assets, out, "--lr", "0.5", "--wd", "0.01")) == 0
    assert train.main(_args(assets, out, "--dont_search")) == 0
    report = collect.collect(root, FEAT, ["VQTSup_1_adam_final"], [t for t in collect.DEMO_TASKS if t.name == NAME])
    cell = report.cells[("VQTSup_1_adam_final", NAME)]
    assert cell.hyparam == pick["folder"] and len(cell.values) == 5


def test_finals_still_running_are_reported_as_running(assets, tmp_path, capsys):
    out = str(tmp_path / "exp")
    given = ("--lr", "0.05", "--wd", "0.0")
    assert train.main(_args(assets, out, *given)) == 0
    os.remove(_finals(out)[0].file("DONE"))
    with Layout(out, NAME, FEAT, 128).lock("final"):
        assert train.main(_args(assets, out, *given, "--sparse-mode", "compress", MODEL__H2T__LRP_COEF=0.0001)) == 2
    err = _err(capsys)
    assert "still running" in err and f"pid {os.getpid()}" in err


def test_write_failures_are_one_line(assets, tmp_path, capsys, monkeypatch):
    def full_disk(obj, path, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    assert train.main(_args(assets, str(tmp_path / "exp"), "--lr", "0.05", "--wd", "0.0")) == 2
    err = _err(capsys)
    assert err.startswith("error: cannot write ") and "exp_final" in err and "Traceback" not in err
    monkeypatch.undo()
    assert train.main(_args(assets, str(tmp_path / "exp"), "--lr", "0.05", "--wd", "0.0")) == 0  # redone

    def read_only(path, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "makedirs", read_only)
    assert train.main(_args(assets, str(tmp_path / "ro"), "--lr", "0.05", "--wd", "0.0")) == 2
    assert "Permission denied" in _err(capsys)


def _original_tree(root: Path) -> None:
    """Results as the original code writes them: no DONE, a defaultdict of numpy floats, epoch_99."""
    for setting, name, sub, values in (("VQTSup_1_adam_sparsefinal", "vtab-dtd", "keep_frac_0.7", [0.6, 0.62]),
                                       ("VQTSup_20_adam_final", "vtab-svhn", "", [0.9, 0.8])):
        for k, v in enumerate(values, 1):
            run = root / setting / name / "sup_vitb16_imagenet1k" / "lr0.05_wd0.001_bs128" / sub / f"run{k}"
            run.mkdir(parents=True)
            res = collections.defaultdict(dict)
            res["epoch_99"]["classification"] = {f"test_{name}": {"top1": np.float64(v), "top5": np.float32(1.0)}}
            torch.save(res, run / "eval_results.pth")
            (run / "logs.txt").write_text("original")


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_the_collector_reads_the_original_codes_results(tmp_path, capsys):
    _original_tree(tmp_path)
    evil = tmp_path / "VQTSup_20_adam_final/vtab-svhn/sup_vitb16_imagenet1k/lr0.05_wd0.001_bs128/run3"
    evil.mkdir()
    torch.save({"epoch_99": _Evil()}, evil / "eval_results.pth")
    assert collect.main(["--root", str(tmp_path), "--out", str(tmp_path / "table")]) == 0
    out = capsys.readouterr().out
    assert "61.00 ± 1.00" in out and "85.00 ± 5.00" in out
    assert "external" in out and "run3 (eval_results.pth: UnpicklingError: posix.getcwd is not expected" in out


def test_the_original_collector_rule_reads_our_results(assets, tmp_path):
    """The original takes os.listdir(<setting>/<task>/<feature>)[0] as the lr/wd folder and reads
    run{k}/eval_results.pth; our feature folders hold nothing else, and the files load as the original loads them."""
    out = str(tmp_path / "VQTSup_1_adam")
    assert train.main(_args(assets, out)) == 0
    assert train.main(_args(assets, out, "--sparse-mode", "compress", MODEL__H2T__LRP_COEF=0.0001)) == 0
    assert train.main(_args(assets, out, "--sparse-mode", "featselect", MODEL__H2T__KEEP_FRAC=0.7)) == 0
    for suffix, sub in (("_final", ""), ("_sparsefinal", "keep_frac_0.7")):
        feature_dir = os.path.join(out + suffix, NAME, FEAT)
        (hyparam,) = os.listdir(feature_dir)
        for k in range(1, 6):
            res = torch.load(os.path.join(feature_dir, hyparam, sub, f"run{k}", "eval_results.pth"), weights_only=False)
            assert 0 <= res[f"epoch_{len(res) - 1}"]["classification"][f"test_{NAME}"]["top1"] <= 1
        assert os.listdir(os.path.join(out + suffix, NAME)) == [FEAT]


def _tree(out: str) -> dict[str, object]:
    """Every result file of the search and the finals, loaded (logs carry times and are left out)."""
    files = {}
    for suffix in ("_val", "_final"):
        for d, _, names in os.walk(out + suffix):
            for n in names:
                if n in ("eval_results.pth", "last_model.pth") or n.endswith("_logits.pth"):
                    path = os.path.join(d, n)
                    files[os.path.relpath(path, os.path.dirname(out))] = torch.load(path, weights_only=True)
    return files


def _equal(x, y) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    return torch.equal(x, y) if torch.is_tensor(x) else x == y


def test_sigkill_at_random_points_then_rerun_equals_a_clean_run(assets, tmp_path):
    args = _args(assets, "@OUT@")
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    env = dict(os.environ, PYTHONPATH=ROOT)
    clean = str(tmp_path / "clean" / "VQTSup_1_adam")
    start = time.perf_counter()
    subprocess.run(cmd + [a.replace("@OUT@", clean) for a in args], check=True, capture_output=True, env=env, cwd=ROOT)
    duration = time.perf_counter() - start
    killed = str(tmp_path / "killed" / "VQTSup_1_adam")
    codes = []
    for fraction in np.random.default_rng(0).uniform(0.15, 0.8, size=3):  # random points of a whole run's time
        p = subprocess.Popen(cmd + [a.replace("@OUT@", killed) for a in args], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(fraction * duration)
        p.send_signal(signal.SIGKILL)
        codes.append(p.wait())
    assert -signal.SIGKILL in codes  # at least one attempt was killed mid-run
    subprocess.run(cmd + [a.replace("@OUT@", killed) for a in args], check=True, capture_output=True, env=env, cwd=ROOT)
    clean_files, killed_files = _tree(clean), _tree(killed)
    assert len(clean_files) == 20 + 5 * 4 and _equal(clean_files, killed_files)
