"""The search grids against the original code's tables (reference-spec §13.1.2 and VQT's own grid)."""
from __future__ import annotations

import pytest

from src.configs.transfer import DEFAULT_GRID, TRANSFER_TYPES, lr_wd_grid
from src.errors import VQTError

L16 = "sup_vitl16_imagenet21k"


@pytest.mark.parametrize(("grid", "optimizer", "arch", "lrs", "wds"), [
    ("finetune", "sgd", "", [0.005, 0.001, 0.0005, 0.0001], [0.01, 0.001, 0.0001, 0.0]),
    ("finetune", "adam", L16, [0.0005, 0.0001], [0.01, 0.0001]),
    ("finetune", "adam", "", [0.001, 0.0005, 0.0001], [0.01, 0.001, 0.0001, 0.0]),
    ("linear", "sgd", "", [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05], [0.01, 0.001, 0.0001, 0.0]),
    ("linear", "adam", L16, [0.5, 0.1, 0.05], [0.01, 0.0001, 0.0]),
    ("linear", "adam", "", [1.0, 0.5, 0.25, 0.1, 0.05], [0.01, 0.001, 0.0001, 0.0]),
    ("prompt", "adam", L16, [1.0, 0.5, 0.25, 0.1, 0.05], [0.01, 0.001, 0.0001, 0.0]),
    ("prompt", "sgd", "", [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05], [0.01, 0.001, 0.0001, 0.0]),
    ("prompt_largerlr", "adam", "", [1000, 500, 250, 100], [0.01, 0.001, 0.0001, 0.0]),
    ("h2t-prompt", "adam", "sup_vith14_imagenet21k", [0.5, 0.1, 0.05], [0.01, 0.0001, 0.0]),
])
def test_grids_are_the_original_codes(grid, optimizer, arch, lrs, wds):
    assert lr_wd_grid(optimizer, arch, grid) == (lrs, wds)


def test_linear_mae_grid_has_52_runs_for_any_optimizer():
    for optimizer in ("sgd", "adam"):
        lrs, wds = lr_wd_grid(optimizer, "", "linear_mae")
        assert len(lrs) * len(wds) == 52 and min(lrs) == 0.0025


def test_every_transfer_type_has_a_default_grid_and_unknown_grids_are_one_line():
    assert set(DEFAULT_GRID) == set(TRANSFER_TYPES)
    with pytest.raises(VQTError, match="finetune_resnet.*not a search grid here; use one of"):
        lr_wd_grid("adam", "", "finetune_resnet")
