"""Shared test setup: make `import timm` work next to CPU-only torch, and small model fixtures."""
from __future__ import annotations

import logging

import pytest

import src.models  # noqa: F401 - applies the torchvision shim before any test module imports timm
from src.configs.vit_configs import ViTArch
from src.utils.logging import get_logger


@pytest.fixture
def tiny_arch() -> ViTArch:
    """A small ViT (use with 32 px images: 16 patches)."""
    return ViTArch(patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_dim=64)


@pytest.fixture(autouse=True)
def _fresh_console_log():
    """The `vqt` logger binds its console handler to the sys.stdout of the test that set it up (capsys
    replaces it per test): drop the handlers after each test so the next one logs to its own stdout."""
    yield
    logger = get_logger()
    for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
        logger.removeHandler(handler)
