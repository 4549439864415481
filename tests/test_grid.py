"""The stacked engine is an optimisation of the reference loop: runs trained together in the grid
(cached frozen path, fused seed groups) equal the same runs trained alone by `fit` on a `VQT`
with torch.optim and nn.Dropout: parameters and val/test logits to 1e-5."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from src.configs.defaults import load_cfg
from src.data.loader import ImageSet
from src.engine.fit import fit
from src.engine.frozen import FrozenFeatures
from src.engine.grid import fit_grid, passes
from src.engine.record import RunRecord
from src.engine.runs import Recipe, Run, SplitStream, TaskData
from src.models.checkpoints import load_backbone, write_random_npz
from src.models.vit import VisionTransformer
from src.models.vqt import HEAD_W, QUERY_KEY, VQT, Members, QuerySpec
from src.utils.layout import RunDir

CPU = torch.device("cpu")
NAME = "vtab-eurosat"
# (lr, wd, seed): two runs sharing seed 1's batches, then seeds 2-4 each on its own batches (one fused pass)
RUNS = [(0.01, 0.0, 1), (0.05, 0.01, 1), (0.02, 0.001, 2), (0.03, 0.0, 3), (0.01, 0.01, 4)]


def _images(n: int, seed: int) -> ImageSet:
    """Images of varied sizes whose label (0..3) sets the colour of a noisy image."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]])
    imgs = [np.clip(colours[y] + rng.normal(0, 40, size=(rng.integers(20, 48), rng.integers(20, 48), 3)), 0, 255)
            .astype(np.uint8) for y in labels]
    return ImageSet(images=imgs, labels=labels.astype(np.int64))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("w") / "tiny.npz")
    return path


def _backbone(arch, path, embed_dropout=0.0) -> VisionTransformer:
    model = VisionTransformer(arch, img_size=32, embed_dropout=embed_dropout)
    load_backbone(model, path, "npz")
    return model.eval().requires_grad_(False)


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


def _both(tmp_path, arch, path, spec, recipe, cfg, *, embed_dropout=0.0, start=None, feat_ids=None, specs=RUNS):
    """Train `specs` in the grid and each alone on the reference loop; return both runs' outputs."""
    images, test = _images(60, 0), _images(20, 1)
    bb = _backbone(arch, path, embed_dropout)
    frozen = FrozenFeatures(bb, images, 32, CPU, cache=embed_dropout == 0, batch_size=16)
    grid = _runs(tmp_path / "grid", specs, start, feat_ids)
    jobs = [(r, RunRecord(r, cfg, save_ckpt=True)) for r in grid]
    for (_, rec), ckpt in zip(jobs, fit_grid(spec, frozen, jobs, recipe, _data(images, test), 10.0)):
        rec.finish(ckpt)
    alone = _runs(tmp_path / "alone", specs, start, feat_ids)
    for r in alone:
        model = VQT(_backbone(arch, path, embed_dropout), spec, r.feat_ids)
        rec = RunRecord(r, cfg, save_ckpt=True)
        fit(model, r, recipe, _data(images, test), rec)
        rec.finish(model.trained_state())
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


@pytest.fixture(scope="module")
def tiny(weights):
    from src.configs.vit_configs import ViTArch
    arch = ViTArch(patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_dim=64)
    write_random_npz(weights, arch, img_size=32, seed=3)
    return arch, weights


@pytest.mark.parametrize("case", list(CASES))
def test_grid_equals_reference(tmp_path, tiny, case):
    over, spec_over = CASES[case]
    cfg = _cfg(**over)
    spec = QuerySpec(**{"num_queries": 2, "num_classes": 4, "dropout": 0.1, **spec_over})
    _assert_equal(*_both(tmp_path, *tiny, spec, Recipe.from_cfg(cfg), cfg))


def test_grid_equals_reference_uncached_with_embedding_dropout(tmp_path, tiny):
    cfg = _cfg()
    spec = QuerySpec(2, 4, dropout=0.1)
    _assert_equal(*_both(tmp_path, *tiny, spec, Recipe.from_cfg(cfg), cfg, embed_dropout=0.1))


def _starts(arch, n):
    gen = torch.Generator().manual_seed(9)
    return [{QUERY_KEY: torch.randn(arch.depth, 2, arch.embed_dim, generator=gen) * 0.1} for _ in range(n)]


def test_grid_equals_reference_compress(tmp_path, tiny):
    """Frozen query tokens from a checkpoint, head with the group lasso on its columns."""
    arch, _ = tiny
    cfg = _cfg()
    spec = QuerySpec(2, 4, dropout=0.1)
    recipe = Recipe.from_cfg(cfg, lrp_coef=0.05, freeze_queries=True)
    starts = _starts(arch, len(RUNS))
    grid, alone = _both(tmp_path, *tiny, spec, recipe, cfg, start=starts)
    _assert_equal(grid, alone)
    for g, s in zip(grid, starts):
        assert torch.equal(g[QUERY_KEY], s[QUERY_KEY])


def test_grid_equals_reference_featselect(tmp_path, tiny):
    arch, _ = tiny
    cfg = _cfg()
    spec = QuerySpec(2, 4, dropout=0.1)
    full = spec.feature_dim(arch.embed_dim, arch.depth)
    ids = [torch.randperm(full, generator=torch.Generator().manual_seed(i))[:full // 3] for i in range(len(RUNS))]
    recipe = Recipe.from_cfg(cfg, freeze_queries=True)
    grid, alone = _both(tmp_path, *tiny, spec, recipe, cfg, start=_starts(arch, len(RUNS)), feat_ids=ids)
    _assert_equal(grid, alone)
    assert grid[0][HEAD_W].shape == (4, full // 3)


def test_members_compute_each_vqt(tiny):
    """Forward of a freshly reset stack equals each member's own VQT (train mode off)."""
    arch, path = tiny
    bb = _backbone(arch, path)
    spec = QuerySpec(3, 4, weighted_sum=True)
    members = Members(bb, spec, [1, 1, 5])
    members.reset(CPU)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    feat, kvs = bb.frozen_pass(x)
    stacked = members(feat, kvs)
    for g, seed in enumerate([1, 1, 5]):
        one = VQT(bb, spec)
        one.reset_parameters(torch.Generator().manual_seed(seed))
        torch.testing.assert_close(stacked[:, g], one(x).detach(), atol=1e-5, rtol=1e-5)


def test_queries_attending_queries_is_a_different_model(tiny):
    """The variant changes the computation, and the stacked engine refuses it."""
    arch, path = tiny
    bb = _backbone(arch, path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain, variant = VQT(bb, QuerySpec(3, 4)), VQT(bb, QuerySpec(3, 4, attend_queries=True))
    for m in (plain, variant):
        m.reset_parameters(torch.Generator().manual_seed(0))
    assert not torch.allclose(plain(x), variant(x))
    assert not QuerySpec(3, 4, attend_queries=True).stackable
    with pytest.raises(ValueError):
        Members(bb, QuerySpec(3, 4, attend_queries=True), [0])


def test_seed_groups_of_equal_size_share_a_pass():
    seeds = [1, 1, 2, 3, 4, 4, 5, 5, 6, 6]
    ps = passes(seeds, max_groups=2)
    assert [(p.members.start, p.members.stop) for p in ps] == [(0, 2), (2, 4), (4, 8), (8, 10)]
    assert [g.initial_seed() for p in ps for g in p.shuffles] == [1, 2, 3, 4, 5, 6]
