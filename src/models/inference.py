"""Inference with trained VQT models: load a final run (or an export file) into the single-run `VQT`
module, write self-contained export files, and predict class probabilities for image files.

An export file (`torch.save`d dict, format `FORMAT`) holds what a run trained (query tokens, combine
weights, head, selected feature ids; a baseline's prompts, adapters or LoRA tensors) with its `QuerySpec` and
`Method` (src/models/petl.py), the backbone's identity (timm name or zoo
key) and a reference to its weight file (absolute path; 344 MB are not copied), the preprocessing
(size, mean, std, resampling) and the class names. `load_model` turns either into a `Loaded` model:
`loaded.model(images)` gives logits for images (B, 3, S, S) in [0, 1].
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from yacs.config import CfgNode

from src.configs.defaults import load_cfg
from src.data.folder import read_classes, read_images
from src.data.preprocess import preprocess
from src.errors import VQTError
from src.models.checkpoints import backbone_image_config, build_backbone, weight_path
from src.models.petl import Method
from src.models.timm_backbone import ImageConfig
from src.models.vqt import VQT, QuerySpec
from src.utils.layout import RunDir, RunState

FORMAT = "vqt-export/1"


@dataclass
class Loaded:
    """A trained VQT (eval mode) with what it takes to use it: its class names and image preprocessing."""

    model: VQT
    classes: list[str]
    image: ImageConfig

    @torch.no_grad()
    def predict(self, images: str | os.PathLike | Image.Image | Sequence[str | os.PathLike | Image.Image],
                batch_size: int = 64, workers: int = 4) -> torch.Tensor:
        """Class probabilities (N, C) of one image file or Pillow image, or a list of them, decoded and
        resized as the training images were."""
        if isinstance(images, str | os.PathLike | Image.Image):
            images = [images]
        device = next(self.model.parameters()).device
        probs = []
        images = read_images(list(images), self.image.size, self.image.interpolation, workers)
        for batch in _chunks(images, batch_size):
            probs.append(self.model(preprocess(batch, self.image.size, device)).softmax(dim=-1).cpu())
        return torch.cat(probs) if probs else torch.empty(0, len(self.classes))


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _find(path: str, run_dir: str, key: str) -> str:
    """A relative path from a run's config, found from the working directory or one of the run folder's
    parents (where training ran), as an absolute path."""
    if os.path.isabs(path):
        return path
    for base in [os.getcwd(), *_parents(run_dir)]:
        if os.path.exists(os.path.join(base, path)):
            return os.path.abspath(os.path.join(base, path))
    raise VQTError(f"{key} {path!r} of the run {run_dir} is relative and found neither from here nor from the run "
                   "folder's parents: run from where training ran, or pass --weights PATH")


def _parents(path: str) -> list[str]:
    path, out = os.path.abspath(path), []
    while os.path.dirname(path) != path:
        path = os.path.dirname(path)
        out.append(path)
    return out


def _weights(cfg: CfgNode, run_dir: str) -> str:
    """The absolute path of the backbone weights a run used (`weight_path`; "" = timm's local cache)."""
    path = weight_path(cfg)
    return _find(path, run_dir, "MODEL.WEIGHT_PATH" if cfg.MODEL.WEIGHT_PATH else "MODEL.MODEL_ROOT") if path else ""


def run_export(run_dir: str, weights: str = "") -> dict:
    """The export dict of a finished final (or compression) run folder; `weights` overrides the backbone
    weight file recorded in its config."""
    run = RunDir(run_dir)
    ckpt_file, cfg_file = run.checkpoint_file, run.file("config.yaml")
    if not os.path.isfile(ckpt_file) or not os.path.isfile(cfg_file):
        raise VQTError(f"{run_dir} has no last_model.pth and config.yaml: pass a final run folder (.../run1) "
                       "trained with MODEL.SAVE_CKPT True, or an export file (scripts/export.py)")
    if (state := run.status()) is not RunState.DONE:
        why = f" ({run.damage()})" if state is RunState.BROKEN else ""
        raise VQTError(f"{run_dir} is {state.value}{why}, not a finished run: rerun its phase (train.py), which "
                       "redoes it, then export")
    cfg = load_cfg(cfg_file)
    try:
        ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        trained = ckpt["model"]
    except Exception as e:  # noqa: BLE001 - an empty, truncated or foreign file fails in many ways
        raise VQTError(f"cannot read {ckpt_file} ({type(e).__name__}): empty, truncated or not a vqt checkpoint; "
                       "retrain the run (delete its folder and rerun train.py) or use an export file") from None
    classes = read_classes(run_dir) or [str(c) for c in range(cfg.DATA.NUMBER_CLASSES)]
    backbone = {"timm_name": cfg.MODEL.TIMM_NAME, "feature": cfg.DATA.FEATURE, "model_type": cfg.MODEL.TYPE,
                "weights": os.path.abspath(weights) if weights else _weights(cfg, run_dir)}
    return {"format": FORMAT, "backbone": backbone, "spec": dataclasses.asdict(QuerySpec.from_cfg(cfg)),
            "method": dataclasses.asdict(Method.from_cfg(cfg)),
            "trained": trained, "feat_ids": ckpt.get("feat_ids"),
            "image": dataclasses.asdict(backbone_image_config(cfg)), "classes": classes,
            "run": os.path.abspath(run_dir)}


def load_export(export: dict, device: torch.device | str = "cpu") -> Loaded:
    """The `Loaded` model of an export dict (backbone weights read from the file it references)."""
    b, image = export["backbone"], ImageConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in export["image"].items()})
    cfg = load_cfg(opts=["MODEL.TIMM_NAME", b["timm_name"], "MODEL.WEIGHT_PATH", b["weights"],
                         "MODEL.TYPE", b["model_type"], "DATA.FEATURE", b["feature"], "DATA.CROPSIZE", str(image.size)])
    model = VQT(build_backbone(cfg), QuerySpec(**export["spec"]), export["feat_ids"],
                Method(**export.get("method", {})))  # exports written before the baselines existed hold VQT
    model.load_trained_state(export["trained"])
    return Loaded(model.to(device).eval(), list(export["classes"]), image)


def load_model(path: str, device: torch.device | str = "cpu", weights: str = "") -> Loaded:
    """A trained VQT from a final run folder or an export file (`scripts/export.py`)."""
    if os.path.isdir(path):
        return load_export(run_export(path, weights), device)
    if not os.path.isfile(path):
        raise VQTError(f"{path} does not exist: pass a final run folder (.../run1) or an export file")
    try:
        export = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything unreadable is the same user error
        raise VQTError(f"cannot read {path} as a VQT export ({type(e).__name__}): write one with scripts/export.py"
                       ) from None
    if not isinstance(export, dict) or export.get("format") != FORMAT:
        raise VQTError(f"{path} is not a VQT export ({FORMAT}): write one with scripts/export.py")
    if weights:
        export["backbone"]["weights"] = os.path.abspath(weights)
    return load_export(export, device)
