"""Test-only writers: random MAE and MoCo-v3 checkpoints in the released layouts."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from src.configs.vit_configs import ViTArch
from src.models.checkpoints import random_weights
from src.models.vit import VisionTransformer


def _random_timm_state(arch: ViTArch, img_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Random timm-style encoder weights (timm's names for CLS pooling: the final `norm.*` included)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, p in VisionTransformer(dataclasses.replace(arch, pool="token"), img_size).named_parameters():
        shape = tuple(p.shape)
        if name in ("cls_token", "pos_embed") or name.endswith("bias"):
            init: str | int = "small"
        elif len(shape) == 1:
            init = "scale"
        else:
            init = math.prod(shape[1:])
        state[name] = torch.from_numpy(random_weights(rng, shape, init))
    return state


def write_random_mae(path: str, arch: ViTArch, img_size: int = 224, seed: int = 0) -> None:
    """A random MAE pre-training checkpoint: `{'model': encoder state dict}` with timm keys and `norm.*`."""
    torch.save({"model": _random_timm_state(arch, img_size, seed)}, path)


def write_random_moco(path: str, arch: ViTArch, img_size: int = 224, seed: int = 0,
                      num_classes: int = 1000) -> None:
    """A random MoCo-v3 linear-probe checkpoint: `state_dict` with `module.`-prefixed timm keys and a head."""
    state = _random_timm_state(arch, img_size, seed)
    rng = np.random.default_rng(seed + 1)
    state["head.weight"] = torch.from_numpy(random_weights(rng, (num_classes, arch.embed_dim), arch.embed_dim))
    state["head.bias"] = torch.zeros(num_classes)
    torch.save({"epoch": 90, "arch": "vit_base", "best_acc1": torch.tensor(0.0),
                "state_dict": {"module." + k: v for k, v in state.items()}}, path)
