"""Backbones named by a timm model name (MODEL.TIMM_NAME), weights from a local file or the local
timm / Hugging Face cache: nothing is downloaded here (`scripts/download_weights.py --timm NAME`
fills the cache on a machine with internet).

Weight files are read by timm's own loader, so each family's released layout works as timm reads
it: timm `.safetensors` / `.pth` state dicts (and the original DINOv2, OpenAI CLIP, DeiT, MAE files
its filters convert), and Google/big_vision `.npz` files.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from src.errors import VQTError
from src.utils.torchvision_shim import allow_torchvision_import

allow_torchvision_import()  # before timm, which imports torchvision

import timm

from src.models.vit import SUPPORTED, Unsupported, VisionTransformer, check_supported

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pth.tar", ".pt", ".bin", ".npz")
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's Hugging Face loader reads, in its order
# torch's load_state_dict message for a head of another class count (the file's count first)
HEAD_MISMATCH = re.compile(r"size mismatch for head\.(?:weight|bias): copying a param with shape torch\.Size\(\[(\d+)")
SIZE_MISMATCH = re.compile(r"size mismatch for ")
NO_DROPOUT = {key: 0.0 for key in ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                                   "drop_path_rate")}


@dataclass(frozen=True)
class ImageConfig:
    """How a backbone wants its images: side length, normalisation, and the resampling filter used to
    bring images of any size to it (Pillow's name)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str


def pretrained_cfg(name: str):
    """timm's pretrained config of `name` (architecture[.tag]), or a VQTError naming the key."""
    if not timm.is_model(name.split(".")[0]) or timm.models.get_pretrained_cfg(name) is None:
        raise VQTError(f"MODEL.TIMM_NAME {name!r} is not a timm model with a pretrained config: use a name from "
                       "`timm.list_models(pretrained=True)`, e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k")
    return timm.models.get_pretrained_cfg(name)


def image_config(name: str, size: int = 0) -> ImageConfig:
    """The preprocessing of timm model `name` from its config; `size` > 0 overrides its input size."""
    pc = pretrained_cfg(name)
    interpolation = pc.interpolation if pc.interpolation in ("bicubic", "bilinear", "nearest") else "bicubic"
    return ImageConfig(size or pc.input_size[-1], tuple(pc.mean), tuple(pc.std), interpolation)


def cached_weights(name: str) -> str | None:
    """The weight file of `name` in the local Hugging Face or torch-hub cache, if there."""
    pc = pretrained_cfg(name)
    if pc.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ([pc.hf_hub_filename] if pc.hf_hub_filename else HF_FILES):
            path = try_to_load_from_cache(pc.hf_hub_id, filename)
            if isinstance(path, str):
                return path
    if pc.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(pc.url))
        if os.path.isfile(path):
            return path
    return None


def _create(name: str, img_size: int, num_classes: int = 0, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, num_classes=num_classes, img_size=img_size, **NO_DROPOUT, **kwargs)


def check_timm_name(name: str, **overrides) -> torch.nn.Module:
    """VQTError unless `name` is a timm model VQT runs: built on the meta device (no memory, no weights),
    it must pass `check_supported`. Returns that meta model."""
    arch = pretrained_cfg(name).architecture
    try:
        try:
            model = timm.create_model(name, num_classes=0, device="meta", **overrides)
        except Exception:  # noqa: BLE001 - a family that cannot even be built this way is not a plain ViT
            family = timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
            raise Unsupported(f"the {family} family is not supported; supported: {SUPPORTED}") from None
        check_supported(model)
    except Unsupported as e:
        raise VQTError(f"MODEL.TIMM_NAME {name}: {e}") from None
    return model


def build_timm_backbone(name: str, weights: str = "", img_size: int = 0, **overrides) -> VisionTransformer:
    """The frozen (no grad, eval mode) backbone of timm model `name` at `img_size` (0: its own), weights
    from the file `weights` or else the local cache. `overrides` change the architecture (tests)."""
    patch = check_timm_name(name, **overrides).patch_embed.patch_size[0]
    image = image_config(name, img_size)
    if image.size % patch:
        raise VQTError(f"DATA.CROPSIZE {image.size} is not a multiple of the patch size {patch} of {name}")
    path = weights or cached_weights(name)
    if not path:
        raise VQTError(f"no weights for MODEL.TIMM_NAME {name} in the local timm / Hugging Face cache: run "
                       f"`python scripts/download_weights.py --timm {name}` on a machine with internet, or set "
                       f"MODEL.WEIGHT_PATH to a local weight file ({', '.join(WEIGHT_SUFFIXES)})")
    if not os.path.isfile(path):
        raise VQTError(f"MODEL.WEIGHT_PATH {path} does not exist: point it at the weight file of {name}")
    if not path.endswith(WEIGHT_SUFFIXES):
        raise VQTError(f"MODEL.WEIGHT_PATH {path}: unknown weight format; use one of {', '.join(WEIGHT_SUFFIXES)}")
    model = _load_strictly(name, path, image.size, **overrides)
    backbone = VisionTransformer.from_timm(model, image.mean, image.std)
    return backbone.requires_grad_(False).eval()


def _load_strictly(name: str, path: str, img_size: int, **overrides) -> torch.nn.Module:
    """timm model `name` with every tensor from `path`, then without its head: built with the file's head
    (timm drops a head it does not build, and then loads the rest non-strictly), loaded strictly, so a
    missing or foreign tensor is one line naming the keys. The head is the released one's size, or the
    file's when it has another (a fine-tuned checkpoint)."""
    overlay = {"file": path, "custom_load": path.endswith(".npz")}
    num_classes = pretrained_cfg(name).num_classes or 0
    for attempt in range(2):
        try:
            model = _create(name, img_size, num_classes, pretrained=True, pretrained_cfg_overlay=overlay, **overrides)
            break
        except Exception as e:  # noqa: BLE001 - timm's loaders raise many types for a wrong or corrupt file
            detail = " ".join(str(e).split())
            head = HEAD_MISMATCH.search(detail)
            if head and attempt == 0 and not SIZE_MISMATCH.search(HEAD_MISMATCH.sub("", detail, count=2)):
                num_classes = int(head.group(1))
                continue
            detail = detail if len(detail) <= 600 else detail[:600] + " ..."
            raise VQTError(f"cannot load {path} into timm model {name} ({type(e).__name__}: {detail}): "
                           "is it the weight file of this model, complete and uncorrupted?") from None
    model.reset_classifier(0)
    return model


def download_timm_weights(name: str) -> str:
    """Download timm model `name`'s weights into the local cache with timm's own downloader (the one
    place vqt downloads weights: `scripts/download_weights.py --timm`); returns their path."""
    check_timm_name(name)
    try:
        timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise VQTError(f"downloading the weights of {name} failed ({type(e).__name__}: {detail[:300]}): "
                       "is there internet access?") from None
    path = cached_weights(name)
    if path is None:
        raise VQTError(f"timm loaded the weights of {name} from neither the Hugging Face nor the torch-hub cache: "
                       "save them to a file and set MODEL.WEIGHT_PATH")
    return path
