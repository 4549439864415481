"""Visual Query Tuning on a frozen ViT.

`VQT` is one run: the reference, the model that is exported, and the place to write variants.
`Members` is the same computation for G independent runs stacked together (the grid engine's
optimisation; tests prove it equal to `VQT` run by run).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from src.models.petl import VQT_METHOD, Method, adapt, reset_adaptation
from src.models.vit import KV, VisionTransformer

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
        """Whether `Members` computes this spec (it packs runs into the token axis, which is exact only
        while query tokens never attend to query tokens)."""
        return not self.attend_queries

    def feature_dim(self, dim: int, depth: int) -> int:
        """Head input size: the final-feature block plus one block per layer."""
        per_layer = 0 if self.num_queries == 0 else dim if (self.pooling or self.weighted_sum) else dim * self.num_queries
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
            v = query_init_range(self.backbone)
            self.query_tokens.copy_(torch.rand(self.query_tokens.shape, generator=generator) * 2 * v - v)
        w = self.head.last_layer.weight
        w.copy_(torch.randn(w.shape, generator=generator) * math.sqrt(2.0 / w.shape[0]))
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
        queries = None if self.query_tokens is None else self.query_dropout(self.query_tokens.expand(len(x), -1, -1, -1))
        outs = []
        for i, blk in enumerate(bb.blocks):
            if self.prompts is not None:
                x = self.prompts(x, i)
            x, k, v = blk(x)
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
        return _checkpoint(self.named_trained(), self.feat_ids)

    @torch.no_grad()
    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy the tensors given by original name (a checkpoint's "model", or part of it)."""
        named = self.named_trained()
        for key, value in state.items():
            named[key].copy_(value)


def _checkpoint(named: dict[str, torch.Tensor], feat_ids: torch.Tensor | None) -> dict:
    out = {"model": {k: v.detach().cpu().clone() for k, v in named.items()}}
    if feat_ids is not None:
        out["feat_ids"] = feat_ids.cpu().clone()
    return out


def query_init_range(backbone: VisionTransformer) -> float:
    """v of the query tokens' U(-v, v) init: sqrt(6 / (3 P^2 + D))."""
    return math.sqrt(6.0 / (3 * backbone.arch.patch_size ** 2 + backbone.embed_dim))


class Members(nn.Module):
    """G runs of one `QuerySpec` on one frozen backbone, stacked; each computes exactly what its own
    `VQT` would. Tensors carry the member axis first: `query_tokens` (G, L, Q, D), `combine` (G, L, Q),
    `head_weight` (G, C, F), `head_bias` (G, C), `feat_ids` (G, F') or None.

    The members' query tokens are packed into one token axis: exact because a query token attends
    only to the original tokens (never to other queries), which `QuerySpec.stackable` guarantees.
    Runs are sorted by seed; the runs of one seed form a seed group sharing one random stream (their
    dropout masks are those each would draw alone, since alone each draws the same)."""

    def __init__(self, backbone: VisionTransformer, spec: QuerySpec, seeds: list[int],
                 feat_ids: torch.Tensor | None = None):
        super().__init__()
        if not spec.stackable:
            raise ValueError("Members cannot express this QuerySpec (queries attending to queries)")
        if seeds != sorted(seeds):
            raise ValueError("Members need their runs sorted by seed")
        self.backbone, self.spec, self.seeds = backbone, spec, seeds
        g, depth, dim, q = len(seeds), backbone.depth, backbone.embed_dim, spec.num_queries
        self.query_tokens = nn.Parameter(torch.zeros(g, depth, q, dim)) if q else None
        self.combine = nn.Parameter(torch.ones(g, depth, q)) if spec.weighted_sum and q else None
        self.register_buffer("feat_ids", feat_ids)
        in_dim = spec.feature_dim(dim, depth) if feat_ids is None else feat_ids.shape[1]
        self.head_weight = nn.Parameter(torch.zeros(g, spec.num_classes, in_dim))
        self.head_bias = nn.Parameter(torch.full((g, spec.num_classes), HEAD_BIAS))
        self.rngs: dict[int, torch.Generator] = {}

    def reset(self, device: torch.device) -> None:
        """Each member initialised as its own `VQT.reset_parameters` from a generator seeded with its seed;
        fresh random streams (one per seed, on `device`) for dropout."""
        for g, seed in enumerate(self.seeds):
            one = VQT(self.backbone, self.spec, None if self.feat_ids is None else self.feat_ids[g].cpu())
            one.reset_parameters(torch.Generator().manual_seed(seed))
            self.load_trained_state(g, one.trained_state()["model"])
        self.rngs = {s: torch.Generator(device=device).manual_seed(s) for s in dict.fromkeys(self.seeds)}

    def named_trained(self, g: int) -> dict[str, torch.Tensor]:
        """Member g's trainable tensors (views) under the original's checkpoint names."""
        named = {HEAD_W: self.head_weight[g], HEAD_B: self.head_bias[g]}
        if self.query_tokens is not None:
            named[QUERY_KEY] = self.query_tokens[g]
        if self.combine is not None:
            named[COMBINE_KEY] = self.combine[g]
        return named

    def trained_state(self, g: int) -> dict:
        """Member g's checkpoint, as its `VQT.trained_state`."""
        return _checkpoint(self.named_trained(g), None if self.feat_ids is None else self.feat_ids[g])

    @torch.no_grad()
    def load_trained_state(self, g: int, state: dict[str, torch.Tensor]) -> None:
        named = self.named_trained(g)
        for key, value in state.items():
            named[key].copy_(value)

    def group_rngs(self, members: slice, blocks: int) -> list[torch.Generator]:
        """The random stream of each row block's seed group (members in `members`, `blocks` groups)."""
        seeds = self.seeds[members]
        m = len(seeds) // blocks
        return [self.rngs[seeds[j * m]] for j in range(blocks)]

    def forward(self, feat: torch.Tensor, kvs: list[KV], members: slice = slice(None), blocks: int = 1,
                train: bool = False) -> torch.Tensor:
        """Frozen-path outputs of a batch -> logits (B, G'/blocks, C) of the selected members.

        `blocks` = n splits the batch into n equal row blocks and the selected members into n seed
        groups of equal size: block j is seen only by group j (groups on their own batches, one pass).
        `train`: query-token dropout, each group's mask drawn from its seed's stream."""
        parts = self.feature_blocks(feat, kvs, members, blocks, train)
        if self.feat_ids is None:
            return self.head_by_block(parts, members, blocks)
        if self.spec.normalize:
            parts = [F.normalize(x, dim=-1) for x in parts]
        rows, m = parts[0].shape[:2]
        ids = self.feat_ids[members].view(blocks, 1, m, -1).expand(blocks, rows // blocks, -1, -1).reshape(rows, m, -1)
        feats = torch.cat(parts, dim=-1).gather(2, ids)
        weight, bias = self.head_weight[members], self.head_bias[members]
        c, f = weight.shape[1:]
        logits = torch.einsum("nbmf,nmcf->nbmc", feats.view(blocks, rows // blocks, m, f), weight.view(blocks, m, c, f))
        return (logits + bias.view(blocks, 1, m, c)).reshape(rows, m, c)

    def feature_blocks(self, feat: torch.Tensor, kvs: list[KV], members: slice = slice(None), blocks: int = 1,
                       train: bool = False) -> list[torch.Tensor]:
        """`VQT.combine_features`' blocks before normalisation, for every selected member: the final
        feature, then each layer's (B, G'/blocks, f). Each layer's query tokens are built on their own
        (a stacked (B, L, S, D) tensor and its gradient would be written and zero-filled in full)."""
        n, rows = blocks, feat.shape[0]
        b, m = rows // n, self.head_weight[members].shape[0] // n
        parts = [feat.unsqueeze(1).expand(rows, m, -1)]
        if self.query_tokens is None:
            return parts
        _, depth, q, d = self.query_tokens.shape
        tok = self.query_tokens[members].view(n, 1, m, depth, q, d)
        keep = None
        if train and self.spec.dropout > 0:  # (n, b, L, q, d): as each group's VQT draws its (b, L, q, d) mask
            keep = torch.stack([dropout_mask((b, depth, q, d), self.spec.dropout, rng)
                                for rng in self.group_rngs(members, n)])
        for i, (blk, (k, v)) in enumerate(zip(self.backbone.blocks, kvs)):
            t = tok[:, :, :, i].expand(n, b, m, q, d) if keep is None else tok[:, :, :, i] * keep[:, :, None, i]
            out = blk.query(t.reshape(rows, m * q, d), k, v).view(rows, m, q, d)
            if self.spec.pooling:
                parts.append(out.mean(dim=2))
            elif self.combine is not None:
                combine = self.combine[members, i].view(n, m, q)
                parts.append(torch.einsum("nbmqd,nmq->nbmd", out.view(n, b, m, q, d), combine).reshape(rows, m, d))
            else:
                parts.append(out.view(rows, m, q * d))
        return parts

    def head_by_block(self, parts: list[torch.Tensor], members: slice = slice(None), blocks: int = 1) -> torch.Tensor:
        """The head over the concatenated (normalised) blocks, computed block by block: each block's
        logits are divided by its norm instead of normalising it, and the (B, G', F) head input is
        never built."""
        weight, bias = self.head_weight[members], self.head_bias[members]
        n, (g, c, _) = blocks, weight.shape
        rows, m = parts[0].shape[0], g // n
        logits = bias.view(n, m, 1, c)
        for part, w in zip(parts, weight.split([x.shape[-1] for x in parts], dim=-1)):
            x = part.reshape(n, rows // n, m, -1).transpose(1, 2)  # (n, m, b, f)
            y = x @ w.reshape(n, m, c, -1).transpose(-1, -2)
            if self.spec.normalize:
                y = y / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            logits = logits + y
        return logits.transpose(1, 2).reshape(rows, m, c)


def dropout_mask(shape: tuple[int, ...], p: float, rng: torch.Generator) -> torch.Tensor:
    """The mask `nn.Dropout(p)` multiplies by (keep ~ Bernoulli(1 - p), rescaled by 1 / (1 - p)), drawn
    from `rng` exactly as nn.Dropout draws from the default generator on the CPU."""
    return torch.empty(shape, device=rng.device).bernoulli_(1 - p, generator=rng).div_(1 - p)
