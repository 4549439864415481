"""The one validation pass over a config (src/configs/validate.py) and its key tags."""
from __future__ import annotations

import re

import pytest

from src.configs.defaults import PER_RUN, SAME, TAGS, get_cfg
from src.configs.validate import CHOICES, RANGES, lookup, type_problem, validate
from src.errors import VQTError


def _cfg(**over):
    """The defaults on a real task and zoo backbone, with `over` ({"SECTION__KEY": value}) applied."""
    cfg = get_cfg()
    cfg.DATA.NAME, cfg.DATA.NUMBER_CLASSES, cfg.DATA.FEATURE = "vtab-dtd", 47, "demo_vit_tiny"
    for key, value in over.items():
        *sections, leaf = key.split("__")
        node = cfg
        for part in sections:
            node = node[part]
        node[leaf] = value
    return cfg


def _raises(message: str, cfg, sparse_mode: str | None = None) -> None:
    with pytest.raises(VQTError, match="^" + re.escape(message)):
        validate(cfg, sparse_mode)


def test_defaults_pass_and_every_rule_and_tag_names_a_key():
    validate(_cfg())
    validate(_cfg(SOLVER__BASE_LR=0.1, SOLVER__WEIGHT_DECAY=0.0))
    validate(_cfg(MODEL__H2T__LRP_COEF=1e-4), "compress")
    validate(_cfg(MODEL__H2T__KEEP_FRAC=0.5), "featselect")
    for key in [*RANGES, *CHOICES, *TAGS]:
        lookup(get_cfg(), key)
    assert set(TAGS.values()) == {SAME, PER_RUN}


@pytest.mark.parametrize("key, value, message", [
    ("MODEL__H2T__NUM_QUERY_TOKENS", 1.5, "MODEL.H2T.NUM_QUERY_TOKENS must be a whole number (got 1.5)"),
    ("MODEL__H2T__NUM_QUERY_TOKENS", 1.0, "MODEL.H2T.NUM_QUERY_TOKENS must be a whole number (got 1.0; write 1)"),
    ("SOLVER__BASE_LR", "fast", "SOLVER.BASE_LR must be a number > 0 (or None: searched) (got 'fast')"),
    ("DATA__BATCH_SIZE", True, "DATA.BATCH_SIZE must be a whole number >= 1 (got True)"),
])
def test_values_of_the_wrong_type_are_named(key, value, message):
    """Values set from Python (yacs checks the types of overrides; ranges: test_protocol)."""
    _raises(f"{message}: fix it in the config file", _cfg(**{key: value}))


@pytest.mark.parametrize("over, sparse_mode, message", [
    ({"SOLVER__OPTIMIZER": "adamw"}, None, "SOLVER.OPTIMIZER 'adamw' is not one of 'adam', 'sgd' (adamw is not"),
    ({"ENGINE__AUTOCAST": "fp16"}, None, "ENGINE.AUTOCAST 'fp16' is not one of 'off', 'bf16'"),
    ({"ENGINE__CACHE_LOCATION": "gpu"}, None, "ENGINE.CACHE_LOCATION 'gpu' is not one of 'auto', 'device', 'cpu'"),
    ({"ENGINE__CACHE_DTYPE": "int8"}, None, "ENGINE.CACHE_DTYPE 'int8' is not one of 'float32', 'bfloat16'"),
    ({"DATA__SOURCE": "s3"}, None, "DATA.SOURCE 's3' is not one of 'tfds', 'imagefolder', 'folder'"),
    ({"DATA__MULTILABEL": True}, None, "DATA.MULTILABEL True is not one of False (VTAB tasks are single-label)"),
    ({"MODEL__MLP_NUM": 1}, None, "MODEL.MLP_NUM 1 is not one of 0"),
    ({"SOLVER__WARMUP_EPOCH": 30}, None, "SOLVER.WARMUP_EPOCH (30) must be below SOLVER.TOTAL_EPOCH (30)"),
    ({"SOLVER__PATIENCE": 2}, None, "SOLVER.PATIENCE 2 < TOTAL_EPOCH: early stopping is not implemented"),
    ({"SOLVER__BASE_LR": 0.1}, None, "give both SOLVER.BASE_LR and SOLVER.WEIGHT_DECAY"),
    ({"ENGINE__CACHE": "on", "ENGINE__GRID": False}, None, "ENGINE.CACHE on needs ENGINE.GRID True"),
    ({"ENGINE__CACHE": "on", "MODEL__H2T__EMBED_DROPOUT_IN_TRAIN": True}, None, "ENGINE.CACHE on is not exact"),
    ({"MODEL__H2T__KEEP_FRAC": 0.5}, None, "MODEL.H2T.KEEP_FRAC applies to --sparse-mode featselect only"),
    ({}, "prune", "--sparse-mode 'prune' is not one of compress, featselect"),
    ({}, "compress", "compress needs MODEL.H2T.KEEP_FRAC 1.0 and MODEL.H2T.LRP_COEF > 0"),
    ({"MODEL__H2T__LRP_COEF": 1e-4, "MODEL__H2T__KEEP_FRAC": 0.5}, "compress", "compress needs"),
    ({"MODEL__H2T__LRP_COEF": 1e-4}, "featselect", "featselect needs MODEL.H2T.LRP_COEF 0.0"),
    ({"MODEL__TIMM_NAME": "vit_small_patch16_224"}, None, "MODEL.TIMM_NAME vit_small_patch16_224 and the zoo"),
])
def test_values_outside_their_choices_and_contradicting_settings_are_named(over, sparse_mode, message):
    _raises(message, _cfg(**over), sparse_mode)


def test_task_and_backbone_names_are_checked():
    _raises("DATA.NUMBER_CLASSES is 6 but vtab-dtd has 47 classes: set DATA.NUMBER_CLASSES 47",
            _cfg(DATA__NUMBER_CLASSES=6))
    _raises("unknown DATA.NAME 'vtab-dtdd'", _cfg(DATA__NAME="vtab-dtdd"))
    validate(_cfg(DATA__NAME="my_images", DATA__SOURCE="folder", DATA__NUMBER_CLASSES=-1))
    _raises("unknown DATA.FEATURE 'vit_b'", _cfg(DATA__FEATURE="vit_b"))
    _raises("DATA.FEATURE mae_vitb16 needs MODEL.TYPE 'h2t-ssl-vit', got 'h2t-vit'", _cfg(DATA__FEATURE="mae_vitb16"))
    validate(_cfg(MODEL__TIMM_NAME="vit_small_patch16_224", DATA__FEATURE="sup_vitb16_224"))  # the default: a label


@pytest.mark.parametrize("key, current, text, message", [
    ("MODEL.H2T.NUM_QUERY_TOKENS", 5, "1.5", "MODEL.H2T.NUM_QUERY_TOKENS must be a whole number (got 1.5)"),
    ("MODEL.H2T.NUM_QUERY_TOKENS", 5, "1.0", "MODEL.H2T.NUM_QUERY_TOKENS must be a whole number (got 1.0; write 1)"),
    ("MODEL.H2T.KEEP_FRAC", 1.0, "1", "MODEL.H2T.KEEP_FRAC must be a float: write 1.0"),
    ("DATA.BATCH_SIZE", 32, "True", "DATA.BATCH_SIZE must be a whole number (got True)"),
])
def test_type_problem_of_an_override(key, current, text, message):
    assert type_problem(key, current, text) == message
