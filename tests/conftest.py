"""Shared test setup: make `import timm` work next to CPU-only torch, and small model fixtures."""
from __future__ import annotations

import pytest

from src.configs.vit_configs import VIT_DEMO, ViTArch
from src.data.synthetic import write_fake_tfds
from src.models.checkpoints import write_random_npz
from src.utils.torchvision_shim import allow_torchvision_import

allow_torchvision_import()  # test modules import timm directly


@pytest.fixture
def tiny_arch() -> ViTArch:
    """A small ViT (use with 32 px images: 16 patches)."""
    return ViTArch(patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_dim=64)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A genuine on-disk TFDS vtab-eurosat (label-learnable synthetic images) and a random demo ViT .npz."""
    root = tmp_path_factory.mktemp("assets")
    write_fake_tfds("vtab-eurosat", str(root / "data"), learnable=True)
    write_random_npz(str(root / "demo.npz"), VIT_DEMO, img_size=32)
    return root


