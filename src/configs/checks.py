"""Range checks of the numeric config keys, run before anything is read or written."""
from __future__ import annotations

import ast
from collections.abc import Callable
from numbers import Real

from yacs.config import CfgNode

from src.errors import VQTError

# key -> (whole number?, may be None?, allowed?, what is allowed)
RULES: dict[str, tuple[bool, bool, Callable[[float], bool], str]] = {
    "SEED": (True, False, lambda v: v >= 0, ">= 0"),
    "MODEL.H2T.NUM_QUERY_TOKENS": (True, False, lambda v: v >= 0, ">= 0"),
    "MODEL.H2T.DROPOUT": (False, False, lambda v: 0 <= v < 1, "in [0, 1)"),
    "MODEL.H2T.LRP_COEF": (False, False, lambda v: v >= 0, ">= 0"),
    "MODEL.H2T.KEEP_FRAC": (False, False, lambda v: 0 < v <= 1, "in (0, 1]"),
    "SOLVER.MOMENTUM": (False, False, lambda v: 0 <= v < 1, "in [0, 1)"),
    "SOLVER.BASE_LR": (False, True, lambda v: v > 0, "> 0 (or None: searched)"),
    "SOLVER.WEIGHT_DECAY": (False, True, lambda v: v >= 0, ">= 0 (or None: searched)"),
    "SOLVER.TOTAL_EPOCH": (True, False, lambda v: v >= 1, ">= 1"),
    "SOLVER.WARMUP_EPOCH": (True, False, lambda v: v >= 0, ">= 0"),
    "SOLVER.PATIENCE": (True, False, lambda v: v >= 0, ">= 0"),
    "SOLVER.LOG_EVERY_N": (True, False, lambda v: v >= 1, ">= 1"),
    "DATA.NUMBER_CLASSES": (True, False, lambda v: v == -1 or v >= 2, "-1 (unset) or >= 2"),
    "DATA.CROPSIZE": (True, False, lambda v: v >= 0, ">= 0 (0: the backbone's own input size)"),
    "DATA.BATCH_SIZE": (True, False, lambda v: v >= 1, ">= 1"),
    "DATA.NUM_WORKERS": (True, False, lambda v: v >= 0, ">= 0"),
    "ENGINE.FUSED_KV_GIB": (False, False, lambda v: v >= 0, ">= 0"),
    "ENGINE.EVAL_BATCH_SIZE": (True, False, lambda v: v >= 1, ">= 1"),
}

CHOICES: dict[str, tuple[str, ...]] = {"DATA.SOURCE": ("tfds", "imagefolder", "folder")}
FOLDER_NAMES = ("DATA.NAME", "DATA.FEATURE")  # each names one folder of the results layout


def _choice_problem(cfg: CfgNode, key: str) -> str:
    try:
        value = _lookup(cfg, key)
    except KeyError:
        return ""
    if value in CHOICES[key]:
        return ""
    return f"{key} {value!r} is not one of {', '.join(CHOICES[key])}: fix it in the config file or the overrides"


def _folder_name_problem(cfg: CfgNode, key: str) -> str:
    """Why `key`'s value cannot be one folder name under OUTPUT_DIR (a path, `..`), or ""."""
    try:
        value = _lookup(cfg, key)
    except KeyError:
        return ""
    if not isinstance(value, str) or ("/" not in value and "\\" not in value and value not in (".", "..")):
        return ""
    return (f"{key} {value!r} must be one folder name (results go to OUTPUT_DIR_final/<DATA.NAME>/<DATA.FEATURE>): "
            "drop the '/' and '..' (the data's location goes in DATA.DATAPATH)")


def _lookup(cfg: CfgNode, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _problem(key: str, value, whole: bool, optional: bool, allowed: Callable[[float], bool], text: str) -> str:
    """Why `value` is not valid for `key`, or "" when it is."""
    if value is None and optional:
        return ""
    if isinstance(value, bool) or not isinstance(value, Real):
        return f"{key} must be a {'whole ' if whole else ''}number {text} (got {value!r})"
    if whole and not isinstance(value, int):
        hint = f"; write {int(value)}" if float(value).is_integer() else ""
        return f"{key} must be a whole number (got {value!r}{hint})"
    if not allowed(value):
        return f"{key} must be {text} (got {value!r})"
    return ""


def check_values(cfg: CfgNode) -> None:
    """Raise a VQTError naming the first numeric key whose value is out of range (keys absent
    from `cfg` are skipped)."""
    for key, rule in RULES.items():
        try:
            value = _lookup(cfg, key)
        except KeyError:
            continue
        problem = _problem(key, value, *rule)
        if problem:
            raise VQTError(f"{problem}: fix it in the config file or the KEY VALUE overrides")
    problems = [_choice_problem(cfg, key) for key in CHOICES] + [_folder_name_problem(cfg, key) for key in FOLDER_NAMES]
    if any(problems):
        raise VQTError(next(p for p in problems if p))
    if not str(cfg.get("OUTPUT_DIR", "-")).strip():
        raise VQTError("OUTPUT_DIR is empty: the results would land in the current folder as _val/, _final/; "
                       "set OUTPUT_DIR (e.g. output/vqt)")
    warmup, total = cfg.SOLVER.WARMUP_EPOCH, cfg.SOLVER.TOTAL_EPOCH
    if warmup >= total:
        raise VQTError(f"SOLVER.WARMUP_EPOCH ({warmup}) must be below SOLVER.TOTAL_EPOCH ({total}): "
                       "lower the warm-up or train longer")


def type_problem(key: str, current, text: str) -> str:
    """One line for the override `key text` whose type yacs rejected; `current` is the key's value."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if _is_int(current) and isinstance(value, float):
        return _problem(key, value, True, False, lambda v: True, "")
    if _is_int(current) and not _is_int(value):
        return f"{key} must be a whole number (got {text})"
    if isinstance(current, float) and _is_int(value):
        return f"{key} must be a float: write {value}.0"
    return f"{key} must be of type {type(current).__name__} (got {text!r})"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
