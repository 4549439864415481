"""Shared test setup: make `import timm` work next to CPU-only torch, and small model fixtures."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from src.configs.vit_configs import VIT_DEMO, ViTArch
from src.data.loader import ImageSet
from src.data.synthetic import write_fake_tfds
from src.models.checkpoints import load_backbone, write_random_npz
from src.models.vit import VisionTransformer
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




@pytest.fixture
def tiny_backbone(tiny_arch, tmp_path_factory) -> Callable[..., VisionTransformer]:
    """`make(embed_dropout=0.0)`: the tiny ViT at 32 px loaded from one random .npz (seed 3), frozen, in eval mode."""
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.npz")
    write_random_npz(path, tiny_arch, img_size=32, seed=3)

    def make(embed_dropout: float = 0.0) -> VisionTransformer:
        model = VisionTransformer(tiny_arch, img_size=32, embed_dropout=embed_dropout)
        load_backbone(model, path, "npz")
        return model.eval().requires_grad_(False)
    return make


@pytest.fixture(scope="session")
def colour_images() -> Callable[[int, int], ImageSet]:
    """`make(n, seed)`: n noisy images of varied sizes whose label (0..3) sets their colour."""
    def make(n: int, seed: int) -> ImageSet:
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % 4
        colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]])
        imgs = [np.clip(colours[y] + rng.normal(0, 40, size=(rng.integers(20, 48), rng.integers(20, 48), 3)), 0, 255)
                .astype(np.uint8) for y in labels]
        return ImageSet(images=imgs, labels=labels.astype(np.int64))
    return make


@pytest.fixture
def tiny_vit(tiny_backbone) -> VisionTransformer:
    """The tiny ViT of `tiny_backbone`, without embedding dropout."""
    return tiny_backbone()


@pytest.fixture
def tiny_images(colour_images) -> ImageSet:
    """60 `colour_images` (seed 0): rows 0..39 train, 40..59 val in the engine tests."""
    return colour_images(60, 0)
