"""The baselines through the same protocol as VQT (tune_vtab.py and scripts/VPT/run_vpt_vtab.sh) on a genuine
on-disk TFDS task and a random .npz backbone: grids per type, the engine each runs on, identity of the new keys,
and one-line errors for settings a method does not read."""
from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import collect_demo_exp_results as collect
import train
from src.configs.vit_configs import MODEL_ZOO
from src.engine.protocol import FINAL_SEEDS
from src.models.inference import load_model
from src.utils.layout import Layout, RunDir

NAME = "vtab-eurosat"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(assets, out, method: dict, *flags: str) -> list[str]:
    opts = {"DATA.FEATURE": "demo_vit_tiny", "DATA.NAME": NAME, "DATA.NUMBER_CLASSES": 10,
            "DATA.DATAPATH": assets / "data", "MODEL.WEIGHT_PATH": assets / "demo.npz", "OUTPUT_DIR": out,
            "DATA.CROPSIZE": 32, "SOLVER.TOTAL_EPOCH": 2, "SOLVER.WARMUP_EPOCH": 1, "DATA.BATCH_SIZE": 128,
            **method}
    return ["--config-file", os.path.join(ROOT, "configs/vpt/vtab.yaml"), "--optimizer", "adam", *flags,
            *[str(x) for kv in opts.items() for x in kv]]


def _done(out: str, phase: str) -> list[str]:
    base = Layout(out, NAME, "demo_vit_tiny", 128).task_dir(phase)
    return sorted(os.path.relpath(d, base) for d, _, files in os.walk(base) if "DONE" in files)


def test_linear_searches_its_grid_on_the_stacked_engine_then_trains_five_seeds(assets, tmp_path, capsys):
    out = str(tmp_path / "exp")
    assert train.main(_args(assets, out, {"MODEL.TRANSFER_TYPE": "linear"})) == 0
    assert {s.split("/")[0] for s in _done(out, "search")} == {
        f"lr{lr}_wd{wd}_bs128" for lr in (0.5, 0.25, 0.125, 0.05, 0.025) for wd in (0.01, 0.001, 0.0001, 0.0)}
    assert [f.split("/")[1] for f in _done(out, "final")] == [f"run{k + 1}" for k in range(len(FINAL_SEEDS))]
    assert "search: 20 runs to train on the stacked engine" in capsys.readouterr().out


@pytest.mark.parametrize("method", [
    {"MODEL.TRANSFER_TYPE": "prompt", "MODEL.PROMPT.DEEP": True, "MODEL.PROMPT.NUM_TOKENS": 3},
    {"MODEL.TRANSFER_TYPE": "vqt+lora", "MODEL.H2T.NUM_QUERY_TOKENS": 1},
])
def test_types_that_train_inside_the_backbone_run_on_the_reference_loop(assets, tmp_path, capsys, method):
    out = str(tmp_path / "exp")
    short = {"SOLVER.TOTAL_EPOCH": 1, "SOLVER.WARMUP_EPOCH": 0}
    assert train.main(_args(assets, out, {**method, **short}, "--lr", "0.001", "--wd", "0.0")) == 0
    finals = _done(out, "final")
    assert len(finals) == len(FINAL_SEEDS)
    assert "final: 5 runs to train on the reference loop" in capsys.readouterr().out
    ckpt = torch.load(os.path.join(Layout(out, NAME, "demo_vit_tiny", 128).task_dir("final"), finals[0],
                                   "last_model.pth"), weights_only=True)["model"]
    trained = {"prompt": "enc.prompts.embeddings", "vqt+lora": "enc.transformer.encoder.query_prompt_embeddings"}
    assert trained[method["MODEL.TRANSFER_TYPE"]] in ckpt
    run = RunDir(os.path.join(Layout(out, NAME, "demo_vit_tiny", 128).task_dir("final"), finals[0]))
    done = run.record
    arch = MODEL_ZOO["demo_vit_tiny"].arch
    own = {"prompt": arch.depth * 3 * arch.embed_dim,  # deep prompts: 3 per layer
           "vqt+lora": arch.depth * (arch.embed_dim + 2 * 2 * 8 * arch.embed_dim)}[method["MODEL.TRANSFER_TYPE"]]
    assert done["trainable_params_without_head"] == own == sum(
        v.numel() for k, v in ckpt.items() if not k.startswith("head."))
    assert done["trainable_params"] > own and done["seconds_per_epoch"] > 0 and done["peak_memory_bytes"] > 0
    named = load_model(run.path).model.named_trained()  # the run loads back, adaptation included, for predict.py
    assert set(named) == set(ckpt) and all(torch.equal(named[k], ckpt[k]) for k in ckpt)


def test_a_changed_method_key_is_named_and_a_foreign_one_refused(assets, tmp_path, capsys):
    out = str(tmp_path / "exp")
    method = {"MODEL.TRANSFER_TYPE": "adaptformer"}
    method = {**method, "SOLVER.TOTAL_EPOCH": 1, "SOLVER.WARMUP_EPOCH": 0}
    assert train.main(_args(assets, out, method, "--lr", "0.001", "--wd", "0.0")) == 0
    assert train.main(_args(assets, out, {**method, "MODEL.ADAPTFORMER.SCALE": 0.5}, "--lr", "0.001",
                            "--wd", "0.0")) == 2
    assert "MODEL.ADAPTFORMER.SCALE 0.1 -> 0.5" in capsys.readouterr().err
    assert train.main(_args(assets, out, {**method, "MODEL.LORA.RANK": 4})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and "MODEL.LORA.RANK is set but MODEL.TRANSFER_TYPE adaptformer does not use it" in err[-1]
    assert train.main(_args(assets, out, {"MODEL.TRANSFER_TYPE": "prompt", "MODEL.PROMPT.LOCATION": "below"})) == 2
    assert "MODEL.PROMPT.LOCATION 'below' is not one of 'prepend'" in capsys.readouterr().err


def test_launcher_runs_a_prompt_baseline_and_rejects_unknown_types(assets, tmp_path):
    env = {**os.environ, "EXP_ROOT": str(tmp_path / "exp"), "PYTHON": sys.executable, "DATA_PATH": str(assets / "data"),
           "VQT_EXTRA_OPTS": f"MODEL.WEIGHT_PATH {assets / 'demo.npz'} DATA.CROPSIZE 32 "
                             "SOLVER.WARMUP_EPOCH 0 SOLVER.TOTAL_EPOCH 1 SOLVER.BASE_LR 0.1 SOLVER.WEIGHT_DECAY 0.0"}
    cmd = ["bash", "scripts/VPT/run_vpt_vtab.sh", "0", NAME, "10", "prompt-deep", "adam", "demo_vit_tiny", "4"]
    r = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = str(tmp_path / "exp" / "prompt-deep4_adam")
    assert len(_done(out, "final")) == len(FINAL_SEEDS)
    bad = subprocess.run([*cmd[:5], "vpt", *cmd[6:]], check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: TRAIN_TYPE 'vpt'")


def test_collector_prints_a_method_by_task_table(assets, tmp_path, capsys):
    root = tmp_path / "exp"
    short = {"SOLVER.TOTAL_EPOCH": 1, "SOLVER.WARMUP_EPOCH": 0}
    methods = {"linear_adam": {"MODEL.TRANSFER_TYPE": "linear"},
               "prompt-deep3_adam": {"MODEL.TRANSFER_TYPE": "prompt", "MODEL.PROMPT.DEEP": True,
                                     "MODEL.PROMPT.NUM_TOKENS": 3}}
    for setting, method in methods.items():
        assert train.main(_args(assets, str(root / setting), {**method, **short}, "--lr", "0.01", "--wd", "0.0")) == 0
    capsys.readouterr()
    assert collect.main(["--methods", "--root", str(root), "--feature", "demo_vit_tiny", "--tasks", NAME]) == 0
    with open(root / "results" / f"results_methods_demo_vit_tiny_1tasks-{_digest()}.csv") as f:
        rows = {r[0]: r for r in csv.reader(f)}
    assert set(rows) == {"method", "linear_adam_final", "prompt-deep3_adam_final"}
    for setting in methods:
        out = str(root / setting)
        runs = [RunDir(os.path.join(Layout(out, NAME, "demo_vit_tiny", 128).task_dir("final"), d)) for d in
                _done(out, "final")]
        top1 = sum(r.top1(f"test_{NAME}") for r in runs) * 100 / len(runs)
        params = runs[0].record["trainable_params_without_head"]
        row = rows[f"{setting}_final"]
        assert row[1] == f"{top1:.1f}" and row[-2] == f"{params / 1e6:.3f}" and float(row[-1]) > 0
    assert rows["linear_adam_final"][-2] == "0.000"
    assert "prompt-deep3_adam_final" in capsys.readouterr().out


def _digest() -> str:
    return hashlib.sha1(NAME.encode()).hexdigest()[:6]


def test_an_interrupted_baseline_run_is_redone_alone_and_equals_the_uninterrupted_one(assets, tmp_path, capsys):
    out = str(tmp_path / "exp")
    method = {"MODEL.TRANSFER_TYPE": "prompt", "MODEL.PROMPT.NUM_TOKENS": 2, "SOLVER.TOTAL_EPOCH": 1,
              "SOLVER.WARMUP_EPOCH": 0}
    args = _args(assets, out, method, "--lr", "0.01", "--wd", "0.0")
    assert train.main(args) == 0
    runs = [RunDir(os.path.join(Layout(out, NAME, "demo_vit_tiny", 128).task_dir("final"), d))
            for d in _done(out, "final")]
    clean = Path(runs[1].results_file).read_bytes(), Path(runs[1].checkpoint_file).read_bytes()
    os.remove(runs[1].file("DONE"))  # as a kill before DONE leaves it
    capsys.readouterr()
    assert train.main(args) == 0
    assert "final: 1 runs to train on the reference loop, 4 finished with the same settings" in capsys.readouterr().out
    assert (Path(runs[1].results_file).read_bytes(), Path(runs[1].checkpoint_file).read_bytes()) == clean
