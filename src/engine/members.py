"""The stacked engine's model: G runs of one `QuerySpec` computed at once on the frozen path's outputs,
each exactly as its own `src.models.vqt.VQT` (tests/test_members.py, tests/test_grid.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.models.vit import KV, VisionTransformer
from src.models.vqt import COMBINE_KEY, HEAD_B, HEAD_BIAS, HEAD_W, QUERY_KEY, VQT, QuerySpec, trained_checkpoint


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
        return trained_checkpoint(self.named_trained(g), None if self.feat_ids is None else self.feat_ids[g])

    @torch.no_grad()
    def load_trained_state(self, g: int, state: dict[str, torch.Tensor]) -> None:
        named = self.named_trained(g)
        for key, value in state.items():
            named[key].copy_(value)

    def group_rngs(self, members: slice, groups: int) -> list[torch.Generator]:
        """The random stream of each seed group (members in `members`, split into `groups` groups)."""
        seeds = self.seeds[members]
        m = len(seeds) // groups
        return [self.rngs[seeds[j * m]] for j in range(groups)]

    def forward(self, feat: torch.Tensor, kvs: list[KV], members: slice = slice(None), groups: int = 1,
                train: bool = False) -> torch.Tensor:
        """Frozen-path outputs of a batch -> logits (B, G'/groups, C) of the selected members.

        `groups` = n splits the batch into n equal row ranges and the selected members into n seed
        groups of equal size: rows range j is seen only by group j (groups on their own batches, one
        pass). `train`: query-token dropout, each group's mask drawn from its seed's stream."""
        parts = self.feature_parts(feat, kvs, members, groups, train)
        if self.feat_ids is None:
            return self.head_by_part(parts, members, groups)
        if self.spec.normalize:
            parts = [F.normalize(x, dim=-1) for x in parts]
        rows, m = parts[0].shape[:2]
        n, b = groups, rows // groups
        ids = self.feat_ids[members].view(n, 1, m, -1).expand(n, b, -1, -1).reshape(rows, m, -1)
        feats = torch.cat(parts, dim=-1).gather(2, ids)
        weight, bias = self.head_weight[members], self.head_bias[members]
        c, f = weight.shape[1:]
        logits = torch.einsum("nbmf,nmcf->nbmc", feats.view(n, b, m, f), weight.view(n, m, c, f))
        return (logits + bias.view(n, 1, m, c)).reshape(rows, m, c)

    def feature_parts(self, feat: torch.Tensor, kvs: list[KV], members: slice = slice(None), groups: int = 1,
                      train: bool = False) -> list[torch.Tensor]:
        """`VQT.combine_features`' parts before normalisation, for every selected member: the final
        feature, then each layer's (B, G'/groups, f). Each layer's query tokens are built on their own
        (a stacked (B, L, S, D) tensor and its gradient would be written and zero-filled in full)."""
        n, rows = groups, feat.shape[0]
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

    def head_by_part(self, parts: list[torch.Tensor], members: slice = slice(None), groups: int = 1) -> torch.Tensor:
        """The head over the concatenated (normalised) parts, computed part by part: each part's
        logits are divided by its norm instead of normalising it, and the (B, G', F) head input is
        never built."""
        weight, bias = self.head_weight[members], self.head_bias[members]
        n, (g, c, _) = groups, weight.shape
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
    from `rng`. On the CPU it is the very mask nn.Dropout draws from a generator in the same state
    (tests/test_members.py); on CUDA that equality is tested only where CUDA exists (skipped otherwise),
    and the grid-vs-reference equality of runs with dropout rests on it."""
    return torch.empty(shape, device=rng.device).bernoulli_(1 - p, generator=rng).div_(1 - p)
