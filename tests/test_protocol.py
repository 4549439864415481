"""The whole protocol through train.py on a genuine on-disk TFDS task and a random checkpoint in the
real .npz layout: search, best pick, finals with test, redo of interrupted runs, compress and
featselect, and the errors a user meets."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from yacs.config import CfgNode

import train
from src.configs.defaults import get_cfg
from src.engine import frozen as frozen_mod
from src.engine.protocol import FINAL_SEEDS
from src.models.vqt import HEAD_W, QUERY_KEY, QuerySpec
from src.utils.layout import PHASES, Layout

NAME = "vtab-eurosat"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(assets, out, *flags, over=()):
    opts = {"MODEL.H2T.NUM_QUERY_TOKENS": 2, "MODEL.H2T.DROPOUT": 0.1, "DATA.FEATURE": "demo_vit_tiny",
            "DATA.NAME": NAME, "DATA.NUMBER_CLASSES": 10, "DATA.DATAPATH": assets / "data",
            "MODEL.WEIGHT_PATH": assets / "demo.npz", "OUTPUT_DIR": out, "SOLVER.OPTIMIZER": "adam",
            "DATA.CROPSIZE": 32, "SOLVER.TOTAL_EPOCH": 3, "SOLVER.WARMUP_EPOCH": 1, "DATA.BATCH_SIZE": 128}
    return ["--config-file", os.path.join(ROOT, "configs/h2t-prompt/vtab.yaml"), *flags,
            *[str(x) for kv in opts.items() for x in kv], *over]


def _task_dir(out, suffix):
    return Layout(out, NAME, "demo_vit_tiny", 128).task_dir({v: k for k, v in PHASES.items()}[suffix])


def _runs(out, suffix):
    base = _task_dir(out, suffix)
    return sorted(os.path.relpath(os.path.join(d), base) for d, _, files in os.walk(base) if "DONE" in files)


def _results(path):
    return torch.load(os.path.join(path, "eval_results.pth"), weights_only=True)


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exp") / "VQTSup_2_adam")
    assert train.main(_args(assets, out, "--optimizer", "adam")) == 0
    return out


def test_search_then_finals(finished):
    search = _runs(finished, "_val")
    assert len(search) == 20
    assert {s.split("/")[0] for s in search} == {f"lr{lr}_wd{wd}_bs128" for lr in (0.5, 0.25, 0.125, 0.05, 0.025)
                                                 for wd in (0.01, 0.001, 0.0001, 0.0)}
    base = _task_dir(finished, "_val")
    scores = {}
    for s in search:
        lr, wd = map(float, re.match(r"lr(.+)_wd(.+)_bs128", s.split("/")[0]).groups())
        res = _results(os.path.join(base, s))
        assert set(res) == {"epoch_0", "epoch_1", "epoch_2"}
        assert "test_" + NAME not in res["epoch_2"]["classification"]
        scores[(lr, wd)] = res["epoch_2"]["classification"]["val_" + NAME]["top1"]
    top = max(scores.values())
    best_lr = min(lr for (lr, _), v in scores.items() if v == top)
    finals = _runs(finished, "_final")
    assert [f.split("/")[1] for f in finals] == [f"run{k}" for k in range(1, 6)]
    assert len({f.split("/")[0] for f in finals}) == 1 and finals[0].startswith(f"lr{best_lr}_wd")
    run = os.path.join(_task_dir(finished, "_final"), finals[0])
    res = _results(run)
    last = res["epoch_2"]["classification"]
    assert set(last) == {"val_" + NAME, "test_" + NAME} and set(last["test_" + NAME]) == {"top1", "top5"}
    assert all("test_" + NAME not in res[e]["classification"] for e in ("epoch_0", "epoch_1"))
    ckpt = torch.load(os.path.join(run, "last_model.pth"), weights_only=True)["model"]
    assert ckpt[QUERY_KEY].shape == (4, 2, 64) and ckpt[HEAD_W].shape == (10, 64 + 4 * 2 * 64)
    logits = torch.load(os.path.join(run, f"test_{NAME}_logits.pth"), weights_only=True)
    assert logits["joint_logits"].shape[0] == len(logits["targets"]) > 0
    assert "SEED: 42" in Path(os.path.join(run, "config.yaml")).read_text()
    assert "Classification results with test_" in Path(os.path.join(run, "logs.txt")).read_text()


def test_interrupted_run_is_redone_and_done_runs_are_kept(assets, finished):
    final = _task_dir(finished, "_final")
    runs = sorted(os.path.join(final, r) for r in _runs(finished, "_final"))
    stamps = {r: os.path.getmtime(os.path.join(r, "eval_results.pth")) for r in runs}
    os.remove(os.path.join(runs[2], "DONE"))
    Path(runs[2], "eval_results.pth").write_text("partial")
    assert train.main(_args(assets, finished, "--optimizer", "adam", "--dont_search")) == 0
    for r in runs:
        assert os.path.exists(os.path.join(r, "DONE"))
        assert (os.path.getmtime(os.path.join(r, "eval_results.pth")) == stamps[r]) == (r != runs[2])
    assert "test_" + NAME in _results(runs[2])["epoch_2"]["classification"]


def test_compress_then_featselect(assets, finished, capsys):
    featselect = _args(assets, finished, "--sparse-mode", "featselect",
                       over=["MODEL.H2T.LRP_COEF", "0.0", "MODEL.H2T.KEEP_FRAC", "0.7"])
    assert train.main(featselect) == 2
    assert "compress run" in capsys.readouterr().err
    assert train.main(_args(assets, finished, "--sparse-mode", "compress",
                            over=["MODEL.H2T.LRP_COEF", "0.0001", "MODEL.H2T.KEEP_FRAC", "1.0"])) == 0
    assert train.main(featselect) == 0
    runs = _runs(finished, "_sparsefinal")
    hp = {r.split("/")[0] for r in runs}
    assert hp == {_runs(finished, "_final")[0].split("/")[0]}  # the un-halved best lr in the folder name
    assert sorted(r.split("/", 1)[1] for r in runs) == sorted(
        [f"compress/run{k}" for k in range(1, 6)] + [f"keep_frac_0.7/run{k}" for k in range(1, 6)])
    base = os.path.join(_task_dir(finished, "_sparsefinal"), hp.pop())
    final_dir = os.path.join(_task_dir(finished, "_final"), _runs(finished, "_final")[0].split("/")[0])
    lr = float(re.match(r"lr(.+?)_", os.path.basename(base)).group(1))
    full = QuerySpec(2, 10).feature_dim(64, 4)
    for k in range(1, len(FINAL_SEEDS) + 1):
        final = torch.load(os.path.join(final_dir, f"run{k}", "last_model.pth"), weights_only=True)["model"]
        comp = torch.load(os.path.join(base, "compress", f"run{k}", "last_model.pth"), weights_only=True)
        sel = torch.load(os.path.join(base, "keep_frac_0.7", f"run{k}", "last_model.pth"), weights_only=True)
        assert torch.equal(comp["model"][QUERY_KEY], final[QUERY_KEY])   # frozen query tokens
        assert torch.equal(sel["model"][QUERY_KEY], final[QUERY_KEY])
        assert comp["model"][HEAD_W].shape == (10, full)
        assert sel["model"][HEAD_W].shape == (10, int(full * 0.7))
        expected = torch.topk(comp["model"][HEAD_W].norm(dim=0), k=int(full * 0.7)).indices
        assert torch.equal(sel["feat_ids"], expected)
        cfg_text = Path(os.path.join(base, "compress", f"run{k}", "config.yaml")).read_text()
        assert f"BASE_LR: {0.5 * lr}" in cfg_text
        assert "test_" + NAME in _results(os.path.join(base, "keep_frac_0.7", f"run{k}"))["epoch_2"]["classification"]


@pytest.mark.parametrize("extra, message", [
    (["DATA.NUMBER_CLASSES", "7"], "has 10 classes"),
    (["MODEL.H2T.KEEP_FRAC", "1"], "MODEL.H2T.KEEP_FRAC"),
    (["SOLVER.NOT_A_KEY", "1"], "unknown config key"),
    (["DATA.NAME", "vtab-eurosat2"], "vtab-eurosat"),
])
def test_bad_input_is_one_clear_line(assets, tmp_path, capsys, extra, message):
    assert train.main(_args(assets, str(tmp_path / "x"), over=extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("key, value, message", [
    ("SOLVER.TOTAL_EPOCH", "0", "SOLVER.TOTAL_EPOCH must be >= 1 (got 0)"),
    ("SOLVER.WARMUP_EPOCH", "3", "SOLVER.WARMUP_EPOCH (3) must be below SOLVER.TOTAL_EPOCH (3)"),
    ("SOLVER.WARMUP_EPOCH", "-1", "SOLVER.WARMUP_EPOCH must be >= 0"),
    ("DATA.BATCH_SIZE", "0", "DATA.BATCH_SIZE must be >= 1"),
    ("ENGINE.EVAL_BATCH_SIZE", "0", "ENGINE.EVAL_BATCH_SIZE must be >= 1"),
    ("MODEL.H2T.DROPOUT", "1.0", "MODEL.H2T.DROPOUT must be in [0, 1)"),
    ("MODEL.H2T.NUM_QUERY_TOKENS", "-1", "MODEL.H2T.NUM_QUERY_TOKENS must be >= 0"),
    ("MODEL.H2T.KEEP_FRAC", "0.0", "MODEL.H2T.KEEP_FRAC must be in (0, 1]"),
    ("MODEL.H2T.KEEP_FRAC", "1.5", "MODEL.H2T.KEEP_FRAC must be in (0, 1]"),
    ("MODEL.H2T.LRP_COEF", "-0.1", "MODEL.H2T.LRP_COEF must be >= 0"),
    ("SOLVER.MOMENTUM", "1.0", "SOLVER.MOMENTUM must be in [0, 1)"),
    ("SOLVER.LOG_EVERY_N", "0", "SOLVER.LOG_EVERY_N must be >= 1"),
    ("SOLVER.BASE_LR", "0.0", "SOLVER.BASE_LR must be > 0"),
    ("SOLVER.WEIGHT_DECAY", "-0.001", "SOLVER.WEIGHT_DECAY must be >= 0"),
    ("DATA.CROPSIZE", "-1", "DATA.CROPSIZE must be >= 0"),
    ("DATA.NUMBER_CLASSES", "1", "DATA.NUMBER_CLASSES must be -1 (unset) or >= 2"),
    ("SEED", "1.5", "SEED must be a whole number (got 1.5)"),
    ("SEED", "abc", "SEED must be a whole number (got abc)"),
])
def test_bad_values_stop_before_anything_is_written(assets, tmp_path, capsys, key, value, message):
    assert train.main(_args(assets, str(tmp_path / "x"), over=[key, value])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_sparsity_launcher_checks_the_fraction(tmp_path):
    for fraction in ("0", "1.5", "abc", "-0.5", "0.7x"):
        p = subprocess.run(["bash", "scripts/VQT/run_vqt_vtab_sparsity.sh", "0", NAME, "10", "1", "adam",
                            "demo_vit_tiny", fraction], cwd=ROOT, capture_output=True, text=True, check=False,
                           env={**os.environ, "PYTHON": "false", "EXP_ROOT": str(tmp_path)})
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr == (f"error: FRACTION '{fraction}' must be a number in (0, 1], e.g. 0.7 "
                            "(the fraction of features kept)\n")


def test_missing_checkpoint_names_the_file(assets, tmp_path, capsys):
    assert train.main(_args(assets, str(tmp_path / "x"), over=["MODEL.WEIGHT_PATH", str(tmp_path / "nope.npz")])) == 2
    assert "nope.npz" in capsys.readouterr().err


def test_launchers_check_their_arguments():
    for script, n in (("scripts/VQT/run_vqt_vtab.sh", 6), ("scripts/VQT/run_vqt_vtab_sparsity.sh", 7)):
        p = subprocess.run(["bash", script, "0"], cwd=ROOT, capture_output=True, text=True, check=False)
        assert p.returncode == 2 and "usage" in p.stderr and len(p.stderr.split("usage:")[1].split()) == n + 2


def _leaves(node, prefix=""):
    return [k for key, v in node.items() for k in (_leaves(v, f"{prefix}{key}.") if isinstance(v, CfgNode)
                                                     else [prefix + key])]


# Keys whose only job is to reject what is not implemented: a value that must stop the run.
REJECTING = {"MODEL.TYPE": "h2t-ssl-vit", "MODEL.MLP_NUM": "1", "SOLVER.LOSS": "sigmoid",
             "SOLVER.PATIENCE": "2", "DATA.MULTILABEL": "True", "DATA.CLASS_WEIGHTS_TYPE": "inv",
             "MODEL.PROMPT.LOCATION": "below", "MODEL.PROMPT.INITIATION": "cls-nolastl",
             "MODEL.PROMPT.NUM_DEEP_LAYERS": "3", "MODEL.PROMPT.DEEP_SHARED": "True",
             "MODEL.PROMPT.VIT_POOL_TYPE": "imgprompt_pool", "MODEL.ADAPTER.STYLE": "Houlsby"}


def test_every_config_key_is_read_or_rejects(assets, tmp_path, monkeypatch, capsys):
    """Walk every key: each is read by the code that runs the protocol (search, finals, compress,
    featselect), validation aside, or its non-default values are rejected with one line."""
    sections = {frozenset(node.keys()): prefix for prefix, node in _sections(get_cfg())}
    used, lookup = set(), CfgNode.__getattr__

    def tracking(self, name):
        caller = sys._getframe(1).f_code
        if not caller.co_filename.endswith("validate.py"):
            used.add(sections.get(frozenset(self.keys()), "?") + name)
        return lookup(self, name)

    monkeypatch.setattr(CfgNode, "__getattr__", tracking)
    out = str(tmp_path / "VQTSup_2_adam")
    assert train.main(_args(assets, out, over=["SOLVER.TOTAL_EPOCH", "2"])) == 0
    epochs = ["SOLVER.TOTAL_EPOCH", "2"]  # the finals' setting: a stage starts only from finals of its own setting
    assert train.main(_args(assets, out, "--sparse-mode", "compress",
                            over=[*epochs, "MODEL.H2T.LRP_COEF", "0.0001"])) == 0
    assert train.main(_args(assets, out, "--sparse-mode", "featselect",
                            over=[*epochs, "MODEL.H2T.KEEP_FRAC", "0.5"])) == 0
    monkeypatch.undo()
    leaves = set(_leaves(get_cfg()))
    assert leaves - used == set(REJECTING)
    capsys.readouterr()  # the training runs' progress bars
    for key, value in REJECTING.items():
        assert train.main(_args(assets, str(tmp_path / "bad"), over=[key, value])) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and key.split(".")[-1] in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "bad_val")


def _sections(node, prefix=""):
    yield prefix, node
    for key, v in node.items():
        if isinstance(v, CfgNode):
            yield from _sections(v, f"{prefix}{key}.")


def test_given_lr_wd_skip_the_search_and_mean_exactly_that(assets, tmp_path):
    out = str(tmp_path / "exp")
    assert train.main(_args(assets, out, "--lr", "0.07", "--wd", "0.001")) == 0
    assert not os.path.exists(out + "_val")
    assert [r.split("/")[0] for r in _runs(out, "_final")] == ["lr0.07_wd0.001_bs128"] * 5
    cfg_text = Path(_task_dir(out, "_final"), "lr0.07_wd0.001_bs128", "run1", "config.yaml").read_text()
    assert "BASE_LR: 0.07" in cfg_text and "WEIGHT_DECAY: 0.001" in cfg_text


def test_a_variant_the_grid_cannot_express_runs_on_the_reference_loop(assets, tmp_path, capsys):
    out = str(tmp_path / "exp")
    over = ["MODEL.H2T.QUERY_ATTENDS_QUERIES", "True", "SOLVER.TOTAL_EPOCH", "2"]
    assert train.main(_args(assets, out, "--lr", "0.05", "--wd", "0.0", over=over)) == 0
    stdout = capsys.readouterr().out
    assert "QUERY_ATTENDS_QUERIES" in stdout and "training on the reference path" in stdout
    assert "final: 5 runs to train on the reference loop" in stdout
    assert len(_runs(out, "_final")) == 5


def test_each_phase_logs_to_its_own_task_log(finished):
    layout = Layout(finished, NAME, "demo_vit_tiny", 128)
    search, final = (Path(layout.task_log(phase)).read_text() for phase in ("search", "final"))
    assert "search: 20 runs to train" in search and "final:" not in search
    assert "final: 5 runs to train" in final and "search:" not in final
    assert all(text.startswith(("[", "command: ")) and "git commit: " in text and "wall time: " in text
               for text in (search, final))


def test_a_cache_that_fits_nowhere_falls_back_to_the_uncached_grid(assets, tmp_path, monkeypatch, capsys):
    def final_logits(out):
        run = os.path.join(_task_dir(out, "_final"), "lr0.07_wd0.001_bs128", "run3")
        return torch.load(os.path.join(run, f"test_{NAME}_logits.pth"), weights_only=True)["joint_logits"]

    cached = str(tmp_path / "cached")
    assert train.main(_args(assets, cached, "--lr", "0.07", "--wd", "0.001",
                            over=["ENGINE.CACHE_LOCATION", "cpu"])) == 0
    monkeypatch.setattr(frozen_mod.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    capsys.readouterr()
    full = str(tmp_path / "full")
    assert train.main(_args(assets, full, "--lr", "0.07", "--wd", "0.001", over=["ENGINE.CACHE_LOCATION", "disk"])) == 0
    stdout = capsys.readouterr().out
    assert "fits neither in memory nor in" in stdout and "ENGINE.CACHE auto trains without it" in stdout
    assert torch.allclose(torch.as_tensor(final_logits(full)), torch.as_tensor(final_logits(cached)), atol=1e-5)
    over = ["ENGINE.CACHE_LOCATION", "disk", "ENGINE.CACHE", "on"]
    assert train.main(_args(assets, str(tmp_path / "on"), "--lr", "0.07", "--wd", "0.001", over=over)) == 2
    assert "error: the frozen-path disk cache needs" in capsys.readouterr().err


@pytest.mark.slow
def test_the_reference_loop_gives_the_grids_results(assets, tmp_path):
    """The whole protocol (search, pick, finals with test; one epoch each) with ENGINE.GRID False: every
    run's results and the finals' test logits equal the stacked engine's (to the grid-vs-reference tolerance)."""
    outs = {}
    for grid in ("True", "False"):
        outs[grid] = str(tmp_path / grid / "VQTSup_2_adam")
        over = ["ENGINE.GRID", grid, "SOLVER.TOTAL_EPOCH", "1", "SOLVER.WARMUP_EPOCH", "0"]
        assert train.main(_args(assets, outs[grid], "--optimizer", "adam", over=over)) == 0
    for suffix in ("_val", "_final"):
        runs = _runs(outs["False"], suffix)
        assert runs == _runs(outs["True"], suffix) and len(runs) == (20 if suffix == "_val" else 5)
        for run in runs:
            ref, grid = (_results(os.path.join(_task_dir(o, suffix), run)) for o in (outs["False"], outs["True"]))
            assert ref.keys() == grid.keys() == {"epoch_0"}
            for split, metrics in ref["epoch_0"]["classification"].items():
                assert metrics == pytest.approx(grid["epoch_0"]["classification"][split], abs=1e-5), (run, split)
    for run in _runs(outs["False"], "_final"):
        ref, grid = (torch.load(os.path.join(_task_dir(o, "_final"), run, f"test_{NAME}_logits.pth"),
                                weights_only=True)["joint_logits"] for o in (outs["False"], outs["True"]))
        torch.testing.assert_close(ref, grid, atol=1e-5, rtol=1e-5)
