"""The one validation pass over a config: every rule (numeric ranges, allowed values, combinations, names
of the task and the backbone) is checked by `validate` before anything is read or written; nothing
re-checks them at runtime. `type_problem` explains a `KEY VALUE` override whose type yacs rejected."""
from __future__ import annotations

import ast
from collections.abc import Callable
from numbers import Real

from yacs.config import CfgNode

from src.configs.transfer import FROZEN_PATH, GRID_NAMES, QUERY_METHODS, TRANSFER_TYPES, adaptation
from src.configs.vit_configs import DEFAULT_FEATURE, MODEL_ZOO, zoo_entry
from src.data.tasks import get_task
from src.errors import VQTError

SPARSE_MODES = ("compress", "featselect")

# key -> (whole number?, may be None?, allowed?, what is allowed)
RANGES: dict[str, tuple[bool, bool, Callable[[float], bool], str]] = {
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
    "MODEL.PROMPT.NUM_TOKENS": (True, False, lambda v: v >= 1, ">= 1"),
    "MODEL.PROMPT.DROPOUT": (False, False, lambda v: 0 <= v < 1, "in [0, 1)"),
    "MODEL.PROMPT.PROJECT": (True, False, lambda v: v == -1 or v >= 1, "-1 (none) or >= 1"),
    "MODEL.ADAPTER.REDUCATION_FACTOR": (True, False, lambda v: v >= 1, ">= 1"),
    "MODEL.ADAPTFORMER.BOTTLENECK": (True, False, lambda v: v >= 1, ">= 1"),
    "MODEL.ADAPTFORMER.SCALE": (False, False, lambda v: v > 0, "> 0"),
    "MODEL.ADAPTFORMER.DROPOUT": (False, False, lambda v: 0 <= v < 1, "in [0, 1)"),
    "MODEL.LORA.RANK": (True, False, lambda v: v >= 1, ">= 1"),
    "MODEL.LORA.ALPHA": (False, False, lambda v: v > 0, "> 0"),
}
# The MODEL.H2T keys only a transfer type with query tokens reads, and the method nodes each type reads.
QUERY_KEYS = ("NUM_QUERY_TOKENS", "DROPOUT", "NORMALIZE_FEATS", "POOLING_FEATS", "WEIGHTED_SUM_FEATS",
              "EMBED_DROPOUT_IN_TRAIN", "QUERY_ATTENDS_QUERIES")
METHOD_NODES = {"PROMPT": "prompt", "ADAPTER": "adapter", "ADAPTFORMER": "adaptformer", "LORA": "lora"}

# key -> (allowed values, why the others are not)
CHOICES: dict[str, tuple[tuple, str]] = {
    "MODEL.TRANSFER_TYPE": (TRANSFER_TYPES, "VQT or a comparison, README \"Baselines\""),
    "SOLVER.SEARCH_GRID": (("", *GRID_NAMES), "the original code's grids, src/configs/transfer.py"),
    "MODEL.PROMPT.LOCATION": (("prepend",), "the original code asserts it"),
    "MODEL.PROMPT.INITIATION": (("random",), "the original code asserts it"),
    "MODEL.PROMPT.NUM_DEEP_LAYERS": ((None,), "the original code asserts it"),
    "MODEL.PROMPT.DEEP_SHARED": ((False,), "the original code asserts it"),
    "MODEL.PROMPT.VIT_POOL_TYPE": (("original",), "the original code asserts it"),
    "MODEL.ADAPTER.STYLE": (("Pfeiffer",), "the original code runs no other"),
    "MODEL.TYPE": (("h2t-vit", "h2t-ssl-vit"), "a supervised or a self-supervised ViT"),
    "MODEL.MLP_NUM": ((0,), "only a linear head is implemented"),
    "SOLVER.LOSS": (("softmax",), "only softmax cross-entropy is implemented"),
    "SOLVER.OPTIMIZER": (("adam", "sgd"), "adamw is not implemented"),
    "SOLVER.SCHEDULER": (("cosine", "constant"), "the schedules implemented"),
    "DATA.SOURCE": (("tfds", "imagefolder", "folder"), "see src/data/loader.py"),
    "DATA.INTERPOLATION": (("", "nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"), "Pillow's filters"),
    "DATA.MULTILABEL": ((False,), "VTAB tasks are single-label"),
    "DATA.CLASS_WEIGHTS_TYPE": (("none",), "only unit class weights are implemented"),
    "ENGINE.CACHE": (("auto", "on", "off"), "see src/configs/defaults.py"),
    "ENGINE.CACHE_DTYPE": (("float32", "bfloat16", "float16"), "how the cache is stored"),
    "ENGINE.CACHE_LOCATION": (("auto", "device", "cpu", "disk"), "where the cache is stored"),
    "ENGINE.AUTOCAST": (("off", "bf16"), "bf16 autocast or none"),
}

FIX = "fix it in the config file or the KEY VALUE overrides"


def lookup(cfg: CfgNode, key: str):
    """The value of a dotted `key`; KeyError when `cfg` has no such key."""
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


def _value_problems(cfg: CfgNode) -> list[str]:
    """Each key whose value is out of range or not among its choices."""
    out = [p for key, rule in RANGES.items() if (p := _problem(key, lookup(cfg, key), *rule))]
    for key, (allowed, why) in CHOICES.items():
        value = lookup(cfg, key)
        if value not in allowed:
            out.append(f"{key} {value!r} is not one of {', '.join(map(repr, allowed))} ({why})")
    return out


def _combination_problems(cfg: CfgNode, sparse_mode: str | None) -> list[str]:
    """Settings that contradict each other, or the protocol stage `sparse_mode`."""
    m, s, e = cfg.MODEL, cfg.SOLVER, cfg.ENGINE
    h2t = m.H2T
    modes = {None: h2t.KEEP_FRAC == 1.0, "compress": h2t.KEEP_FRAC == 1.0 and h2t.LRP_COEF > 0,
             "featselect": h2t.LRP_COEF == 0.0}
    problems = {
        f"SOLVER.WARMUP_EPOCH ({s.WARMUP_EPOCH}) must be below SOLVER.TOTAL_EPOCH ({s.TOTAL_EPOCH}): lower the "
        "warm-up or train longer": s.WARMUP_EPOCH >= s.TOTAL_EPOCH,
        f"SOLVER.PATIENCE {s.PATIENCE} < TOTAL_EPOCH: early stopping is not implemented; set PATIENCE >= "
        "TOTAL_EPOCH": s.PATIENCE < s.TOTAL_EPOCH,
        "give both SOLVER.BASE_LR and SOLVER.WEIGHT_DECAY (or --lr and --wd) to skip the search, or neither":
            (s.BASE_LR is None) != (s.WEIGHT_DECAY is None),
        "ENGINE.CACHE on needs ENGINE.GRID True (the reference loop runs the backbone every step)":
            e.CACHE == "on" and not e.GRID,
        "ENGINE.CACHE on is not exact with MODEL.H2T.EMBED_DROPOUT_IN_TRAIN True (the frozen path is random in "
        "training); use ENGINE.CACHE auto or off": e.CACHE == "on" and h2t.EMBED_DROPOUT_IN_TRAIN,
        f"--sparse-mode {sparse_mode!r} is not one of {', '.join(SPARSE_MODES)}": sparse_mode not in modes,
        "MODEL.H2T.KEEP_FRAC applies to --sparse-mode featselect only; leave it at 1.0":
            sparse_mode is None and not modes[None],
        "compress needs MODEL.H2T.KEEP_FRAC 1.0 and MODEL.H2T.LRP_COEF > 0":
            sparse_mode == "compress" and not modes["compress"],
        "featselect needs MODEL.H2T.LRP_COEF 0.0": sparse_mode == "featselect" and not modes["featselect"],
        "OUTPUT_DIR is empty: the results would land in the current folder as _val/, _final/; set OUTPUT_DIR (e.g. "
        "output/vqt)": not str(cfg.OUTPUT_DIR).strip(),
        **{f"{key} {value!r} must be one folder name (results go to OUTPUT_DIR_final/<DATA.NAME>/<DATA.FEATURE>): "
           "drop the '/' and '..' (the data's location goes in DATA.DATAPATH)":
           "/" in value or "\\" in value or value in (".", "..")
           for key, value in (("DATA.NAME", cfg.DATA.NAME), ("DATA.FEATURE", cfg.DATA.FEATURE))},
        f"MODEL.TIMM_NAME {m.TIMM_NAME} and the zoo backbone DATA.FEATURE {cfg.DATA.FEATURE} are both given: drop "
        "one (with TIMM_NAME, DATA.FEATURE only labels the output folders)":
            bool(m.TIMM_NAME) and cfg.DATA.FEATURE in MODEL_ZOO and cfg.DATA.FEATURE != DEFAULT_FEATURE,
    }
    return [message for message, bad in problems.items() if bad]


def _method_problems(cfg: CfgNode, sparse_mode: str | None) -> list[str]:
    """A transfer type's settings that it would ignore: another method's keys, query keys without queries."""
    from src.configs.defaults import get_cfg  # defaults imports this module (type_problem)

    name, m, default = cfg.MODEL.TRANSFER_TYPE, cfg.MODEL, get_cfg().MODEL
    base, queries = adaptation(name), name in QUERY_METHODS
    out = [f"MODEL.{node}.{key} is set but MODEL.TRANSFER_TYPE {name} does not use it: drop it, or use a "
           f"TRANSFER_TYPE that does ({reader}{', vqt+' + reader if reader != 'adapter' else ''})"
           for node, reader in METHOD_NODES.items() if base != reader
           for key, value in m[node].items() if value != default[node][key]]
    out += [f"MODEL.H2T.{key} is set but MODEL.TRANSFER_TYPE {name} has no query tokens: drop it, or use "
            "h2t-prompt or a vqt+ type" for key in QUERY_KEYS if not queries and m.H2T[key] != default.H2T[key]]
    if cfg.ENGINE.CACHE == "on" and base not in FROZEN_PATH:
        out.append(f"ENGINE.CACHE on: MODEL.TRANSFER_TYPE {name} trains inside the backbone, whose path then cannot "
                   "be cached; use ENGINE.CACHE auto or off")
    if sparse_mode is not None and name != "h2t-prompt":
        out.append(f"--sparse-mode compresses VQT's head (MODEL.TRANSFER_TYPE h2t-prompt), not {name}'s")
    return out


def _check_names(cfg: CfgNode) -> None:
    """The VTAB task of DATA.NAME and its class count; the zoo backbone of DATA.FEATURE and its MODEL.TYPE."""
    if cfg.DATA.SOURCE != "folder":
        task = get_task(cfg.DATA.NAME)
        if cfg.DATA.NUMBER_CLASSES != task.num_classes:
            raise VQTError(f"DATA.NUMBER_CLASSES is {cfg.DATA.NUMBER_CLASSES} but {task.name} has {task.num_classes} "
                           f"classes: set DATA.NUMBER_CLASSES {task.num_classes}")
    if not cfg.MODEL.TIMM_NAME:
        entry = zoo_entry(cfg.DATA.FEATURE)
        if cfg.MODEL.TYPE != entry.model_type:
            raise VQTError(f"DATA.FEATURE {cfg.DATA.FEATURE} needs MODEL.TYPE {entry.model_type!r}, got "
                           f"{cfg.MODEL.TYPE!r}")


def validate(cfg: CfgNode, sparse_mode: str | None = None) -> None:
    """Check every config rule for the protocol stage `sparse_mode` (None: search and final runs);
    raise a VQTError naming the first key that breaks one and the fix."""
    problems = _value_problems(cfg)
    if problems:
        raise VQTError(f"{problems[0]}: {FIX}")
    problems = _combination_problems(cfg, sparse_mode) + _method_problems(cfg, sparse_mode)
    if problems:
        raise VQTError(problems[0])
    _check_names(cfg)


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
