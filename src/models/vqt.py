"""The trainable part of VQT for G independent members (grid configs or seeds) stacked together:
per-layer query tokens, the feature combination and a linear head per member."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from src.models.vit import KV, VisionTransformer

HEAD_BIAS = -math.log((1 - 0.01) / 0.01)  # the original's "special bias" (prior 0.01) for every class


def feature_dim(dim: int, depth: int, num_queries: int, per_layer_tokens: int, keep_frac: float = 1.0) -> int:
    """Head input size: CLS block + one block per layer, times KEEP_FRAC (truncated, as the original)."""
    layer = dim * per_layer_tokens if num_queries > 0 else 0
    return int((dim + depth * layer) * keep_frac)


class Members(nn.Module):
    """G members on one frozen backbone. Tensors carry the member axis first:
    `query_tokens` (G, L, Q, D), `combine` (G, L, Q) if WEIGHTED_SUM_FEATS, `head_weight` (G, C, F),
    `head_bias` (G, C). `feat_ids` (G, F') selects head inputs (featselect), or None."""

    def __init__(self, num_members: int, depth: int, dim: int, patch_size: int, num_queries: int,
                 num_classes: int, *, normalize: bool = True, pooling: bool = False,
                 weighted_sum: bool = False, dropout: float = 0.0, feat_ids: torch.Tensor | None = None):
        super().__init__()
        g, self.q, self.dim = num_members, num_queries, dim
        self.normalize, self.pooling, self.weighted_sum, self.dropout = normalize, pooling, weighted_sum, dropout
        self.init_range = math.sqrt(6.0 / (3 * patch_size ** 2 + dim))
        self.query_tokens = nn.Parameter(torch.zeros(g, depth, num_queries, dim)) if num_queries else None
        self.combine = nn.Parameter(torch.ones(g, depth, num_queries)) if weighted_sum and num_queries else None
        per_layer = 1 if (pooling or weighted_sum) else num_queries
        full = feature_dim(dim, depth, num_queries, per_layer)
        self.register_buffer("feat_ids", feat_ids)
        in_dim = full if feat_ids is None else feat_ids.shape[1]
        self.head_weight = nn.Parameter(torch.zeros(g, num_classes, in_dim))
        self.head_bias = nn.Parameter(torch.full((g, num_classes), HEAD_BIAS))

    @property
    def num_members(self) -> int:
        return self.head_weight.shape[0]

    @torch.no_grad()
    def init_member(self, g: int, seed: int) -> None:
        """Initialise member g from its own seed: query tokens ~ U(-v, v), v = sqrt(6 / (3 P^2 + D));
        head weight Kaiming-normal (fan_out, std sqrt(2 / C)); head bias -log 99."""
        gen = torch.Generator().manual_seed(seed)
        if self.query_tokens is not None:
            t = torch.rand(self.query_tokens.shape[1:], generator=gen) * 2 * self.init_range - self.init_range
            self.query_tokens[g].copy_(t)
        c = self.head_weight.shape[1]
        self.head_weight[g].copy_(torch.randn(self.head_weight.shape[1:], generator=gen) * math.sqrt(2.0 / c))
        self.head_bias[g].fill_(HEAD_BIAS)
        if self.combine is not None:
            self.combine[g].fill_(1.0)

    def forward(self, backbone: VisionTransformer, feat: torch.Tensor, kvs: list[KV],
                members: slice = slice(None), gens: list[torch.Generator] | None = None) -> torch.Tensor:
        """Frozen-path outputs of a batch -> logits (B, G', C) of the selected members.

        `gens` given (one per selected member): training mode, query-token dropout drawn from them."""
        return self.head(self.features(backbone, feat, kvs, members, gens), members)

    def features(self, backbone: VisionTransformer, feat: torch.Tensor, kvs: list[KV],
                 members: slice = slice(None), gens: list[torch.Generator] | None = None) -> torch.Tensor:
        """Per-block L2-normalised concat of [CLS feature, each layer's query outputs] -> (B, G', F)."""
        b = feat.shape[0]
        g = self.head_weight[members].shape[0]
        blocks = [feat.unsqueeze(1).expand(b, g, -1)]
        if self.query_tokens is not None:
            tok = self.query_tokens[members]
            _, depth, q, d = tok.shape
            tok = tok.transpose(0, 1).reshape(1, depth, g * q, d).expand(b, -1, -1, -1)
            if gens is not None and self.dropout > 0:
                keep = torch.cat([torch.empty((b, depth, q, d), device=tok.device).bernoulli_(1 - self.dropout, generator=gen)
                                  for gen in gens], dim=2)
                tok = tok * keep / (1 - self.dropout)
            for i, out in enumerate(backbone.query_pass(tok, kvs)):
                out = out.view(b, g, q, d)
                if self.pooling:
                    blocks.append(out.mean(dim=2))
                elif self.combine is not None:
                    blocks.append(torch.einsum("bgqd,gq->bgd", out, self.combine[members, i]))
                else:
                    blocks.append(out.reshape(b, g, q * d))
        if self.normalize:
            blocks = [F.normalize(x, dim=-1) for x in blocks]
        feats = torch.cat(blocks, dim=-1)
        if self.feat_ids is not None:
            feats = feats.gather(2, self.feat_ids[members].unsqueeze(0).expand(b, -1, -1))
        return feats

    def head(self, feats: torch.Tensor, members: slice = slice(None)) -> torch.Tensor:
        return torch.einsum("bgf,gcf->bgc", feats, self.head_weight[members]) + self.head_bias[members]
