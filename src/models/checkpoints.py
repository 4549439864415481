"""Pre-trained ViT checkpoints: load Google/JAX `.npz`, MAE `.pth` and MoCo-v3 `.pth.tar` files into
`VisionTransformer`, and write a random `.npz` in the JAX layout (the demo's backbone).

Every parameter of the model is set from the file exactly once (MAE: `fc_norm` is not in the file and
is reset to weight 1 / bias 0 as in the original; the file's final `norm` is unused). Missing keys,
wrong shapes and unreadable files raise a one-line `VQTError`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping

import numpy as np
import torch
from scipy import ndimage

from src.configs.vit_configs import ViTArch, zoo_entry
from src.errors import VQTError
from src.models.timm_backbone import ImageConfig, build_timm_backbone, cached_weights, image_config
from src.models.vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer

FORMATS = {
    "npz": "Google/JAX ViT .npz",
    "mae": "MAE .pth {'model': state_dict}",
    "moco": "MoCo-v3 .pth.tar {'state_dict': {'module.*': ...}}",
}
Reader = Callable[..., torch.Tensor]  # (key, expected shape or None) -> tensor


def _describe(arch: ViTArch) -> str:
    return (f"ViT patch {arch.patch_size}, dim {arch.embed_dim}, depth {arch.depth}, "
            f"heads {arch.num_heads}, mlp {arch.mlp_dim}")


def _unreadable(path: str, fmt: str, err: Exception) -> VQTError:
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    html = head.startswith((b"<!doctype html", b"<html"))
    what = "an HTML page (a failed download?)" if html else "corrupt or truncated"
    return VQTError(f"cannot read checkpoint {path} as {FORMATS[fmt]}: the file is {what} ({type(err).__name__}: "
                    f"{err}); delete it and re-run `python scripts/download_weights.py`")


def _reader(arrays: Mapping, path: str, fmt: str, arch: ViTArch, prefix: str = "") -> Reader:
    """A function reading `prefix + key` from `arrays` as a float32 tensor, checking presence and shape."""

    def read(key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        key = prefix + key
        if key not in arrays:
            raise VQTError(f"checkpoint {path} has no key {key!r}: expected a {FORMATS[fmt]} checkpoint of a "
                           f"{_describe(arch)}; wrong DATA.FEATURE or file?")
        try:
            value = torch.as_tensor(np.asarray(arrays[key]) if fmt == "npz" else arrays[key])
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise _unreadable(path, fmt, e) from None
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise _shape_error(path, key, tuple(shape), tuple(value.shape), arch)
        return value.float()

    return read


def _shape_error(path: str, key: str, expected: tuple, found: tuple, arch: ViTArch) -> VQTError:
    return VQTError(f"checkpoint {path}: {key!r} has shape {found}, expected {expected} for a {_describe(arch)}; "
                    f"wrong DATA.FEATURE for this file?")


def resize_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(1, 1+g², D) -> (1, num_tokens, D): CLS entry kept, the g×g grid zoomed linearly (scipy, order 1)."""
    g_old, g_new = math.isqrt(pos.shape[1] - 1), math.isqrt(num_tokens - 1)
    grid = pos[0, 1:].numpy().reshape(g_old, g_old, -1)
    grid = ndimage.zoom(grid, (g_new / g_old, g_new / g_old, 1), order=1)
    return torch.cat([pos[:, :1], torch.from_numpy(grid).reshape(1, g_new * g_new, -1)], dim=1)


def _pos_embed(read: Reader, key: str, model: VisionTransformer, path: str) -> torch.Tensor:
    """The file's position embeddings, resized when its token grid differs from the model's."""
    pos = read(key)
    d = model.embed_dim
    n = pos.shape[1] - 1 if pos.dim() == 3 else -1
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != d or n < 1 or math.isqrt(n) ** 2 != n:
        raise _shape_error(path, key, tuple(model.pos_embed.shape), tuple(pos.shape), model.arch)
    return pos if pos.shape[1] == model.num_tokens else resize_pos_embed(pos, model.num_tokens)


def _npz_params(read: Reader, model: VisionTransformer, path: str) -> dict[str, torch.Tensor]:
    """Our parameters from the JAX layout: (D, heads, hd) q/k/v kernels fused into `attn.qkv`, kernels
    transposed to (out, in), the HWIO patch kernel to OIHW."""
    a = model.arch
    d, h, p, m = a.embed_dim, a.num_heads, a.patch_size, a.mlp_dim
    hd = d // h
    params = {
        "patch_embed.proj.weight": read("embedding/kernel", (p, p, 3, d)).permute(3, 2, 0, 1),
        "patch_embed.proj.bias": read("embedding/bias", (d,)),
        "cls_token": read("cls", (1, 1, d)),
        "pos_embed": _pos_embed(read, "Transformer/posembed_input/pos_embedding", model, path),
        "norm.weight": read("Transformer/encoder_norm/scale", (d,)),
        "norm.bias": read("Transformer/encoder_norm/bias", (d,)),
    }
    for i in range(a.depth):
        blk, att, mlp = f"blocks.{i}.", f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MlpBlock_3/"
        qkv = ("query", "key", "value")
        params |= {
            blk + "norm1.weight": read(att + "LayerNorm_0/scale", (d,)),
            blk + "norm1.bias": read(att + "LayerNorm_0/bias", (d,)),
            blk + "attn.qkv.weight": torch.cat([
                read(f"{att}MultiHeadDotProductAttention_1/{n}/kernel", (d, h, hd)).reshape(d, d).T for n in qkv]),
            blk + "attn.qkv.bias": torch.cat([
                read(f"{att}MultiHeadDotProductAttention_1/{n}/bias", (h, hd)).reshape(d) for n in qkv]),
            blk + "attn.proj.weight":
                read(att + "MultiHeadDotProductAttention_1/out/kernel", (h, hd, d)).reshape(d, d).T,
            blk + "attn.proj.bias": read(att + "MultiHeadDotProductAttention_1/out/bias", (d,)),
            blk + "norm2.weight": read(att + "LayerNorm_2/scale", (d,)),
            blk + "norm2.bias": read(att + "LayerNorm_2/bias", (d,)),
            blk + "mlp.fc1.weight": read(mlp + "Dense_0/kernel", (d, m)).T,
            blk + "mlp.fc1.bias": read(mlp + "Dense_0/bias", (m,)),
            blk + "mlp.fc2.weight": read(mlp + "Dense_1/kernel", (m, d)).T,
            blk + "mlp.fc2.bias": read(mlp + "Dense_1/bias", (d,)),
        }
    return params


def _timm_params(read: Reader, model: VisionTransformer, path: str, skip: str) -> dict[str, torch.Tensor]:
    """Our parameters from a timm-style state dict (same names), except those starting with `skip`."""
    return {name: _pos_embed(read, name, model, path) if name == "pos_embed" else read(name, tuple(p.shape))
            for name, p in model.named_parameters() if not (skip and name.startswith(skip))}


def _torch_load(path: str) -> object:
    """`torch.load` on CPU. Tries `weights_only=True`; the official MAE/MoCo files may also hold
    non-tensor objects (e.g. an argparse.Namespace), so for these known layouts it falls back to a
    full unpickle: only load such files from their official sources."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False)


def _torch_state(path: str, fmt: str) -> dict[str, torch.Tensor]:
    """The backbone state dict of an MAE (`['model']`) or MoCo-v3 (`['state_dict']`, `module.` keys) file."""
    try:
        ckpt = _torch_load(path)
    except Exception as e:  # noqa: BLE001 - unpickling a non-checkpoint file can raise almost any type
        raise _unreadable(path, fmt, e) from None
    entry = "model" if fmt == "mae" else "state_dict"
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(entry), dict):
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise VQTError(f"checkpoint {path} has no {entry!r} entry (found {found}): expected a {FORMATS[fmt]} file; "
                       f"wrong DATA.FEATURE for this file?")
    state = ckpt[entry]
    if fmt == "moco":
        state = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
    return state


def _check_depth(present: bool, path: str, arch: ViTArch) -> None:
    if present:
        raise VQTError(f"checkpoint {path} has more than {arch.depth} blocks: not a {_describe(arch)}; "
                       f"wrong DATA.FEATURE for this file?")


def load_backbone(model: VisionTransformer, path: str, fmt: str) -> None:
    """Set every parameter of `model` from the checkpoint at `path` in format `fmt` ("npz", "mae", "moco").

    Heads, pre-logits and MAE decoders in the file are ignored; position embeddings are resized
    when the file's token grid differs from the model's (e.g. another DATA.CROPSIZE)."""
    if fmt not in FORMATS:
        raise VQTError(f"unknown checkpoint format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not os.path.isfile(path):
        raise VQTError(f"checkpoint {path} not found: run `python scripts/download_weights.py` or place the file "
                       f"under MODEL.MODEL_ROOT (or point MODEL.WEIGHT_PATH at it)")
    arch = model.arch
    if fmt == "npz":
        try:
            arrays = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise _unreadable(path, fmt, e) from None
        if not isinstance(arrays, np.lib.npyio.NpzFile):
            raise _unreadable(path, fmt, ValueError("a single .npy array, not an .npz archive"))
        with arrays:
            prefix = "opt/target/" if "opt/target/embedding/kernel" in arrays else ""
            _check_depth(f"{prefix}Transformer/encoderblock_{arch.depth}/LayerNorm_0/scale" in arrays, path, arch)
            params = _npz_params(_reader(arrays, path, fmt, arch, prefix), model, path)
        skip = ""
    else:
        state = _torch_state(path, fmt)
        _check_depth(f"blocks.{arch.depth}.norm1.weight" in state, path, arch)
        skip = "fc_norm." if fmt == "mae" else ""
        params = _timm_params(_reader(state, path, fmt, arch), model, path, skip)
    own = dict(model.named_parameters())
    unset = sorted(n for n in own if n not in params and not (skip and n.startswith(skip)))
    if unset:
        raise VQTError(f"checkpoint {path}: parameters {unset} were not set by the {fmt} loader")
    with torch.no_grad():
        for name, value in params.items():
            own[name].copy_(value)
        if skip:  # MAE's fc_norm is not in the checkpoint: identity-initialised as in the original
            model.fc_norm.weight.fill_(1.0)
            model.fc_norm.bias.zero_()


def backbone_image_config(cfg) -> ImageConfig:
    """How the configured backbone wants its images: the timm config's size (or DATA.CROPSIZE when > 0),
    mean, std and resampling filter for MODEL.TIMM_NAME; DATA.CROPSIZE (0: 224), ImageNet mean/std and
    bilinear resampling for the zoo. DATA.INTERPOLATION, when set, replaces the filter."""
    if cfg.MODEL.TIMM_NAME:
        image = image_config(cfg.MODEL.TIMM_NAME, cfg.DATA.CROPSIZE)
    else:
        image = ImageConfig(cfg.DATA.CROPSIZE or 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    return dataclasses.replace(image, interpolation=cfg.DATA.INTERPOLATION or image.interpolation)


def weight_path(cfg) -> str:
    """The checkpoint file: MODEL.WEIGHT_PATH, else MODEL.TIMM_NAME's in the local cache, else
    MODEL.MODEL_ROOT / the zoo file of DATA.FEATURE ("" when none is there)."""
    root, explicit = cfg.MODEL.MODEL_ROOT, cfg.MODEL.WEIGHT_PATH
    if explicit:
        return explicit
    if cfg.MODEL.TIMM_NAME:
        return cached_weights(cfg.MODEL.TIMM_NAME) or ""
    return os.path.join(root, zoo_entry(cfg.DATA.FEATURE).file)


def build_backbone(cfg) -> VisionTransformer:
    """The frozen (no grad, eval mode) pre-trained backbone: MODEL.TIMM_NAME's, or the zoo's named by
    DATA.FEATURE, at DATA.CROPSIZE. A zoo backbone's embedding dropout is the original's with
    MODEL.H2T.EMBED_DROPOUT_IN_TRAIN, else off."""
    if cfg.MODEL.TIMM_NAME:
        return build_timm_backbone(cfg.MODEL.TIMM_NAME, cfg.MODEL.WEIGHT_PATH, cfg.DATA.CROPSIZE)
    entry = zoo_entry(cfg.DATA.FEATURE)
    try:
        embed_dropout = entry.arch.embed_dropout if cfg.MODEL.H2T.EMBED_DROPOUT_IN_TRAIN else 0.0
        model = VisionTransformer(entry.arch, backbone_image_config(cfg).size, embed_dropout)
    except ValueError as e:
        raise VQTError(f"DATA.CROPSIZE {cfg.DATA.CROPSIZE}: {e}") from None
    path = weight_path(cfg)
    load_backbone(model, path, entry.format)
    model.requires_grad_(False)
    return model.eval()


# ---- random checkpoints in the real layouts -------------------------------------------------------

def random_weights(rng: np.random.Generator, shape: tuple[int, ...], init: str | int) -> np.ndarray:
    """float32 values: "scale" ~ 1 + 0.1·N (LayerNorm), "small" ~ 0.02·N, an int fan_in ~ N / sqrt(fan_in)."""
    z = rng.standard_normal(shape)
    if init == "scale":
        z = 1.0 + 0.1 * z
    elif init == "small":
        z = 0.02 * z
    else:
        z = z / math.sqrt(init)
    return z.astype(np.float32)


def write_random_npz(path: str, arch: ViTArch, img_size: int = 224, seed: int = 0,
                     num_classes: int | None = None) -> None:
    """A random Google/JAX ViT `.npz` (keys and shapes of the released files; a `head/*` when `num_classes`)."""
    d, h, p, m = arch.embed_dim, arch.num_heads, arch.patch_size, arch.mlp_dim
    hd, tokens = d // h, 1 + (img_size // p) ** 2
    layout: dict[str, tuple[tuple[int, ...], str | int]] = {
        "embedding/kernel": ((p, p, 3, d), p * p * 3),
        "embedding/bias": ((d,), "small"),
        "cls": ((1, 1, d), "small"),
        "Transformer/posembed_input/pos_embedding": ((1, tokens, d), "small"),
        "Transformer/encoder_norm/scale": ((d,), "scale"),
        "Transformer/encoder_norm/bias": ((d,), "small"),
    }
    for i in range(arch.depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            layout |= {f"{b}{ln}/scale": ((d,), "scale"), f"{b}{ln}/bias": ((d,), "small")}
        for n in ("query", "key", "value"):
            layout |= {f"{b}MultiHeadDotProductAttention_1/{n}/kernel": ((d, h, hd), d),
                       f"{b}MultiHeadDotProductAttention_1/{n}/bias": ((h, hd), "small")}
        layout |= {
            f"{b}MultiHeadDotProductAttention_1/out/kernel": ((h, hd, d), d),
            f"{b}MultiHeadDotProductAttention_1/out/bias": ((d,), "small"),
            f"{b}MlpBlock_3/Dense_0/kernel": ((d, m), d),
            f"{b}MlpBlock_3/Dense_0/bias": ((m,), "small"),
            f"{b}MlpBlock_3/Dense_1/kernel": ((m, d), m),
            f"{b}MlpBlock_3/Dense_1/bias": ((d,), "small"),
        }
    if num_classes:
        layout |= {"head/kernel": ((d, num_classes), d), "head/bias": ((num_classes,), "small")}
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:  # a file object keeps np.savez from appending ".npz" to the name
        np.savez(f, **{k: random_weights(rng, shape, init) for k, (shape, init) in layout.items()})
