"""Results are never stale, poisoned, leaked or lost: run identity, diverged and unreadable runs, folders
we did not write, the recorded pick, storage faults, interop with the original code's results, and a
protocol killed at random points whose rerun equals a clean run."""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import collect_demo_exp_results as collect
import train
from src.configs.vit_configs import VIT_DEMO
from src.errors import VQTError
from src.models.checkpoints import write_random_npz
from src.models.inference import run_export
from src.utils.layout import Layout, RunDir, RunState, atomic_save

NAME, FEAT = "vtab-eurosat", "demo_vit_tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(assets, out, *flags, weights=None, **over):
    opts = {"MODEL.H2T.NUM_QUERY_TOKENS": 1, "MODEL.H2T.DROPOUT": 0.1, "DATA.FEATURE": FEAT, "DATA.NAME": NAME,
            "DATA.NUMBER_CLASSES": 10, "DATA.DATAPATH": assets / "data",
            "MODEL.WEIGHT_PATH": weights or assets / "demo.npz",
            "OUTPUT_DIR": out, "SOLVER.OPTIMIZER": "adam", "DATA.CROPSIZE": 32, "SOLVER.TOTAL_EPOCH": 2,
            "SOLVER.WARMUP_EPOCH": 1, "DATA.BATCH_SIZE": 128} | {k.replace("__", "."): v for k, v in over.items()}
    return ["--config-file", os.path.join(ROOT, "configs/h2t-prompt/vtab.yaml"), *flags,
            *[str(x) for kv in opts.items() for x in kv]]


def _finals(out, lr="0.05", wd="0.0") -> list[RunDir]:
    layout = Layout(out, NAME, FEAT, 128)
    return [layout.run("final", float(lr), float(wd), k) for k in range(1, 6)]


GIVEN = ("--lr", "0.05", "--wd", "0.0")  # the finals' lr and wd, no search


def _train_finals(assets, out) -> tuple[list[RunDir], list[float]]:
    """The 5 final runs trained at GIVEN, and their DONE times."""
    assert train.main(_args(assets, out, *GIVEN)) == 0
    runs = _finals(out)
    return runs, [os.path.getmtime(r.file("DONE")) for r in runs]


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_changed_setting_is_not_silently_reused(assets, tmp_path, capsys):
    out = str(tmp_path / "exp")
    runs, stamps = _train_finals(assets, out)
    assert train.main(_args(assets, out, *GIVEN, SOLVER__TOTAL_EPOCH=3)) == 2
    err = _err(capsys)
    assert (err.startswith("error: 5 finished final runs") and "SOLVER.TOTAL_EPOCH 2 -> 3" in err
            and "--overwrite" in err)
    assert all(r.record["epochs"] == 2 for r in runs)
    # settings that do not change numbers stay out of the identity: reused
    assert train.main(_args(assets, out, *GIVEN, ENGINE__EVAL_BATCH_SIZE=64, SOLVER__LOG_EVERY_N=7)) == 0
    assert [os.path.getmtime(r.file("DONE")) for r in runs] == stamps
    # another checkpoint file is another identity
    other = tmp_path / "other.npz"
    write_random_npz(str(other), VIT_DEMO, img_size=32, seed=5)
    assert train.main(_args(assets, out, *GIVEN, weights=other)) == 2
    assert "weights" in _err(capsys)
    assert train.main(_args(assets, out, *GIVEN, "--overwrite", SOLVER__TOTAL_EPOCH=3)) == 0
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
    runs, stamps = _train_finals(assets, out)
    Path(runs[1].file("DONE")).write_text("[]\n")                    # valid JSON, not a record
    Path(runs[2].results_file).write_bytes(Path(runs[2].results_file).read_bytes()[:100])  # truncated
    Path(runs[3].file("DONE")).write_text('{"status": "ok"')          # truncated JSON
    assert train.main(_args(assets, out, *GIVEN)) == 0
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
    report = collect.collect(root, FEAT, ["VQTSup_1_adam_final"], [collect.TASKS[NAME]])
    cell = report.cells[("VQTSup_1_adam_final", NAME)]
    assert cell.hyparam == pick["folder"] and len(cell.values) == 5


def test_finals_still_running_are_reported_as_running(assets, tmp_path, capsys):
    out = str(tmp_path / "exp")
    assert train.main(_args(assets, out, *GIVEN)) == 0
    os.remove(_finals(out)[0].file("DONE"))
    with Layout(out, NAME, FEAT, 128).lock("final"):
        assert train.main(_args(assets, out, *GIVEN, "--sparse-mode", "compress", MODEL__H2T__LRP_COEF=0.0001)) == 2
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


COMMANDS = {"main": ((), {}), "compress": (("--sparse-mode", "compress"), {"MODEL__H2T__LRP_COEF": 0.0001}),
            "featselect": (("--sparse-mode", "featselect"), {"MODEL__H2T__KEEP_FRAC": 0.7})}
SETTING = "VQTSup_1_adam"


def _command(assets, out: str, command: str, *flags, **over) -> list[str]:
    """train.py's arguments of one command of the protocol (search and finals, compress, featselect)."""
    extra, stage_over = COMMANDS[command]
    return _args(assets, out, *extra, *flags, **(stage_over | over))


def _cli(assets, out: str, command: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), *_command(assets, out, command)]


def _subprocess(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **kw)


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A clean search, finals, compress and featselect of the demo task (experiment root, seconds per command)."""
    root = tmp_path_factory.mktemp("clean")
    durations = {}
    for command in COMMANDS:
        start = time.perf_counter()
        assert _subprocess(_cli(assets, str(root / SETTING), command)).wait() == 0
        durations[command] = time.perf_counter() - start
    return root, durations


def _copy(trained, tmp_path) -> tuple[Path, str]:
    root = tmp_path / "exp"
    shutil.copytree(trained[0], root)
    return root, str(root / SETTING)


def _results(root: Path) -> dict[str, bytes]:
    """Bytes of every result file (logs, configs and DONE carry times and paths: left out)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.pth")) if "results" not in p.parts}


def _table(root: Path, out: Path) -> bytes:
    settings = [f"{SETTING}_final", f"{SETTING}_sparsefinal"]
    assert collect.main(["--root", str(root), "--out", str(out), "--feature", FEAT, "--tasks", NAME, "--settings",
                         *settings]) == 0
    return (out / f"{collect.output_stem(settings, [NAME], FEAT, collect.DEFAULT_RUNS)}.csv").read_bytes()


def test_sigkill_at_random_points_then_rerun_equals_a_clean_run(assets, trained, tmp_path, capsys):
    """Each command killed at random points (twice in a row in some trials), then rerun: the results and the
    collector's table are byte-identical to a clean run's."""
    rng = np.random.default_rng(0)
    killed = tmp_path / "killed"
    kills = 0
    for command, duration in trained[1].items():
        for fraction in rng.uniform(0.3, 0.95, size=int(rng.integers(1, 3))):
            p = _subprocess(_cli(assets, str(killed / SETTING), command))
            time.sleep(fraction * duration)
            p.send_signal(signal.SIGKILL)
            kills += p.wait() == -signal.SIGKILL
        assert _subprocess(_cli(assets, str(killed / SETTING), command)).wait() == 0
    assert kills >= 3
    clean, rerun = _results(trained[0]), _results(killed)
    assert len(clean) == 20 + 5 * 4 + 5 * 4 * 2 and clean == rerun
    assert _table(trained[0], tmp_path / "t1") == _table(killed, tmp_path / "t2")
    assert capsys.readouterr().out.count("=====> 5") == 4  # both tables: 5 runs of the finals and featselect
    leftovers = [p for p in killed.rglob("*") if ".tmp" in p.name or "vqt_clearing" in p.name]
    assert leftovers == []


def _pick(out: str) -> tuple[float, float]:
    pick = json.loads(Path(Layout(out, NAME, FEAT, 128).meta_dir("final"), "pick.json").read_text())
    return pick["lr"], pick["wd"]


def _given(out: str) -> tuple[str, ...]:
    lr, wd = _pick(out)
    return "--lr", str(lr), "--wd", str(wd)


def test_the_pick_is_made_among_the_current_grids_runs_only(assets, trained, tmp_path, capsys):
    _root, out = _copy(trained, tmp_path)
    picked = _pick(out)
    other = Layout(out, NAME, FEAT, 128).run("search", 9.0, 0.0, 1)  # not of the grid, the best val top-1
    other.start()
    atomic_save({"epoch_0": {"classification": {f"val_{NAME}": {"top1": 1.0}}}}, other.results_file)
    other.finish("ok", "", 1, {"identity": "of another grid", "settings": {}})
    assert train.main(_args(assets, out, "--dont_search")) == 0
    assert _pick(out) == picked and other.path in "".join(capsys.readouterr())
    # the grid's runs, trained under another setting, are not picked either
    assert train.main(_args(assets, out, "--dont_search", SOLVER__TOTAL_EPOCH=3)) == 2
    assert "no search run" in _err(capsys)


def test_a_sparsity_stage_starts_only_from_finals_of_the_current_setting(assets, trained, tmp_path, capsys):
    _root, out = _copy(trained, tmp_path)
    assert train.main(_command(assets, out, "compress", *_given(out), MODEL__H2T__DROPOUT=0.2)) == 2
    err = _err(capsys)
    assert "final run" in err and "trained with other settings: MODEL.H2T.DROPOUT 0.1 -> 0.2" in err


def test_derived_runs_do_not_outlive_the_finals_they_started_from(assets, trained, tmp_path, capsys):
    root, out = _copy(trained, tmp_path)
    assert train.main(_args(assets, out, *_given(out), "--overwrite", MODEL__H2T__DROPOUT=0.0)) == 0
    report = collect.collect(root, FEAT, [f"{SETTING}_sparsefinal"], [collect.TASKS[NAME]])
    cell = report.cells[(f"{SETTING}_sparsefinal", NAME)]
    assert cell.values == [] and [r.status for r in cell.runs] == ["stale"] * 5
    assert any(p.startswith("stale") for p in report.problems)


def _our_run(path: Path) -> RunDir:
    run = RunDir(str(path))
    run.start()
    for name in ("config.yaml", "logs.txt", "eval_results.pth"):
        (path / name).write_text(name)
    return run


class _Killed(BaseException):
    """A SIGKILL at that point: nothing after it runs."""


@pytest.mark.parametrize("crash", ["before the rename", "after the rename", "during the delete"])
def test_clearing_a_run_leaves_our_folder_or_nothing(tmp_path, monkeypatch, crash):
    run = _our_run(tmp_path / "run1")

    def killed(*a, **k):
        raise _Killed

    def half_delete(path, *a, **k):  # the marker goes first, then the process dies
        os.remove(os.path.join(path, ".vqt_run"))
        raise _Killed

    target = {"before the rename": (os, "replace", killed), "after the rename": (shutil, "rmtree", killed),
              "during the delete": (shutil, "rmtree", half_delete)}[crash]
    monkeypatch.setattr(*target)
    with pytest.raises(_Killed):
        run.clear()
    monkeypatch.undo()
    state = run.status()
    assert state is (RunState.PARTIAL if crash == "before the rename" else RunState.MISSING)
    run.tidy()  # what a rerun does first
    assert not os.path.exists(run.aside)
    run.clear()
    assert sorted(os.listdir(tmp_path)) == []


def test_a_file_the_done_record_vouches_for_is_checked(assets, trained, tmp_path, capsys):
    root, out = _copy(trained, tmp_path)
    runs = _finals(out, *map(str, _pick(out)))
    stamps = [os.path.getmtime(r.file("DONE")) for r in runs]
    ckpt, logits = Path(runs[0].checkpoint_file), Path(runs[1].logits_file(f"test_{NAME}"))
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    logits.write_bytes(logits.read_bytes()[:-8])
    assert runs[0].status() is runs[1].status() is RunState.BROKEN
    assert train.main(_command(assets, out, "compress")) == 2
    err = capsys.readouterr().err
    assert "damaged: last_model.pth differs from what DONE recorded" in err and "Traceback" not in err
    with pytest.raises(VQTError, match=r"is broken \(last_model.pth differs"):
        run_export(runs[0].path)
    assert train.main(_args(assets, out, "--dont_search")) == 0  # both redone, bit for bit as the clean run
    assert "differs from what DONE recorded (1000 bytes, DONE says" in "".join(capsys.readouterr())
    assert [os.path.getmtime(r.file("DONE")) == s for r, s in zip(runs, stamps)] == [False, False, True, True, True]
    assert _results(root) == _results(trained[0])


def test_a_rerun_removes_what_killed_processes_left(assets, trained, tmp_path):
    _root, out = _copy(trained, tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    layout = Layout(out, NAME, FEAT, 128)
    tmp = Path(layout.meta_dir("final"), f"pick.json.tmp{dead.pid}")
    tmp.write_text("{")
    scratch = Path(layout.cache_dir(), f"tmp{dead.pid}")
    scratch.mkdir(parents=True)
    (scratch / "__autograph_generated_file1234.py").write_text("")
    aside = Path(_finals(out, *map(str, _pick(out)))[2].aside)
    aside.mkdir()
    (aside / "logs.txt").write_text("half deleted")
    assert train.main(_args(assets, out, "--dont_search")) == 0
    assert not tmp.exists() and not scratch.exists() and not aside.exists()
    own = os.path.join(layout.cache_dir(), f"tmp{os.getpid()}")  # this run's, removed when it ended
    assert not os.path.exists(own) and tempfile.gettempdir() != own


def test_the_search_lock_read_only_collection_and_all_diverged_finals(assets, trained, tmp_path, capsys):
    root, out = _copy(trained, tmp_path)
    with Layout(out, NAME, FEAT, 128).lock("search"):
        assert train.main(_command(assets, out, "compress")) == 2
    assert "search of this task is still running" in _err(capsys)
    for lock in root.rglob("*.lock"):
        lock.unlink()
    before = sorted(root.rglob("*"))
    _table(root, tmp_path / "table")
    assert sorted(root.rglob("*")) == before  # reading writes nothing (no lock file either)
    assert train.main(_args(assets, str(tmp_path / "nan"), "--lr", "1e38", "--wd", "0.0")) == 2
    assert "all 5 final runs diverged" in _err(capsys)


def test_a_users_file_in_a_run_folder_stops_the_redo(assets, trained, tmp_path, capsys):
    _root, out = _copy(trained, tmp_path)
    run = _finals(out, *map(str, _pick(out)))[1]
    os.remove(run.file("DONE"))
    Path(run.file("notes.txt")).write_text("mine")
    assert train.main(_args(assets, out, "--dont_search")) == 2
    err = _err(capsys)
    assert run.file("notes.txt") in err and "not written by vqt" in err
    assert Path(run.file("notes.txt")).read_text() == "mine" and os.path.isfile(run.file("eval_results.pth"))


def test_demo_assets_leave_no_temporary_folder(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    dest, system_tmp = tmp_path / "assets", tmp_path / "tmp"
    (dest / f"tmp{dead.pid}").mkdir(parents=True)  # left by a killed writer
    system_tmp.mkdir()
    p = subprocess.run([sys.executable, "scripts/make_demo_assets.py", "--dest", str(dest), "--tasks", "vtab-eurosat"],
                       cwd=ROOT, env=dict(os.environ, TMPDIR=str(system_tmp)), capture_output=True, check=False)
    assert p.returncode == 0, p.stderr
    assert list(system_tmp.iterdir()) == [] and sorted(x.name for x in dest.iterdir()) == ["pre-trained_weights",
                                                                                         "vtab_data"]
