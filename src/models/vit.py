"""Frozen Vision Transformer split into the two paths of VQT.

`frozen_pass` runs the backbone on images and returns, per layer, the keys and values its own
tokens attend over, plus the final feature. `query_pass` runs query tokens through every layer:
at layer l they read layer l's keys/values (the original tokens only), so the backbone's own
tokens never see them. Keys/values do not depend on the query tokens, which is what makes the
frozen path cacheable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.configs.vit_configs import ViTArch

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (B, heads, tokens, head_dim) each


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, hd = x.shape
        return self.proj(x.transpose(1, 2).reshape(b, n, h * hd))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention of the backbone's tokens; also returns their keys and values (own
        storage, so holding them does not keep the whole qkv projection alive)."""
        q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        k, v = k.contiguous(), v.contiguous()
        return self._merge(F.scaled_dot_product_attention(q, k, v)), k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, own: bool = False) -> torch.Tensor:
        """Tokens `x` (queries only) attend over given keys/values, and with `own` also over their
        own. Written out rather than fused: the fused kernels' backward also computes key/value
        gradients, which are never needed here and cost far more than the queries' own."""
        d = x.shape[-1]
        if own:
            q, kx, vx = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
            k, v = torch.cat([k, kx], dim=2), torch.cat([v, vx], dim=2)
        else:
            q = self._heads(F.linear(x, self.qkv.weight[:d], self.qkv.bias[:d]))
        q = q * (d // self.num_heads) ** -0.5
        return self._merge((q @ k.transpose(-2, -1)).softmax(dim=-1) @ v)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block (LayerNorm eps 1e-6, exact GELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, k, v = self.attn(self.norm1(x))
        x = x + a
        return x + self.mlp(self.norm2(x)), k, v

    def query(self, t: torch.Tensor, k: torch.Tensor, v: torch.Tensor, own: bool = False) -> torch.Tensor:
        """The block applied to query tokens `t` whose keys/values are the original tokens' (and, with
        `own`, the query tokens' own as well)."""
        t = t + self.attn.attend(self.norm1(t), k, v, own)
        return t + self.mlp(self.norm2(t))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT backbone (timm parameter names). `arch.pool`: "token" = final-LN CLS token;
    "avg" = `norm` applied to the mean of the patch tokens (MAE's fc_norm). `pos_drop` is the
    dropout after the embeddings (active in training mode only; p = `embed_dropout`)."""

    def __init__(self, arch: ViTArch, img_size: int = 224, embed_dropout: float = 0.0):
        super().__init__()
        if img_size % arch.patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {arch.patch_size}")
        self.arch = arch
        d = arch.embed_dim
        self.patch_embed = PatchEmbed(arch.patch_size, d)
        self.num_tokens = 1 + (img_size // arch.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, d) * 0.02)
        self.pos_drop = nn.Dropout(embed_dropout)
        self.blocks = nn.ModuleList(Block(d, arch.num_heads, arch.mlp_dim) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> CLS + patch tokens with position embeddings (B, T, D)."""
        x = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Last block's tokens (B, T, D) -> the final feature (B, D)."""
        return self.norm(x)[:, 0] if self.arch.pool == "token" else self.norm(x[:, 1:].mean(dim=1))

    def frozen_pass(self, x: torch.Tensor, embed_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[KV]]:
        """Images (B, 3, H, W) -> (final feature (B, D), per-layer keys/values).

        `embed_mask` (B, T, D), already rescaled, multiplies the embeddings: the stacked engine's
        `pos_drop` with its own random streams (then the pass is random and cannot be cached)."""
        x = self.embed(x)
        if embed_mask is not None:
            x = x * embed_mask
        kvs = []
        for blk in self.blocks:
            x, k, v = blk(x)
            kvs.append((k, v))
        return self.pool(x), kvs

    def query_pass(self, tokens: torch.Tensor, kvs: list[KV]) -> list[torch.Tensor]:
        """Query tokens (B, L, S, D) (S tokens per layer, fresh at every layer) -> L outputs (B, S, D).

        Outputs are taken after each block, before the final LayerNorm."""
        return [blk.query(tokens[:, i], k, v) for i, (blk, (k, v)) in enumerate(zip(self.blocks, kvs))]
