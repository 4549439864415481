"""Default configuration (yacs). YAML files override these, then `KEY VALUE` pairs on the command line.

Every key changes a run's numbers (and enters its identity, `src.engine.identity`) unless it is defined
with a tag: `_tag(SAME, ...)`, its value never changes a run's numbers (paths, devices, logging, how the
engine runs); `_tag(PER_RUN, ...)`, it enters each run's identity as that run's lr, weight decay or seed.
"""
from __future__ import annotations

import os

import yaml
from yacs.config import CfgNode

from src.configs.validate import type_problem
from src.configs.vit_configs import DEFAULT_FEATURE
from src.errors import VQTError

SAME, PER_RUN = "same numbers", "per run"
TAGS: dict[str, str] = {}  # key -> SAME or PER_RUN; untagged keys change numbers


def _tag(tag: str, key: str, value) -> None:
    """Define the dotted `key` with its default `value`, tagged `tag` (SAME or PER_RUN)."""
    *sections, leaf = key.split(".")
    node = _C
    for part in sections:
        node = node[part]
    setattr(node, leaf, value)
    TAGS[key] = tag


_C = CfgNode()
_C.DBG = False                         # a quick check of the pipeline: at most 20 training steps per epoch
_tag(SAME, "OUTPUT_DIR", "output/vqt")  # experiment root; the protocol adds _val/_final/_sparsefinal
_tag(PER_RUN, "SEED", 100)             # seed of the search runs (the original's); finals: 42, 44, 82, 100, 800
_tag(SAME, "DEVICE", "auto")           # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
_tag(SAME, "CUDNN_BENCHMARK", False)   # torch.backends.cudnn.benchmark on a GPU

_C.MODEL = CfgNode()
# "h2t-prompt" (VQT) or a comparison (src/models/petl.py, README "Baselines"): linear, end2end, partial-1,
# tinytl-bias, prompt, adapter, adaptformer, lora, vqt+prompt, vqt+adaptformer, vqt+lora
_C.MODEL.TRANSFER_TYPE = "h2t-prompt"
# "h2t-vit" (supervised ViT) or "h2t-ssl-vit" (MAE / MoCo-v3): must match DATA.FEATURE
_C.MODEL.TYPE = "h2t-vit"
_tag(SAME, "MODEL.MODEL_ROOT", "")     # folder holding the pre-trained checkpoints (see MODEL_ZOO)
# explicit checkpoint file; overrides MODEL_ROOT/MODEL_ZOO[FEATURE] (with TIMM_NAME: a local .safetensors /
# .pth / .npz of that model, else the local timm/HF cache)
_tag(SAME, "MODEL.WEIGHT_PATH", "")
# a timm ViT instead of the zoo, e.g. vit_base_patch14_reg4_dinov2.lvd142m, vit_base_patch16_clip_224.openai,
# vit_base_patch16_siglip_224 (never downloaded: scripts/download_weights.py --timm NAME); images get its mean/std
_C.MODEL.TIMM_NAME = ""
# final and sparsity runs write last_model.pth (trained tensors only) and their val/test logits;
# compression needs them. Search runs never do.
_tag(SAME, "MODEL.SAVE_CKPT", True)
_C.MODEL.MLP_NUM = 0                   # hidden layers in the head; only 0 (a linear head) is supported

_C.MODEL.H2T = CfgNode()
_C.MODEL.H2T.NUM_QUERY_TOKENS = 5      # Q, query tokens per layer (0: linear probe on the final feature)
_C.MODEL.H2T.DROPOUT = 0.0             # dropout on the query tokens during training
_C.MODEL.H2T.NORMALIZE_FEATS = True    # L2-normalise each feature block (final feature, each layer) before concat
_C.MODEL.H2T.POOLING_FEATS = False     # mean over a layer's Q outputs instead of flattening them
_C.MODEL.H2T.WEIGHTED_SUM_FEATS = False  # learned weighted sum over a layer's Q outputs
_C.MODEL.H2T.LRP_COEF = 0.0            # group lasso on the head's columns, coef * sum_j ||W[:, j]||_2 (compress: > 0)
_C.MODEL.H2T.KEEP_FRAC = 1.0           # fraction of head-input features kept (featselect only)
# The original leaves dropout(0.1) on the frozen ViT's patch+position embeddings active in
# training. True reproduces that (no exact cache: the backbone runs every step); False makes the
# frozen path deterministic so its keys/values are cached once (exact, much faster).
_C.MODEL.H2T.EMBED_DROPOUT_IN_TRAIN = False
# A variant, not in the paper: query tokens also attend to their own layer's query tokens (trained
# on the reference path; the stacked engine cannot express it).
_C.MODEL.H2T.QUERY_ATTENDS_QUERIES = False

# VPT's prompts (TRANSFER_TYPE prompt, vqt+prompt), the original's keys; only the values it runs are accepted.
_C.MODEL.PROMPT = CfgNode()
_C.MODEL.PROMPT.NUM_TOKENS = 5      # T prompt tokens per layer
_C.MODEL.PROMPT.DEEP = False        # fresh prompts before every layer (VPT-deep) instead of before the first only
_C.MODEL.PROMPT.DROPOUT = 0.0       # dropout on the (projected) prompts in training
_C.MODEL.PROMPT.PROJECT = -1        # > -1: prompts of this width, projected to the ViT's width by a trained Linear
_C.MODEL.PROMPT.LOCATION = "prepend"  # only "prepend" (after the CLS token), as the original asserts
_C.MODEL.PROMPT.INITIATION = "random"  # only "random" (U(-v, v), v = sqrt(6 / (3 P^2 + width)))
_C.MODEL.PROMPT.NUM_DEEP_LAYERS = None  # only None (every layer), as the original asserts
_C.MODEL.PROMPT.DEEP_SHARED = False  # only False, as the original asserts
_C.MODEL.PROMPT.VIT_POOL_TYPE = "original"  # only "original" (the backbone's own final feature)

# VPT's adapter (TRANSFER_TYPE adapter): a bottleneck D -> D // REDUCATION_FACTOR on each MLP output.
_C.MODEL.ADAPTER = CfgNode()
_C.MODEL.ADAPTER.REDUCATION_FACTOR = 8  # (the original's spelling)
_C.MODEL.ADAPTER.STYLE = "Pfeiffer"  # only "Pfeiffer", as the original
_C.MODEL.ADAPTER.ZERO_INIT = False  # True: the original code's all-zero init, under which only Up's bias learns;
                                    # False: weights N(0, 0.01^2), biases 0 (the adapter papers' near-identity init)

# AdaptFormer (TRANSFER_TYPE adaptformer, vqt+adaptformer): SCALE * Up(dropout(ReLU(Down(x)))) beside each MLP.
_C.MODEL.ADAPTFORMER = CfgNode()
_C.MODEL.ADAPTFORMER.BOTTLENECK = 64
_C.MODEL.ADAPTFORMER.SCALE = 0.1
_C.MODEL.ADAPTFORMER.DROPOUT = 0.1

# LoRA (TRANSFER_TYPE lora, vqt+lora): W + (ALPHA / RANK) B A on the query and value projections of every block.
_C.MODEL.LORA = CfgNode()
_C.MODEL.LORA.RANK = 8
_C.MODEL.LORA.ALPHA = 8.0

_C.SOLVER = CfgNode()
_C.SOLVER.LOSS = "softmax"             # only softmax cross-entropy
_C.SOLVER.OPTIMIZER = "sgd"            # "adam" (coupled L2 decay, as torch.optim.Adam) or "sgd"
_C.SOLVER.MOMENTUM = 0.9               # SGD momentum
# the lr x wd grid the search trains (--train-type): "" = MODEL.TRANSFER_TYPE's, or one of src/configs/transfer.py's
# (h2t-prompt, linear, linear_mae, prompt, prompt_largerlr, finetune); the runs' own lr and wd enter their identity
_tag(SAME, "SOLVER.SEARCH_GRID", "")
# None: lr/wd from the search. Given (both, or --lr/--wd): no search, the runs use exactly this lr and
# L2 decay (head bias never decayed)
_tag(PER_RUN, "SOLVER.BASE_LR", None)
_tag(PER_RUN, "SOLVER.WEIGHT_DECAY", None)
_C.SOLVER.SCHEDULER = "cosine"         # per-epoch linear warm-up then cosine (epoch 0 has lr 0), or "constant"
_C.SOLVER.WARMUP_EPOCH = 5
_C.SOLVER.TOTAL_EPOCH = 30
_C.SOLVER.PATIENCE = 300               # early stopping is not implemented: must be >= TOTAL_EPOCH
_tag(SAME, "SOLVER.LOG_EVERY_N", 1000)  # log the training loss every N steps
_tag(SAME, "SOLVER.DBG_TRAINABLE", False)  # log the trainable tensors and their sizes

_C.DATA = CfgNode()
_C.DATA.NAME = ""                      # VTAB task, e.g. 'vtab-clevr(task="count_all")'; with SOURCE folder any name
_tag(SAME, "DATA.DATAPATH", "")        # TFDS data_dir (SOURCE tfds) or the VTAB-1k image-folder root
# "tfds", "imagefolder" (NOAH-style vtab-1k folders) or "folder" (your own images:
# DATAPATH/{train,val,test}/<class>/*, see src/data/folder.py)
_C.DATA.SOURCE = "tfds"
# backbone key of MODEL_ZOO, e.g. sup_vitb16_imagenet21k; with MODEL.TIMM_NAME a label for the output
# folders (a zoo key, e.g. this default, becomes TIMM_NAME)
_C.DATA.FEATURE = DEFAULT_FEATURE
_C.DATA.NUMBER_CLASSES = -1            # VTAB: the task's count; SOURCE folder: -1 = from the class folders
_C.DATA.CROPSIZE = 224                 # image side; 0: the backbone's own (timm config; 224 for the zoo)
# filter resizing SOURCE folder images (Pillow's name, e.g. bicubic); "": the backbone's (timm config;
# bilinear for the zoo), filled in when a run starts
_C.DATA.INTERPOLATION = ""
_C.DATA.BATCH_SIZE = 32
_tag(SAME, "DATA.NUM_WORKERS", 4)      # threads decoding examples
_tag(SAME, "DATA.PIN_MEMORY", True)    # pinned host buffers for cached keys/values copied to a GPU
_C.DATA.MULTILABEL = False             # VTAB is single-label; True is rejected
_C.DATA.CLASS_WEIGHTS_TYPE = "none"    # only "none" (unit class weights)

# How the protocol runs (not in the original). The keys tagged SAME only change its speed and memory;
# CACHE_DTYPE (unless float32), TF32 and AUTOCAST change the numbers (measured drift in benchmarks/README.md).
_C.ENGINE = CfgNode()
# train a phase's runs at once on the stacked engine; False: one by one on the reference loop (backbone
# every step: the original's cost profile)
_tag(SAME, "ENGINE.GRID", True)
# stacked engine: "auto" caches the frozen path unless EMBED_DROPOUT_IN_TRAIN; "on"; "off"
_tag(SAME, "ENGINE.CACHE", "auto")
_C.ENGINE.CACHE_DTYPE = "float32"      # "float32" (exact), "bfloat16" or "float16" (half the memory)
# "auto" (device if it fits, else RAM, else a disk memmap), "device", "cpu", "disk"
_tag(SAME, "ENGINE.CACHE_LOCATION", "auto")
# seed groups (each on its own batches) share a pass while their keys/values stay under this many GiB
# (and 40 % of the free device memory)
_tag(SAME, "ENGINE.FUSED_KV_GIB", 10.0)
_tag(SAME, "ENGINE.EVAL_BATCH_SIZE", 128)  # images per evaluation batch / frozen pass (cache build, test streaming)
_tag(SAME, "ENGINE.TENSORBOARD", False)  # write loss / lr / val top-1 scalars to <run>/tb
# Faster arithmetic that changes numbers (off by default):
_C.ENGINE.TF32 = False                 # CUDA: TF32 matmuls and convolutions (no effect on the CPU)
# "off" or "bf16": bf16 autocast over training and evaluation (both engines; the cache is built in fp32,
# ENGINE.CACHE_DTYPE sets how it is stored)
_C.ENGINE.AUTOCAST = "off"


def get_cfg() -> CfgNode:
    """A fresh copy of the defaults."""
    return _C.clone()


def _merge_file(cfg: CfgNode, path: str) -> None:
    """Merge the yaml file `path` into `cfg`; any problem (syntax, a tab, not KEY: VALUE mappings, an unknown
    key, a wrong type) is one line naming the file and where."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise VQTError(f"config file {path} is not valid YAML{where} ({problem}): fix the syntax (indent with "
                       "spaces, not tabs)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VQTError(f"cannot read config file {path} ({e}): pass a readable yaml file") from None
    if not isinstance(data, dict | None):
        raise VQTError(f"config file {path} holds a {type(data).__name__} at the top level: write KEY: VALUE "
                       "mappings, e.g. `DATA:` then `  NAME: ...` on the next line")
    try:
        cfg.merge_from_other_cfg(CfgNode(data or {}))
    except KeyError as e:
        raise VQTError(f"config file {path}: {e.args[0]}; see src/configs/defaults.py for the keys") from None
    except (ValueError, AssertionError) as e:
        key = str(e).rsplit("for config key: ", 1)[-1].strip()
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, CfgNode) else None
        what = "a group of keys (KEY: VALUE lines indented under it)" if isinstance(node, CfgNode) else \
            f"of type {type(node).__name__} (as its default {node!r})"
        raise VQTError(f"config file {path}: {key} must be {what}") from None


def load_cfg(config_file: str = "", opts: list[str] | None = None) -> CfgNode:
    """Defaults, then `config_file`, then `KEY VALUE` pairs; errors name the bad key or file. The values
    are checked by `src.configs.validate.validate` when the protocol starts."""
    cfg = get_cfg()
    if config_file:
        if not os.path.isfile(config_file):
            raise VQTError(f"config file {config_file!r} does not exist (pass --config-file with a yaml under "
                           "configs/)")
        _merge_file(cfg, config_file)
    opts = list(opts or [])
    if len(opts) % 2:
        raise VQTError(f"config overrides must be KEY VALUE pairs; got an odd list: {opts}")
    for key, value in zip(opts[0::2], opts[1::2]):
        node = cfg
        for part in key.split("."):
            if not isinstance(node, CfgNode) or part not in node:
                raise VQTError(f"unknown config key {key!r}; see src/configs/defaults.py for the keys")
            node = node[part]
        try:
            cfg.merge_from_list([key, value])
        except (ValueError, AssertionError):
            raise VQTError(type_problem(key, node, value)) from None
    return cfg
