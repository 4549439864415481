"""Shared test setup: make `import timm` work next to CPU-only torch, and small model fixtures."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from src.configs.vit_configs import VIT_DEMO, ViTArch
from src.data.synthetic import write_fake_tfds
from src.models.checkpoints import write_random_npz


def _allow_torchvision_import() -> None:
    """The torchvision wheel matching torch 2.13 is a CUDA build whose `_C.so` cannot load on CPU-only
    torch; its import then fails registering fake kernels for two missing ops. Declaring those op
    schemas first lets torchvision (and timm, which imports it) import; the C++ ops stay unavailable.
    Does nothing where `_C.so` loads."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    try:
        torch.ops.load_library(os.path.join(next(iter(spec.submodule_search_locations)), "_C.so"))
        return
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _allow_torchvision_import.lib = lib  # the schemas live as long as this object


_allow_torchvision_import()


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
