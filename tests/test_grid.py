"""The stacked engine is an optimisation of the reference loop: runs trained together in the grid
(cached frozen path, fused seed groups) equal the same runs trained alone by `fit` on a `VQT`
with torch.optim and nn.Dropout, both through `train_phase`: parameters and val/test logits to 1e-5."""
from __future__ import annotations

import pytest
import torch

from src.configs.defaults import load_cfg
from src.data.loader import ImageSet
from src.engine.frozen import FrozenFeatures
from src.engine.grid import passes
from src.engine.record import RunRecord
from src.engine.runs import Recipe, Run, SplitStream, TaskData
from src.engine.train import Engine, train_phase
from src.models.vqt import HEAD_W, QUERY_KEY, QuerySpec
from src.utils.layout import RunDir

CPU = torch.device("cpu")
NAME = "vtab-eurosat"
# (lr, wd, seed): two runs sharing seed 1's batches, then seeds 2-4 each on its own batches (one fused pass)
RUNS = [(0.01, 0.0, 1), (0.05, 0.01, 1), (0.02, 0.001, 2), (0.03, 0.0, 3), (0.01, 0.01, 4)]


def _cfg(**over):
    opts = dict({"DATA.NAME": NAME, "DATA.NUMBER_CLASSES": 4, "DATA.BATCH_SIZE": 16, "DATA.CROPSIZE": 32,
                 "SOLVER.TOTAL_EPOCH": 3, "SOLVER.WARMUP_EPOCH": 1, "SOLVER.OPTIMIZER": "adam",
                 "ENGINE.EVAL_BATCH_SIZE": 16}, **over)
    return load_cfg("", [str(x) for kv in opts.items() for x in kv])


def _data(images: ImageSet, test: ImageSet) -> TaskData:
    def stream() -> SplitStream:
        return SplitStream(len(test), ((test.images[i:i + 16], test.labels[i:i + 16]) for i in range(0, len(test), 16)))
    return TaskData(images, torch.arange(40), torch.arange(40, 60), 32, CPU, stream)


def _outputs(run: Run) -> dict[str, torch.Tensor]:
    d = run.dir
    out = dict(d.load_checkpoint()["model"])
    for split in ("val", "test"):
        out[split] = torch.load(d.logits_file(f"{split}_{NAME}"), weights_only=True)["joint_logits"]
    assert d.record["status"] == "ok"
    return out


def _runs(root, specs, start=None, feat_ids=None) -> list[Run]:
    return [Run(RunDir(str(root / f"run{i}")), lr, wd, seed, start=None if start is None else start[i],
                feat_ids=None if feat_ids is None else feat_ids[i]) for i, (lr, wd, seed) in enumerate(specs)]


def _both(tmp_path, backbone, spec, recipe, cfg, *, images, embed_dropout=0.0, start=None, feat_ids=None,
          specs=RUNS):
    """Train `specs` in the grid and each alone on the reference loop; return both runs' outputs."""
    train, test = images(60, 0), images(20, 1)
    frozen = FrozenFeatures(backbone(embed_dropout), train, 32, CPU, cache=embed_dropout == 0, batch_size=16)
    grid, alone = _runs(tmp_path / "grid", specs, start, feat_ids), _runs(tmp_path / "alone", specs, start, feat_ids)
    engines = Engine.stacked(spec, frozen), Engine.reference(spec, backbone(embed_dropout))
    for runs, engine in zip((grid, alone), engines):
        train_phase([(r, RunRecord(r, cfg, save_ckpt=True)) for r in runs], recipe, _data(train, test), engine)
    return [_outputs(r) for r in grid], [_outputs(r) for r in alone]


def _assert_equal(grid, alone):
    for g, a in zip(grid, alone):
        assert g.keys() == a.keys()
        for key in g:
            torch.testing.assert_close(g[key], a[key], atol=1e-5, rtol=1e-5, msg=key)
    assert not torch.allclose(grid[0][HEAD_W], grid[2][HEAD_W])  # different seeds, different runs


CASES = {
    "adam": ({}, {}),
    "sgd": ({"SOLVER.OPTIMIZER": "sgd"}, {}),
    "pooling": ({}, {"pooling": True}),
    "weighted_sum": ({}, {"weighted_sum": True}),
    "q0": ({}, {"num_queries": 0, "dropout": 0.0}),
    "no_normalize": ({}, {"normalize": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grid_equals_reference(tmp_path, tiny_backbone, colour_images, case):
    over, spec_over = CASES[case]
    cfg = _cfg(**over)
    spec = QuerySpec(**{"num_queries": 2, "num_classes": 4, "dropout": 0.1, **spec_over})
    _assert_equal(*_both(tmp_path, tiny_backbone, spec, Recipe.from_cfg(cfg), cfg, images=colour_images))


def test_grid_equals_reference_uncached_with_embedding_dropout(tmp_path, tiny_arch, tiny_backbone, colour_images):
    cfg = _cfg()
    spec = QuerySpec(2, 4, dropout=0.1)
    _assert_equal(*_both(tmp_path, tiny_backbone, spec, Recipe.from_cfg(cfg), cfg, images=colour_images,
                         embed_dropout=0.1))


def _starts(arch, n):
    gen = torch.Generator().manual_seed(9)
    return [{QUERY_KEY: torch.randn(arch.depth, 2, arch.embed_dim, generator=gen) * 0.1} for _ in range(n)]


def test_grid_equals_reference_compress(tmp_path, tiny_arch, tiny_backbone, colour_images):
    """Frozen query tokens from a checkpoint, head with the group lasso on its columns."""
    cfg, starts = _cfg(), _starts(tiny_arch, len(RUNS))
    recipe = Recipe.from_cfg(cfg, lrp_coef=0.05, freeze_queries=True)
    grid, alone = _both(tmp_path, tiny_backbone, QuerySpec(2, 4, dropout=0.1), recipe, cfg, images=colour_images,
                        start=starts)
    _assert_equal(grid, alone)
    for g, s in zip(grid, starts):
        assert torch.equal(g[QUERY_KEY], s[QUERY_KEY])


def test_grid_equals_reference_featselect(tmp_path, tiny_arch, tiny_backbone, colour_images):
    arch = tiny_arch
    cfg = _cfg()
    spec = QuerySpec(2, 4, dropout=0.1)
    full = spec.feature_dim(arch.embed_dim, arch.depth)
    ids = [torch.randperm(full, generator=torch.Generator().manual_seed(i))[:full // 3] for i in range(len(RUNS))]
    recipe = Recipe.from_cfg(cfg, freeze_queries=True)
    grid, alone = _both(tmp_path, tiny_backbone, spec, recipe, cfg, images=colour_images,
                        start=_starts(arch, len(RUNS)), feat_ids=ids)
    _assert_equal(grid, alone)
    assert grid[0][HEAD_W].shape == (4, full // 3)


def test_seed_groups_of_equal_size_share_a_pass():
    seeds = [1, 1, 2, 3, 4, 4, 5, 5, 6, 6]
    ps = passes(seeds, max_groups=2)
    assert [(p.members.start, p.members.stop) for p in ps] == [(0, 2), (2, 4), (4, 8), (8, 10)]
    assert [g.initial_seed() for p in ps for g in p.shuffles] == [1, 2, 3, 4, 5, 6]
