"""ViT sizes and the model zoo: which checkpoint file and architecture each DATA.FEATURE names."""
from __future__ import annotations

from dataclasses import dataclass

from src.errors import VQTError


@dataclass(frozen=True)
class ViTArch:
    """Shape of a ViT backbone; `pool` is "token" (final-LN CLS) or "avg" (MAE: fc_norm of the patch mean)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "token"
    embed_dropout: float = 0.1      # dropout after patch+position embeddings (supervised ViTs)


VIT_B16 = ViTArch(16, 768, 12, 12, 3072)
VIT_L16 = ViTArch(16, 1024, 24, 16, 4096)
VIT_H14 = ViTArch(14, 1280, 32, 16, 5120)
VIT_B16_MAE = ViTArch(16, 768, 12, 12, 3072, pool="avg", embed_dropout=0.0)
VIT_L16_MAE = ViTArch(16, 1024, 24, 16, 4096, pool="avg", embed_dropout=0.0)
VIT_H14_MAE = ViTArch(14, 1280, 32, 16, 5120, pool="avg", embed_dropout=0.0)
VIT_B16_MOCO = ViTArch(16, 768, 12, 12, 3072, embed_dropout=0.0)
# The built-in demo backbone: a tiny random ViT written in the JAX .npz layout.
VIT_DEMO = ViTArch(16, 64, 4, 4, 128)


@dataclass(frozen=True)
class ZooEntry:
    """A pre-trained checkpoint: file under MODEL.MODEL_ROOT, format ("npz", "mae", "moco") and arch."""

    file: str
    format: str
    arch: ViTArch
    model_type: str = "h2t-vit"


MODEL_ZOO: dict[str, ZooEntry] = {
    "sup_vitb16_imagenet1k": ZooEntry("imagenet1k_ViT-B_16.npz", "npz", VIT_B16),
    "sup_vitb16_imagenet21k": ZooEntry("imagenet21k_ViT-B_16.npz", "npz", VIT_B16),
    "sup_vitl16_imagenet21k": ZooEntry("imagenet21k_ViT-L_16.npz", "npz", VIT_L16),
    "sup_vith14_imagenet21k": ZooEntry("imagenet21k_ViT-H_14.npz", "npz", VIT_H14),
    "sup_vitb16_224": ZooEntry("ViT-B_16-224.npz", "npz", VIT_B16),
    "sup_vitb16": ZooEntry("ViT-B_16.npz", "npz", VIT_B16),
    "sup_vitl16_224": ZooEntry("ViT-L_16-224.npz", "npz", VIT_L16),
    "sup_vitl16": ZooEntry("ViT-L_16.npz", "npz", VIT_L16),
    "mae_vitb16": ZooEntry("mae_pretrain_vit_base.pth", "mae", VIT_B16_MAE, "h2t-ssl-vit"),
    "mae_vitl16": ZooEntry("mae_pretrain_vit_large.pth", "mae", VIT_L16_MAE, "h2t-ssl-vit"),
    "mae_vith14": ZooEntry("mae_pretrain_vit_huge.pth", "mae", VIT_H14_MAE, "h2t-ssl-vit"),
    "mocov3_vitb": ZooEntry("mocov3_linear-vit-b-300ep.pth.tar", "moco", VIT_B16_MOCO, "h2t-ssl-vit"),
    "demo_vit_tiny": ZooEntry("demo_vit_tiny.npz", "npz", VIT_DEMO),
}


DEFAULT_FEATURE = "sup_vitb16_224"  # DATA.FEATURE's default


def zoo_entry(feature: str) -> ZooEntry:
    """The zoo entry of DATA.FEATURE, or a VQTError listing the valid keys."""
    if feature not in MODEL_ZOO:
        raise VQTError(f"unknown DATA.FEATURE {feature!r}; valid: {', '.join(MODEL_ZOO)}")
    return MODEL_ZOO[feature]
