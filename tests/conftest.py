"""Shared test setup: make `import timm` work next to CPU-only torch, and small model fixtures."""
from __future__ import annotations

import pytest

import src.models  # noqa: F401 - applies the torchvision shim before any test module imports timm
from src.configs.vit_configs import ViTArch


@pytest.fixture
def tiny_arch() -> ViTArch:
    """A small ViT (use with 32 px images: 16 patches)."""
    return ViTArch(patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_dim=64)
