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
                members: slice = slice(None), gens: list[torch.Generator] | None = None,
                blocks: int = 1) -> torch.Tensor:
        """Frozen-path outputs of a batch -> logits (B, G'/blocks, C) of the selected members.

        `gens` given (one per selected member): training mode, query-token dropout drawn from them.
        `blocks` = n splits the batch into n equal row blocks and the selected members into n equal
        parts: block j is seen only by part j (members that train on different batches, in one pass)."""
        return self.head(self.features(backbone, feat, kvs, members, gens, blocks), members, blocks)

    def features(self, backbone: VisionTransformer, feat: torch.Tensor, kvs: list[KV],
                 members: slice = slice(None), gens: list[torch.Generator] | None = None,
                 blocks: int = 1) -> torch.Tensor:
        """Per-block L2-normalised concat of [CLS feature, each layer's query outputs] -> (B, G'/blocks, F)."""
        n, rows = blocks, feat.shape[0]
        b, m = rows // n, self.head_weight[members].shape[0] // n
        parts = [feat.unsqueeze(1).expand(rows, m, -1)]
        if self.query_tokens is not None:
            tok = self.query_tokens[members]
            _, depth, q, d = tok.shape
            tok = tok.view(n, 1, m, depth, q, d).transpose(2, 3).reshape(n, 1, depth, m * q, d)
            tok = tok.expand(n, b, -1, -1, -1).reshape(rows, depth, m * q, d)
            if gens is not None and self.dropout > 0:
                keep = [torch.empty((b, depth, q, d), device=tok.device).bernoulli_(1 - self.dropout, generator=gen)
                        for gen in gens]
                keep = torch.cat([torch.cat(keep[j * m:(j + 1) * m], dim=2) for j in range(n)])
                tok = tok * keep / (1 - self.dropout)
            for i, out in enumerate(backbone.query_pass(tok, kvs)):
                out = out.view(rows, m, q, d)
                if self.pooling:
                    parts.append(out.mean(dim=2))
                elif self.combine is not None:
                    combine = self.combine[members, i].view(n, m, q)
                    parts.append(torch.einsum("nbmqd,nmq->nbmd", out.view(n, b, m, q, d), combine).reshape(rows, m, d))
                else:
                    parts.append(out.reshape(rows, m, q * d))
        if self.normalize:
            parts = [F.normalize(x, dim=-1) for x in parts]
        feats = torch.cat(parts, dim=-1)
        if self.feat_ids is not None:
            ids = self.feat_ids[members].view(n, 1, m, -1).expand(n, b, -1, -1).reshape(rows, m, -1)
            feats = feats.gather(2, ids)
        return feats

    def head(self, feats: torch.Tensor, members: slice = slice(None), blocks: int = 1) -> torch.Tensor:
        rows, m, f = feats.shape
        weight, bias = self.head_weight[members], self.head_bias[members]
        c = weight.shape[1]
        logits = torch.einsum("nbmf,nmcf->nbmc", feats.view(blocks, rows // blocks, m, f), weight.view(blocks, m, c, f))
        return (logits + bias.view(blocks, 1, m, c)).reshape(rows, m, c)
