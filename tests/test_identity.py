"""A run's identity: the config keys in it are those not tagged in src/configs/defaults.py."""
from __future__ import annotations

import pytest

from src.configs.defaults import TAGS, get_cfg
from src.engine.identity import run_identity, task_settings


def _settings(tmp_path, key: str | None = None, value=None) -> dict[str, str]:
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"weights")
    cfg = get_cfg()
    if key is not None:
        cfg.merge_from_list([key, value])
    return task_settings(cfg, str(weights), "data-id")


@pytest.mark.parametrize("key, value", [("ENGINE.TF32", True), ("ENGINE.AUTOCAST", "bf16"),
                                        ("ENGINE.CACHE_DTYPE", "bfloat16"), ("MODEL.H2T.DROPOUT", 0.1),
                                        ("DATA.INTERPOLATION", "bicubic"), ("DBG", True)])
def test_untagged_keys_change_the_identity(tmp_path, key, value):
    base = _settings(tmp_path)
    changed = _settings(tmp_path, key, value)
    assert changed[key] == repr(value) and changed != base
    assert run_identity(changed, 0.1, 0.0, 42)["identity"] != run_identity(base, 0.1, 0.0, 42)["identity"]


@pytest.mark.parametrize("key, value", [("ENGINE.GRID", False), ("ENGINE.CACHE_LOCATION", "disk"),
                                        ("OUTPUT_DIR", "elsewhere"), ("SEED", 7), ("SOLVER.BASE_LR", 0.5)])
def test_tagged_keys_stay_out(tmp_path, key, value):
    assert key in TAGS
    assert _settings(tmp_path, key, value) == _settings(tmp_path)


def test_settings_hold_every_untagged_key_and_the_files(tmp_path):
    settings = _settings(tmp_path)
    assert not set(settings) & set(TAGS) and {"weights", "data", "ENGINE.TF32", "MODEL.TYPE"} <= set(settings)
