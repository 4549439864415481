"""Visual Query Tuning on a frozen ViT.

`VQT` is one run: the reference, the model that is exported, and the place to write variants. The
stacked engine's `src.engine.members.Members` computes the same for G runs at once (proven equal to
`VQT` run by run in tests/test_grid.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from src.models.petl import VQT_METHOD, Method, adapt, init_fan_out_, init_tokens_, reset_adaptation
from src.models.vit import VisionTransformer

HEAD_BIAS = -math.log((1 - 0.01) / 0.01)  # the original's "special bias" (prior 0.01) for every class
# Names of the trained tensors in the original's checkpoints (`last_model.pth` -> "model").
QUERY_KEY = "enc.transformer.encoder.query_prompt_embeddings"
COMBINE_KEY = "enc.combine_params"
HEAD_W, HEAD_B = "head.last_layer.weight", "head.last_layer.bias"


@dataclass(frozen=True)
class QuerySpec:
    """What VQT trains on a frozen backbone (MODEL.H2T): Q query tokens per layer, how each layer's
    Q outputs become a feature block, and the classes of the linear head.

    `attend_queries` is a variant (queries also attend to their own layer's queries); the stacked
    engine cannot express it, so it trains on the reference path."""

    num_queries: int
    num_classes: int
    dropout: float = 0.0
    normalize: bool = True
    pooling: bool = False
    weighted_sum: bool = False
    attend_queries: bool = False

    @classmethod
    def from_cfg(cls, cfg) -> QuerySpec:
        """MODEL.H2T's queries; a method without query tokens (VPT's types, AdaptFormer, LoRA) has Q = 0 and a
        linear head on the unnormalised final feature."""
        h2t = cfg.MODEL.H2T
        if not Method.from_cfg(cfg).queries:
            return cls(0, cfg.DATA.NUMBER_CLASSES, normalize=False)
        return cls(h2t.NUM_QUERY_TOKENS, cfg.DATA.NUMBER_CLASSES, h2t.DROPOUT, h2t.NORMALIZE_FEATS,
                   h2t.POOLING_FEATS, h2t.WEIGHTED_SUM_FEATS, h2t.QUERY_ATTENDS_QUERIES)

    @property
    def stackable(self) -> bool:
        """Whether the stacked engine (`src.engine.members.Members`) computes this spec (it packs runs
        into the token axis, which is exact only while query tokens never attend to query tokens)."""
        return not self.attend_queries

    def feature_dim(self, dim: int, depth: int) -> int:
        """Head input size: the final-feature block plus one block per layer."""
        q = self.num_queries
        per_layer = 0 if q == 0 else dim if (self.pooling or self.weighted_sum) else dim * q
        return dim + depth * per_layer


class LinearHead(nn.Module):
    """The classifier, named as the original's MLP head with no hidden layer (`head.last_layer`)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.last_layer = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(x)


class VQT(nn.Module):
    """Visual Query Tuning: `forward(images) -> logits`.

    At every layer l, Q learnable query tokens (fresh per layer, dropout in training) pass through
    block l. They read the keys and values of the tokens entering block l, which come from the
    original CLS + patch tokens only: the backbone's own path never sees the queries. Layer l's
    feature block is its Q outputs (taken before the final LayerNorm) flattened, averaged
    (`pooling`) or summed with learned weights (`weighted_sum`). The head input is [final feature,
    block 1, ..., block L], each block L2-normalised (`normalize`), optionally reduced to the
    features `feat_ids` (featselect). Only the query tokens, the weights and the head train.

    `method` adapts a copy of the backbone first (src.models.petl: prompts entering before each block,
    adapters or LoRA inside the blocks); its tensors then train too, and the queries read the adapted layers.
    """

    def __init__(self, backbone: VisionTransformer, spec: QuerySpec, feat_ids: torch.Tensor | None = None,
                 method: Method = VQT_METHOD):
        super().__init__()
        self.backbone, self.prompts = adapt(backbone.requires_grad_(False), method)
        self.spec, self.method = spec, method
        depth, dim, q = backbone.depth, backbone.embed_dim, spec.num_queries
        self.query_tokens = nn.Parameter(torch.zeros(depth, q, dim)) if q else None
        self.query_dropout = nn.Dropout(spec.dropout)
        self.combine = nn.Parameter(torch.ones(depth, q)) if spec.weighted_sum and q else None
        self.register_buffer("feat_ids", feat_ids)
        in_dim = spec.feature_dim(dim, depth) if feat_ids is None else len(feat_ids)
        self.head = LinearHead(in_dim, spec.num_classes)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """The original's init, drawn from `generator`: query tokens ~ U(-v, v) with v = sqrt(6 / (3 P^2 + D)),
        head weight Kaiming-normal (fan_out: std sqrt(2 / C)), head bias -log 99, combine weights 1."""
        if self.query_tokens is not None:
            init_tokens_(self.query_tokens, self.backbone.arch.patch_size, generator)
        init_fan_out_(self.head.last_layer.weight, generator)
        self.head.last_layer.bias.fill_(HEAD_BIAS)
        if self.combine is not None:
            self.combine.fill_(1.0)
        reset_adaptation(self.backbone, self.prompts, generator)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> head input (B, F)."""
        bb = self.backbone
        x = bb.pos_drop(bb.embed(images))
        queries = None if self.query_tokens is None else \
            self.query_dropout(self.query_tokens.expand(len(x), -1, -1, -1))
        outs = []
        for i, blk in enumerate(bb.blocks):
            if self.prompts is not None:
                x = self.prompts(x, i)
            x, k, v = blk.forward_kv(x)
            if queries is not None:
                outs.append(blk.query(queries[:, i], k, v, own=self.spec.attend_queries))
        return self.combine_features(bb.pool(x), outs)

    def combine_features(self, final: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
        """Final feature (B, D) and each layer's query outputs (B, Q, D) -> head input (B, F)."""
        blocks = [final]
        for i, out in enumerate(outs):
            if self.spec.pooling:
                blocks.append(out.mean(dim=1))
            elif self.combine is not None:
                blocks.append(torch.einsum("bqd,q->bd", out, self.combine[i]))
            else:
                blocks.append(out.flatten(1))
        if self.spec.normalize:
            blocks = [F.normalize(b, dim=-1) for b in blocks]
        feats = torch.cat(blocks, dim=-1)
        return feats if self.feat_ids is None else feats[:, self.feat_ids]

    def named_trained(self) -> dict[str, torch.Tensor]:
        """The trainable tensors under the original's checkpoint names (an adapted backbone's under `enc.`)."""
        named = {HEAD_W: self.head.last_layer.weight, HEAD_B: self.head.last_layer.bias}
        named |= {f"enc.{n}": p for n, p in self.backbone.named_parameters() if p.requires_grad}
        if self.prompts is not None:
            named |= {f"enc.prompts.{n}": p for n, p in self.prompts.named_parameters()}
        if self.query_tokens is not None:
            named[QUERY_KEY] = self.query_tokens
        if self.combine is not None:
            named[COMBINE_KEY] = self.combine
        return named

    def trained_state(self) -> dict:
        """The checkpoint (`last_model.pth`): {"model": trained tensors by original name, "feat_ids"}."""
        return trained_checkpoint(self.named_trained(), self.feat_ids)

    @torch.no_grad()
    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy the tensors given by original name (a checkpoint's "model", or part of it)."""
        named = self.named_trained()
        for key, value in state.items():
            named[key].copy_(value)


def trained_checkpoint(named: dict[str, torch.Tensor], feat_ids: torch.Tensor | None) -> dict:
    """A run's checkpoint: {"model": its trained tensors by original name (CPU copies), "feat_ids" if any}."""
    out = {"model": {k: v.detach().cpu().clone() for k, v in named.items()}}
    if feat_ids is not None:
        out["feat_ids"] = feat_ids.cpu().clone()
    return out

