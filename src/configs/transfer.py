"""The transfer types (MODEL.TRANSFER_TYPE: VQT and the paper's comparisons, src/models/petl.py) and the original
code's lr x wd search grids (lr before the batch-size scaling) by name (SOLVER.SEARCH_GRID, `--train-type`):
VQT's (`h2t-prompt`) and tune_vtab.py's, which the baselines search."""
from __future__ import annotations

from src.errors import VQTError

QUERY_METHODS = ("h2t-prompt", "vqt+prompt", "vqt+adaptformer", "vqt+lora")  # the types with VQT's query tokens
FROZEN_PATH = ("h2t-prompt", "linear")  # the adaptations that leave the backbone's own path frozen (cacheable)
TRANSFER_TYPES = ("h2t-prompt", "linear", "end2end", "partial-1", "tinytl-bias", "prompt", "adapter", "adaptformer",
                  "lora", "vqt+prompt", "vqt+adaptformer", "vqt+lora")

LARGE_ARCH_FEATS = ("sup_vitl16_imagenet21k", "sup_vith14_imagenet21k")  # --arch_feats choosing the smaller grids
WDS = [0.01, 0.001, 0.0001, 0.0]
LINEAR_SGD = [50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05]
LINEAR_ADAM = [1.0, 0.5, 0.25, 0.1, 0.05]
# (grid, optimizer, large backbone) -> (lrs, wds); optimizer "*" = any, large None = any backbone
GRIDS: dict[tuple[str, str, bool | None], tuple[list[float], list[float]]] = {
    ("h2t-prompt", "sgd", None): (LINEAR_SGD, WDS),
    ("h2t-prompt", "adam", True): ([0.5, 0.1, 0.05], [0.01, 0.0001, 0.0]),
    ("h2t-prompt", "adam", False): (LINEAR_ADAM, WDS),
    ("linear", "sgd", None): (LINEAR_SGD, WDS),
    ("linear", "adam", True): ([0.5, 0.1, 0.05], [0.01, 0.0001, 0.0]),
    ("linear", "adam", False): (LINEAR_ADAM, WDS),
    ("linear_mae", "*", None): (LINEAR_SGD + [0.025, 0.005, 0.0025], WDS),
    ("prompt", "sgd", None): (LINEAR_SGD, WDS),
    ("prompt", "adam", None): (LINEAR_ADAM, WDS),
    ("prompt_largerlr", "*", None): ([500.0, 1000.0, 250.0, 100.0], WDS),
    ("finetune", "sgd", None): ([0.001, 0.0001, 0.0005, 0.005], WDS),
    ("finetune", "adam", True): ([0.0001, 0.0005], [0.01, 0.0001]),
    ("finetune", "adam", False): ([0.001, 0.0001, 0.0005], WDS),
}
GRID_NAMES = tuple(dict.fromkeys(name for name, _, _ in GRIDS))
# The grid each MODEL.TRANSFER_TYPE searches unless --train-type names another: VQT's for VQT, tune_vtab's
# `linear` and `prompt` for those types, `finetune` for every type that trains inside the backbone.
DEFAULT_GRID = {"h2t-prompt": "h2t-prompt", "linear": "linear", "prompt": "prompt", "vqt+prompt": "prompt",
                "end2end": "finetune", "partial-1": "finetune", "tinytl-bias": "finetune", "adapter": "finetune",
                "adaptformer": "finetune", "lora": "finetune", "vqt+adaptformer": "finetune", "vqt+lora": "finetune"}


def adaptation(transfer_type: str) -> str:
    """What a transfer type does to the backbone: its name without `vqt+` (`h2t-prompt` and `linear` adapt
    nothing)."""
    return transfer_type.removeprefix("vqt+")


def lr_wd_grid(optimizer: str, arch_feats: str = "", grid: str = "h2t-prompt") -> tuple[list[float], list[float]]:
    """The lrs and wds of search grid `grid` for SOLVER.OPTIMIZER `optimizer`, each sorted descending."""
    if grid not in GRID_NAMES:
        raise VQTError(f"SOLVER.SEARCH_GRID (--train-type) {grid!r} is not a search grid here; use one of "
                       f"{', '.join(GRID_NAMES)}")
    large = arch_feats in LARGE_ARCH_FEATS
    for key in ((grid, optimizer, large), (grid, optimizer, None), (grid, "*", None)):
        if key in GRIDS:
            lrs, wds = GRIDS[key]
            return sorted(lrs, reverse=True), sorted(wds, reverse=True)
    raise VQTError(f"no {grid} search grid for SOLVER.OPTIMIZER {optimizer!r}; use adam or sgd")
