"""The stacked engine's model (src/engine/members.py) against the reference `VQT`: each member computes
its own VQT, seed groups on their own row ranges equal one pass per group, and `dropout_mask` is the
mask nn.Dropout draws (the grid-vs-reference training equality: tests/test_grid.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from src.engine.members import Members, dropout_mask
from src.models.vqt import VQT, QuerySpec

CPU = torch.device("cpu")


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_members_compute_each_vqt(tiny_backbone):
    """Forward of a freshly reset stack equals each member's own VQT (train mode off)."""
    bb = tiny_backbone()
    spec = QuerySpec(3, 4, weighted_sum=True)
    members = Members(bb, spec, [1, 1, 5])
    members.reset(CPU)
    x = _images(6)
    feat, kvs = bb.frozen_pass(x)
    stacked = members(feat, kvs)
    for g, seed in enumerate([1, 1, 5]):
        one = VQT(bb, spec)
        one.reset_parameters(torch.Generator().manual_seed(seed))
        torch.testing.assert_close(stacked[:, g], one(x).detach(), atol=1e-5, rtol=1e-5)


def test_members_refuse_queries_attending_queries(tiny_backbone):
    assert not QuerySpec(3, 4, attend_queries=True).stackable
    with pytest.raises(ValueError, match="queries attending to queries"):
        Members(tiny_backbone(), QuerySpec(3, 4, attend_queries=True), [0])


@pytest.mark.parametrize("option", ["concat", "pooling", "weighted_sum", "feat_ids"])
def test_seed_groups_in_one_pass_equal_one_pass_per_group(tiny_arch, tiny_backbone, option):
    """`groups=n`: row range j, seen only by seed group j, gets the logits group j gives it alone."""
    bb = tiny_backbone()
    n, m, q, d, depth, b = 3, 2, 2, tiny_arch.embed_dim, tiny_arch.depth, 4
    spec = QuerySpec(q, 5, pooling=option == "pooling", weighted_sum=option == "weighted_sum")
    full = spec.feature_dim(d, depth)
    ids = torch.stack([torch.randperm(full, generator=torch.Generator().manual_seed(g))[:full // 2]
                       for g in range(n * m)]) if option == "feat_ids" else None
    model = Members(bb, spec, list(range(n * m)), feat_ids=ids)
    model.reset(CPU)
    if model.combine is not None:
        with torch.no_grad():
            model.combine.uniform_(0.5, 1.5)
    feat, kvs = bb.frozen_pass(_images(n * b))
    fused = model(feat, kvs, groups=n)
    assert fused.shape == (n * b, m, 5)
    for j in range(n):
        rows = slice(j * b, (j + 1) * b)
        alone = model(feat[rows], [(k[rows], v[rows]) for k, v in kvs], slice(j * m, (j + 1) * m))
        torch.testing.assert_close(fused[rows], alone, atol=1e-5, rtol=1e-5)


def _assert_dropout_mask_is_nn_dropouts(device: torch.device) -> None:
    shape, p = (4, 3, 5, 8), 0.3
    mask = dropout_mask(shape, p, torch.Generator(device=device).manual_seed(7))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(7)
        dropped = nn.Dropout(p).train()(torch.ones(shape, device=device))
    assert 0 < (mask == 0).float().mean() < 0.6
    torch.testing.assert_close(mask, dropped, rtol=0, atol=0)


def test_dropout_mask_is_nn_dropouts_on_the_cpu():
    _assert_dropout_mask_is_nn_dropouts(CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dropout_mask_is_nn_dropouts_on_cuda():
    _assert_dropout_mask_is_nn_dropouts(torch.device("cuda"))
