"""Range checks of the numeric config keys (src/configs/checks.py)."""
from __future__ import annotations

import pytest

from src.configs.checks import RULES, check_values, type_problem
from src.configs.defaults import get_cfg, load_cfg
from src.errors import VQTError


def test_defaults_pass_and_every_rule_names_a_key():
    cfg = get_cfg()
    check_values(cfg)
    for key in RULES:
        node = cfg
        for part in key.split("."):
            assert part in node, key
            node = node[part]


@pytest.mark.parametrize("key, value, message", [
    ("MODEL.H2T.NUM_QUERY_TOKENS", 1.5, "MODEL.H2T.NUM_QUERY_TOKENS must be a whole number (got 1.5)"),
    ("MODEL.H2T.NUM_QUERY_TOKENS", 1.0, "MODEL.H2T.NUM_QUERY_TOKENS must be a whole number (got 1.0; write 1)"),
    ("SOLVER.BASE_LR", "fast", "SOLVER.BASE_LR must be a number > 0 (or None: searched) (got 'fast')"),
    ("DATA.BATCH_SIZE", True, "DATA.BATCH_SIZE must be a whole number >= 1 (got True)"),
])
def test_wrong_types_are_named(key, value, message):
    cfg = get_cfg()
    section, _, leaf = key.rpartition(".")
    node = cfg
    for part in section.split("."):
        node = node[part]
    node[leaf] = value
    with pytest.raises(VQTError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        check_values(cfg)


def test_searched_keys_may_be_none():
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = cfg.SOLVER.WEIGHT_DECAY = None
    check_values(cfg)


def test_load_cfg_checks_the_values():
    with pytest.raises(VQTError, match=r"^SOLVER.TOTAL_EPOCH must be >= 1 \(got 0\)"):
        load_cfg("", ["SOLVER.TOTAL_EPOCH", "0"])


@pytest.mark.parametrize("key, current, text, message", [
    ("MODEL.H2T.NUM_QUERY_TOKENS", 5, "1.5", "MODEL.H2T.NUM_QUERY_TOKENS must be a whole number (got 1.5)"),
    ("MODEL.H2T.NUM_QUERY_TOKENS", 5, "1.0", "MODEL.H2T.NUM_QUERY_TOKENS must be a whole number (got 1.0; write 1)"),
    ("MODEL.H2T.KEEP_FRAC", 1.0, "1", "MODEL.H2T.KEEP_FRAC must be a float: write 1.0"),
    ("DATA.BATCH_SIZE", 32, "True", "DATA.BATCH_SIZE must be a whole number (got True)"),
])
def test_type_problem_of_an_override(key, current, text, message):
    assert type_problem(key, current, text) == message
