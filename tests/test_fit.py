"""The reference training loop (src/engine/fit.py) through `train_phase`, against the stacked engine:
learning, divergence, TensorBoard scalars, TF32 and bf16 autocast (per-option equality: tests/test_grid.py)."""
from __future__ import annotations

import os

import torch

from src.configs.defaults import load_cfg
from src.engine.frozen import FrozenFeatures
from src.engine.record import RunRecord
from src.engine.runs import Recipe, Run, TaskData
from src.engine.train import Engine, train_phase
from src.models.vqt import QuerySpec
from src.utils.layout import RunDir

CPU = torch.device("cpu")


def _cfg(**over):
    opts = dict({"DATA.NAME": "vtab-eurosat", "DATA.NUMBER_CLASSES": 4, "DATA.BATCH_SIZE": 16, "DATA.CROPSIZE": 32,
                 "SOLVER.TOTAL_EPOCH": 3, "SOLVER.WARMUP_EPOCH": 1, "SOLVER.OPTIMIZER": "adam",
                 "MODEL.H2T.NUM_QUERY_TOKENS": 2, "MODEL.H2T.DROPOUT": 0.1, "ENGINE.EVAL_BATCH_SIZE": 32}, **over)
    return load_cfg("", [str(x) for kv in opts.items() for x in kv])


def _train(cfg, tiny_vit, tiny_images, specs, root, grid=True):
    """Train `specs` (lr, wd, seed) through `train_phase` on the stacked engine or the reference loop: the
    finished runs' checkpoints and every run's results."""
    spec = QuerySpec.from_cfg(cfg)
    engine = Engine.stacked(spec, FrozenFeatures(tiny_vit, tiny_images, 32, CPU, cache=True)) if grid else \
        Engine.reference(spec, tiny_vit)
    runs = [Run(RunDir(str(root / f"m{i}")), lr, wd, seed) for i, (lr, wd, seed) in enumerate(specs)]
    data = TaskData(tiny_images, torch.arange(40), torch.arange(40, 60), 32, CPU)
    train_phase([(r, RunRecord(r, cfg, save_ckpt=True)) for r in runs], Recipe.from_cfg(cfg), data, engine)
    return [r.dir.load_checkpoint()["model"] for r in runs if r.dir.record["status"] == "ok"], \
        [r.dir.load_results() for r in runs]


def test_the_grid_learns_as_the_reference_loop(tiny_vit, tiny_images, tmp_path):
    cfg = _cfg(**{"SOLVER.TOTAL_EPOCH": 15, "SOLVER.WARMUP_EPOCH": 2, "MODEL.H2T.DROPOUT": 0.0})
    grid, res = _train(cfg, tiny_vit, tiny_images, [(0.05, 0.0, 5)], tmp_path / "grid")
    ref, _ = _train(cfg, tiny_vit, tiny_images, [(0.05, 0.0, 5)], tmp_path / "ref", grid=False)
    _assert_close(grid[0], ref[0])
    first = res[0]["epoch_0"]["classification"]["val_vtab-eurosat"]["top1"]
    last = res[0]["epoch_14"]["classification"]["val_vtab-eurosat"]["top1"]
    assert last > max(first, 0.4)


def test_a_diverged_run_is_recorded_alike_on_both_engines_and_others_finish(tiny_vit, tiny_images, tmp_path):
    """A NaN loss stops its run (DONE "diverged", at the same epoch and step on both engines, no checkpoint);
    the other run of its seed group finishes, equal to the reference's."""
    cfg = _cfg()
    done = {}
    for grid in (True, False):
        root = tmp_path / str(grid)
        ckpts, _ = _train(cfg, tiny_vit, tiny_images, [(0.01, 0.0, 1), (1e38, 0.0, 1)], root, grid)
        ok, bad = RunDir(str(root / "m0")).record, RunDir(str(root / "m1")).record
        assert ok["status"] == "ok" and ok["epochs"] == 3 and len(ckpts) == 1
        assert bad["status"] == "diverged" and bad["message"].startswith("loss is nan at epoch ")
        assert "NaN loss" in (root / "m1" / "logs.txt").read_text()
        assert not os.path.exists(RunDir(str(root / "m1")).checkpoint_file)
        done[grid] = bad, ckpts[0]
    assert done[True][0]["message"] == done[False][0]["message"]
    _assert_close(done[True][1], done[False][1])


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], atol=1e-5, rtol=1e-5, msg=k)


def test_tensorboard_scalars(tiny_vit, tiny_images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(**{"ENGINE.TENSORBOARD": True})
    _train(cfg, tiny_vit, tiny_images, [(0.01, 0.0, 1)], tmp_path)
    acc = EventAccumulator(str(tmp_path / "m0" / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr", "val/top1"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("val/top1")] == [0, 1, 2]
    assert acc.Scalars("train/lr")[0].value == 0.0


def test_tf32_and_bf16_autocast_switches(tiny_vit, tiny_images, tmp_path):
    """ENGINE.TF32 changes nothing on the CPU (the grid still equals the fp32 reference loop) and is
    restored after; ENGINE.AUTOCAST bf16 trains within bf16 rounding of the fp32 reference (drift measured in
    benchmarks/README.md). Its values are checked by validate (tests/test_validate.py)."""
    spec = [(0.05, 0.0, 5)]
    ref, _ = _train(_cfg(), tiny_vit, tiny_images, spec, tmp_path / "fp32", grid=False)
    tf32, _ = _train(_cfg(**{"ENGINE.TF32": True}), tiny_vit, tiny_images, spec, tmp_path / "tf32")
    _assert_close(ref[0], tf32[0])
    assert not torch.backends.cuda.matmul.allow_tf32
    bf16, _ = _train(_cfg(**{"ENGINE.AUTOCAST": "bf16"}), tiny_vit, tiny_images, spec, tmp_path / "bf16")
    drift = max((ref[0][k] - bf16[0][k]).abs().max().item() for k in ref[0])
    assert 0 < drift < 0.05
