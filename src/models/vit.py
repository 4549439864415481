"""Frozen Vision Transformer split into the two paths of VQT, on timm's modules.

`frozen_pass` runs the backbone on images and returns, per layer, the keys and values its own
tokens attend over (`Block.forward_kv`), plus the final feature. `Block.query` runs query tokens
through a block: at layer l they read layer l's keys/values (the original tokens only), so the
backbone's own tokens never see them. Keys/values do not depend on the query tokens, which is what makes the
frozen path cacheable.

The backbone is a timm `VisionTransformer` taken apart: the model zoo's classic ViTs are built
from a `ViTArch`, any other timm ViT (DINOv2, CLIP, SigLIP, DeiT, ...) is adopted as created.
Every block runs its own modules (norm1, qkv, q_norm/k_norm, proj, LayerScale, norm2, mlp);
class, register and other prefix tokens are keys/values like the patch tokens; the final
feature is the model's own pre-logits feature (final norm + CLS, fc_norm of the mean, or the
attention-pool head). Parameter names are timm's.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from src.configs.vit_configs import ViTArch
from src.utils.torchvision_shim import allow_torchvision_import

allow_torchvision_import()  # before timm, which imports torchvision

from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import global_pool_nlc

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (B, heads, tokens, head_dim) each
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLS = ("token", "avg", "map")
SUPPORTED = ("timm VisionTransformer models with standard pre-norm blocks and learned absolute position "
             "embeddings: classic ViT (augreg, Google npz), DeiT, DINOv2 (with registers), CLIP, SigLIP, MAE")


class Unsupported(Exception):
    """A timm model VQT cannot run; the message says why and lists what is supported."""


class Block(nn.Module):
    """A timm `Block` (`forward(x) -> x`) that can also return the keys/values its tokens attend over
    (`forward_kv`, the frozen pass) and run query tokens over given keys/values (`query`). Holds the
    timm block's own modules under their names."""

    def __init__(self, blk: TimmBlock):
        super().__init__()
        attn = blk.attn
        if type(attn) is not TimmAttention or attn.gate is not None:
            raise Unsupported(f"attention {type(attn).__name__} (gated or not timm's Attention); "
                              f"supported: {SUPPORTED}")
        self.norm1, self.attn, self.ls1 = blk.norm1, attn, blk.ls1
        self.norm2, self.mlp, self.ls2 = blk.norm2, blk.mlp, blk.ls2
        self.adapter: nn.Module | None = None  # a parallel branch on the MLP's input (AdaptFormer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block on tokens (B, N, D), as timm's (with the adapter branch, when a method set one)."""
        return self._mlp(x + self.ls1(self.attn(self.norm1(x))))

    def forward_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block on the backbone's tokens, also returning the keys (after k_norm) and values they
        attended over: what this layer's query tokens read."""
        o, k, v = self._self_attention(self.norm1(x))
        return self._out(x, o), k, v

    def _out(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Residual attention output (heads (B, H, N, hd) merged, scale norm, proj, LayerScale) + MLP."""
        b, h, n, hd = o.shape
        return self._mlp(x + self.ls1(self.attn.proj(self.attn.norm(o.transpose(1, 2).reshape(b, n, h * hd)))))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP with its residual, and beside it the adapter branch on the same input (AdaptFormer) when set."""
        out = x + self.ls2(self.mlp(self.norm2(x)))
        return out if self.adapter is None else out + self.adapter(x)

    def _self_attention(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention heads (B, H, N, hd) of normed tokens `h` over themselves, and their keys and values in
        their own storage: the qkv projection is freed on return, before the MLP, and holding the
        keys/values does not keep it alive."""
        a = self.attn
        b, n, _ = h.shape
        q, k, v = a.qkv(h).view(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        k, v = a.k_norm(k).contiguous(), v.contiguous()
        return F.scaled_dot_product_attention(a.q_norm(q), k, v), k, v

    def query(self, t: torch.Tensor, k: torch.Tensor, v: torch.Tensor, own: bool = False) -> torch.Tensor:
        """The block applied to query tokens `t` whose keys/values are the original tokens' (and, with
        `own`, the query tokens' own as well). Attention is written out rather than fused: the fused
        kernels' backward also computes key/value gradients, never needed here and far costlier."""
        a, h = self.attn, self.norm1(t)
        if own:
            b, n, _ = h.shape
            q, kt, vt = a.qkv(h).view(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([k, a.k_norm(kt)], dim=2), torch.cat([v, vt], dim=2)
        else:
            d = a.attn_dim
            q = F.linear(h, a.qkv.weight[:d], None if a.qkv.bias is None else a.qkv.bias[:d])
            q = q.view(*q.shape[:2], a.num_heads, a.head_dim).transpose(1, 2)
        q = a.q_norm(q) * a.scale
        return self._out(t, (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v)


def classic_timm_vit(arch: ViTArch, img_size: int) -> TimmViT:
    """The timm ViT of a model-zoo architecture (LayerNorm eps 1e-6, exact GELU, qkv bias; `arch.pool`
    "avg" = fc_norm of the patch-token mean, as MAE), randomly initialised."""
    if img_size % arch.patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of the patch size {arch.patch_size}")
    return TimmViT(img_size=img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
                   num_heads=arch.num_heads, mlp_ratio=arch.mlp_dim / arch.embed_dim, qkv_bias=True,
                   norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0, global_pool=arch.pool,
                   weight_init="skip")


def describe(model: TimmViT) -> ViTArch:
    """The `ViTArch` summary of a timm ViT (patch size, width, depth, heads, MLP width, pooling)."""
    blk = model.blocks[0]
    pool = "map" if model.attn_pool is not None else model.global_pool
    return ViTArch(model.patch_embed.patch_size[0], model.embed_dim, len(model.blocks), blk.attn.num_heads,
                   blk.mlp.fc1.out_features if hasattr(blk.mlp, "fc1") else 0, pool, embed_dropout=0.0)


class VisionTransformer(nn.Module):
    """The frozen backbone. `VisionTransformer(arch, img_size, embed_dropout)` builds a model-zoo ViT;
    `from_timm` adopts a timm ViT. Images enter in [0, 1] (B, 3, S, S) and are normalised with the
    backbone's `mean`/`std`. `pos_drop` is the dropout after the embeddings (active in training mode
    only; p = `embed_dropout`)."""

    def __init__(self, arch: ViTArch, img_size: int = 224, embed_dropout: float = 0.0, *,
                 model: TimmViT | None = None, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        model = classic_timm_vit(arch, img_size) if model is None else model
        check_supported(model)
        self.arch, self.img_size = arch, img_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.patch_embed = model.patch_embed
        self.cls_token, self.reg_token, self.pos_embed = model.cls_token, model.reg_token, model.pos_embed
        self.no_embed_class, self.num_prefix_tokens = model.no_embed_class, model.num_prefix_tokens
        self.norm_pre = model.norm_pre
        self.pos_drop = nn.Dropout(embed_dropout)
        self.blocks = nn.ModuleList(Block(blk) for blk in model.blocks)
        self.norm, self.fc_norm, self.attn_pool = model.norm, model.fc_norm, model.attn_pool
        self.global_pool, self.pool_include_prefix = model.global_pool, model.pool_include_prefix
        self.num_tokens = self.num_prefix_tokens + model.patch_embed.num_patches

    @classmethod
    def from_timm(cls, model: TimmViT, mean: tuple[float, ...], std: tuple[float, ...]) -> VisionTransformer:
        """Adopt a timm ViT (its head is dropped); `Unsupported` for families VQT cannot run."""
        check_supported(model)
        return cls(describe(model), model.patch_embed.img_size[0], model=model, mean=mean, std=std)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> prefix + patch tokens with position embeddings (B, T, D)."""
        x = self.patch_embed((images - self.mean) / self.std)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat([*prefix, x + self.pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        return self.norm_pre(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Last block's tokens (B, T, D) -> the model's pre-logits feature (B, D)."""
        x = self.norm(x)
        if self.attn_pool is not None:
            x = self.attn_pool(x if self.pool_include_prefix else x[:, self.num_prefix_tokens:])
        else:
            x = global_pool_nlc(x, self.global_pool, self.num_prefix_tokens, self.pool_include_prefix)
        return self.fc_norm(x)

    def frozen_pass(self, x: torch.Tensor, embed_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[KV]]:
        """Images (B, 3, H, W) in [0, 1] -> (final feature (B, D), per-layer keys/values).

        `embed_mask` (B, T, D), already rescaled, multiplies the embeddings: the stacked engine's
        `pos_drop` with its own random streams (then the pass is random and cannot be cached)."""
        x = self.embed(x)
        if embed_mask is not None:
            x = x * embed_mask
        kvs = []
        for blk in self.blocks:
            x, k, v = blk.forward_kv(x)
            kvs.append((k, v))
        return self.pool(x), kvs


def check_supported(model: nn.Module) -> None:
    """`Unsupported` unless VQT can run `model` exactly (the message names the reason)."""
    if type(model) is not TimmViT:
        raise Unsupported(f"{type(model).__name__} (rotary or relative position embeddings, windowed attention, "
                          f"distillation token, ...) is not supported; supported: {SUPPORTED}")
    reasons = {
        "dynamic image size": model.dynamic_img_size,
        "no position embedding": model.pos_embed is None,
        f"pooling {model.global_pool!r}": model.attn_pool is None and model.global_pool not in POOLS,
        "patch dropout": not isinstance(model.patch_drop, nn.Identity),
        "blocks other than timm's pre-norm Block": any(type(b) is not TimmBlock for b in model.blocks),
    }
    bad = [why for why, present in reasons.items() if present]
    if bad:
        raise Unsupported(f"{', '.join(bad)} is not supported; supported: {SUPPORTED}")
