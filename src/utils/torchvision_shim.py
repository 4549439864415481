"""The one place that lets torchvision (and timm, which imports it) import next to CPU-only torch.

The torchvision wheel pinned with torch 2.13 is a CUDA build whose `_C.so` cannot load on CPU-only
torch; its import then fails registering fake kernels for two ops that `_C.so` would have defined.
Declaring those op schemas first lets the import succeed; torchvision's C++ ops (nms) stay
unavailable, and vqt never uses them. Where `_C.so` loads (CUDA torch), this does nothing.
The modules that import timm (`src.models.vit`, `src.models.timm_backbone`) call it first.
"""
from __future__ import annotations

import importlib.util
import os

import torch

_LIBRARIES: list[torch.library.Library] = []  # the declared schemas live as long as these objects


def allow_torchvision_import() -> None:
    """Make `import torchvision` possible (idempotent; must run before torchvision is imported)."""
    if _LIBRARIES:
        return
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
    _LIBRARIES.append(lib)
