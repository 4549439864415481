"""Checks against peer implementations shared by several test modules."""
from __future__ import annotations

import torch


def check_query_pass(ours, peer, x: torch.Tensor, normed: torch.Tensor, q: int = 3) -> tuple[torch.Tensor, ...]:
    """Our query pass (`frozen_pass`, then `Block.query` per layer) against timm's blocks with the queries
    prepended to each block's input and masked from every attention (no token may attend to a query
    position); `normed` is `x` normalised for the peer. Returns our final feature and the peer's last tokens."""
    tokens = torch.randn(len(x), ours.depth, q, ours.embed_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feat, kvs = ours.frozen_pass(x)
        outs = [blk.query(tokens[:, i], k, v) for i, (blk, (k, v)) in enumerate(zip(ours.blocks, kvs))]
        h = peer.norm_pre(peer._pos_embed(peer.patch_embed(normed)))
        mask = torch.zeros(q + h.shape[1], q + h.shape[1])
        mask[:, :q] = float("-inf")
        for layer, (blk, out) in enumerate(zip(peer.blocks, outs)):
            y = blk(torch.cat([tokens[:, layer], h], dim=1), attn_mask=mask)
            assert out.shape == (len(x), q, ours.embed_dim)
            torch.testing.assert_close(out, y[:, :q], rtol=0, atol=1e-5)
            h = y[:, q:]
    return feat, h
