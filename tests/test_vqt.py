"""The reference model (src/models/vqt.py): its feature layout, its init, and the query-attends-queries
variant (the query pass itself against a masked-attention peer: tests/test_model.py)."""
from __future__ import annotations

import math

import torch

from src.models.petl import token_init_bound
from src.models.vqt import COMBINE_KEY, HEAD_B, HEAD_BIAS, HEAD_W, QUERY_KEY, VQT, QuerySpec


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_features_are_the_final_feature_then_one_normalised_part_per_layer(tiny_arch, tiny_backbone):
    """Head input = [pooled final feature, layer 1's Q outputs, ..., layer L's], each part of unit norm."""
    bb = tiny_backbone()
    q, d = 3, tiny_arch.embed_dim
    model = VQT(bb, QuerySpec(q, 4))
    model.reset_parameters(torch.Generator().manual_seed(0))
    x = _images(2)
    with torch.no_grad():
        feats = model.features(x)
        final, kvs = bb.frozen_pass(x)
        outs = [blk.query(model.query_tokens[i].expand(2, -1, -1), k, v) for i, (blk, (k, v)) in
                enumerate(zip(bb.blocks, kvs))]
    assert feats.shape == (2, QuerySpec(q, 4).feature_dim(d, tiny_arch.depth)) == (2, d + tiny_arch.depth * q * d)
    parts = [final, *(o.flatten(1) for o in outs)]
    expected = torch.cat([p / p.norm(dim=-1, keepdim=True) for p in parts], dim=-1)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)


def test_reset_parameters_is_the_originals_init(tiny_backbone):
    bb = tiny_backbone()
    model = VQT(bb, QuerySpec(5, 4, weighted_sum=True))
    model.reset_parameters(torch.Generator().manual_seed(0))
    named = model.named_trained()
    assert set(named) == {QUERY_KEY, COMBINE_KEY, HEAD_W, HEAD_B}
    v = token_init_bound(bb.arch.patch_size, bb.embed_dim)
    assert v == math.sqrt(6 / (3 * 8 ** 2 + 32))
    assert named[QUERY_KEY].abs().max() <= v and named[QUERY_KEY].abs().max() > 0.8 * v
    assert torch.all(named[HEAD_B] == HEAD_BIAS) and torch.all(named[COMBINE_KEY] == 1)
    again = VQT(bb, QuerySpec(5, 4, weighted_sum=True))
    again.reset_parameters(torch.Generator().manual_seed(0))
    assert all(torch.equal(t, again.named_trained()[k]) for k, t in named.items())


def test_queries_attending_queries_is_a_different_model(tiny_backbone):
    bb = tiny_backbone()
    x = _images(2)
    plain, variant = VQT(bb, QuerySpec(3, 4)), VQT(bb, QuerySpec(3, 4, attend_queries=True))
    for m in (plain, variant):
        m.reset_parameters(torch.Generator().manual_seed(0))
    assert not torch.allclose(plain(x), variant(x))
