"""The VQT protocol for one task: lr x wd search on train800/val200, best pick, 5 seeds on
train800val200 with test at the last epoch, and the optional classifier compression stages."""
from __future__ import annotations

import glob
import os
import re

import numpy as np
import torch
from yacs.config import CfgNode

from src.configs.vit_configs import zoo_entry
from src.data.loader import ImageSet, check_classes, load_split, stream_split
from src.data.tasks import get_task
from src.engine.frozen import FrozenFeatures
from src.engine.trainer import HEAD_W, QUERY_KEY, Member, TestSet, train_members
from src.errors import VQTError
from src.models.checkpoints import build_backbone
from src.models.vqt import feature_dim
from src.utils.logging import get_logger, setup_logging
from src.utils.rundir import RunDir, TaskLock, fmt

SEARCH_SEED = 100
FINAL_SEEDS = (42, 44, 82, 100, 800)
SPARSE_MODES = ("compress", "featselect")
LARGE_ARCH_FEATS = ("sup_vitl16_imagenet21k", "sup_vith14_imagenet21k")


def lr_wd_grid(optimizer: str, arch_feats: str = "") -> tuple[list[float], list[float]]:
    """The original's search grids (lr before batch scaling), each sorted descending."""
    if optimizer == "sgd":
        lrs, wds = [5.0, 2.5, 1.0, 50.0, 25.0, 10.0, 0.5, 0.25, 0.1, 0.05], [0.01, 0.001, 0.0001, 0.0]
    elif optimizer == "adam" and arch_feats in LARGE_ARCH_FEATS:
        lrs, wds = [0.5, 0.1, 0.05], [0.01, 0.0001, 0.0]
    elif optimizer == "adam":
        lrs, wds = [1.0, 0.5, 0.25, 0.1, 0.05], [0.01, 0.001, 0.0001, 0.0]
    else:
        raise VQTError(f"no search grid for SOLVER.OPTIMIZER {optimizer!r}; use adam or sgd")
    return sorted(lrs, reverse=True), sorted(wds, reverse=True)


def task_dir(cfg: CfgNode, suffix: str) -> str:
    return os.path.join(cfg.OUTPUT_DIR + suffix, cfg.DATA.NAME, cfg.DATA.FEATURE)


def hp_dir(cfg: CfgNode, suffix: str, lr: float, wd: float) -> str:
    return os.path.join(task_dir(cfg, suffix), f"lr{fmt(lr)}_wd{fmt(wd)}_bs{cfg.DATA.BATCH_SIZE}")


def find_best_lrwd(cfg: CfgNode) -> tuple[float, float]:
    """Best (lr, wd) by val top-1 at the last epoch over the finished search runs; ties go to the
    smaller lr, then to the first in (lr, wd) descending order."""
    logger = get_logger()
    pattern = re.compile(r"lr([0-9.e+-]+)_wd([0-9.e+-]+)_bs(\d+)$")
    found, skipped = [], []
    for path in glob.glob(os.path.join(glob.escape(task_dir(cfg, "_val")), "*", "run1")):
        m = pattern.match(os.path.basename(os.path.dirname(path)))
        if not m or int(m.group(3)) != cfg.DATA.BATCH_SIZE:
            continue
        run = RunDir(path)
        done = run.done
        if done is None or done["status"] != "ok":
            skipped.append(f"{path} ({'incomplete' if done is None else done['status']})")
            continue
        results = torch.load(run.file("eval_results.pth"), weights_only=True)
        last = results[f"epoch_{len(results) - 1}"]["classification"][f"val_{cfg.DATA.NAME}"]["top1"]
        found.append((float(m.group(1)), float(m.group(2)), last))
    if skipped:
        logger.warning("search runs not used for the pick: " + "; ".join(sorted(skipped)))
    if not found:
        raise VQTError(f"no finished search run under {task_dir(cfg, '_val')}: run the search first "
                       "(train.py without --dont_search)")
    found.sort(key=lambda t: (-t[0], -t[1]))
    best = found[0]
    for lr, wd, acc in found[1:]:
        if acc > best[2] or (acc == best[2] and lr < best[0]):
            best = (lr, wd, acc)
    logger.info(f"best search run: lr {best[0]}, wd {best[1]} (val top-1 {best[2] * 100:.2f})")
    return best[0], best[1]


class Task:
    """What one task's runs share: the backbone, the train800 + val200 images and their frozen path."""

    def __init__(self, cfg: CfgNode):
        check_classes(cfg, get_task(cfg.DATA.NAME))
        entry = zoo_entry(cfg.DATA.FEATURE)
        self.cfg = cfg
        self.device = resolve_device(cfg.DEVICE)
        self.embed_dropout = entry.arch.embed_dropout if cfg.MODEL.H2T.EMBED_DROPOUT_IN_TRAIN else 0.0
        mode = cfg.ENGINE.CACHE
        if mode not in ("auto", "on", "off"):
            raise VQTError(f"ENGINE.CACHE {mode!r} is not one of auto, on, off")
        if mode == "on" and self.embed_dropout > 0:
            raise VQTError("ENGINE.CACHE on is not exact with MODEL.H2T.EMBED_DROPOUT_IN_TRAIN True "
                           "(the frozen path is random in training); use ENGINE.CACHE auto or off")
        self.cache = mode == "on" or (mode == "auto" and self.embed_dropout == 0)
        self._frozen = None
        self._backbone = None

    @property
    def backbone(self):
        if self._backbone is None:
            self._backbone = build_backbone(self.cfg).to(self.device)
        return self._backbone

    @property
    def frozen(self) -> FrozenFeatures:
        """train800 rows 0..799 then val200 rows 800..999 (= train800val200), loaded on first use."""
        if self._frozen is None:
            train, val = load_split(self.cfg, "train800"), load_split(self.cfg, "val200")
            images = ImageSet(images=train.images + val.images, labels=np.concatenate([train.labels, val.labels]))
            e = self.cfg.ENGINE
            self._frozen = FrozenFeatures(self.backbone, images, self.cfg.DATA.CROPSIZE, self.device,
                                          cache=self.cache, embed_dropout=self.embed_dropout, dtype=e.CACHE_DTYPE,
                                          location=e.CACHE_LOCATION, batch_size=e.EVAL_BATCH_SIZE,
                                          scratch_dir=self.cfg.OUTPUT_DIR + "_cache")
            self.n_train = len(train)
        return self._frozen

    def rows(self, which: str) -> torch.Tensor:
        n, n_train = len(self.frozen), self.n_train
        return {"train800": torch.arange(n_train), "val200": torch.arange(n_train, n),
                "train800val200": torch.arange(n)}[which]

    def test_set(self) -> TestSet:
        size, batches = stream_split(self.cfg, "test", self.cfg.ENGINE.EVAL_BATCH_SIZE)
        return TestSet(size, batches)

    def train(self, members: list[Member], train: str, *, test: bool, desc: str, **kw) -> list[Member]:
        """Train `members` (all at once with ENGINE.GRID, else one by one) on split `train`."""
        todo = [m for m in members if m.run.done is None]
        for m in members:
            if m.run.done is not None:
                get_logger().info(f"already done ({m.run.done['status']}): {m.run.path}")
            elif m.run.incomplete:
                get_logger().warning(f"incomplete run (no DONE marker), redoing it: {m.run.path}")
        if not todo:
            return members
        setup_logging(os.path.join(os.path.dirname(os.path.dirname(todo[0].run.path)), "logs.txt"))
        chunks = [todo] if self.cfg.ENGINE.GRID else [[m] for m in todo]
        for chunk in chunks:
            train_members(self.cfg, self.backbone, self.frozen, chunk, self.rows(train), self.rows("val200"),
                          test=self.test_set() if test else None, desc=desc, **kw)
        return members

    def close(self) -> None:
        if self._frozen is not None:
            self._frozen.close()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VQTError(f"DEVICE {name} requested but CUDA is not available; use DEVICE cpu or auto")
    return torch.device(name)


def _search(task: Task, cfg: CfgNode, arch_feats: str) -> None:
    lrs, wds = lr_wd_grid(cfg.SOLVER.OPTIMIZER, arch_feats)
    members = [Member(RunDir(os.path.join(hp_dir(cfg, "_val", lr / 256 * cfg.DATA.BATCH_SIZE, wd), "run1")),
                      lr / 256 * cfg.DATA.BATCH_SIZE, wd, SEARCH_SEED) for lr in lrs for wd in wds]
    with TaskLock(task_dir(cfg, "_val")):
        task.train(members, "train800", test=False, save_ckpt=False, desc="search")


def _final_run(cfg: CfgNode, lr: float, wd: float, k: int) -> RunDir:
    """Folder of final seed k (0-based)."""
    return RunDir(os.path.join(hp_dir(cfg, "_final", lr, wd), f"run{k + 1}"))


def _finals(task: Task, cfg: CfgNode) -> list[Member]:
    lr, wd = find_best_lrwd(cfg)
    members = [Member(_final_run(cfg, lr, wd, k), lr, wd, seed) for k, seed in enumerate(FINAL_SEEDS)]
    with TaskLock(task_dir(cfg, "_final")):
        return task.train(members, "train800val200", test=True, save_ckpt=True, desc="final")


def _load_ckpt(run: RunDir, what: str) -> dict:
    done = run.done
    if done is None or done["status"] != "ok":
        state = "missing" if not os.path.isdir(run.path) else ("incomplete" if done is None else done["status"])
        raise VQTError(f"{what} run {run.path} is {state}; run {'scripts/VQT/run_vqt_vtab.sh' if what == 'final' else 'the compress stage'} first")
    path = run.file("last_model.pth")
    if not os.path.isfile(path):
        raise VQTError(f"{path} is missing: the {what} runs must be trained with MODEL.SAVE_CKPT True")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _sparse(task: Task, cfg: CfgNode, mode: str) -> list[Member]:
    h2t = cfg.MODEL.H2T
    if mode == "compress" and not (h2t.KEEP_FRAC == 1.0 and h2t.LRP_COEF > 0):
        raise VQTError("compress needs MODEL.H2T.KEEP_FRAC 1.0 and MODEL.H2T.LRP_COEF > 0")
    if mode == "featselect" and not (0 < h2t.KEEP_FRAC <= 1.0 and h2t.LRP_COEF == 0.0):
        raise VQTError("featselect needs 0 < MODEL.H2T.KEEP_FRAC <= 1.0 and MODEL.H2T.LRP_COEF 0.0")
    lr, wd = find_best_lrwd(cfg)
    stage = "compress" if mode == "compress" else f"keep_frac_{h2t.KEEP_FRAC}"
    base = hp_dir(cfg, "_sparsefinal", lr, wd)
    bb = task.backbone
    per_layer = 1 if (h2t.POOLING_FEATS or h2t.WEIGHTED_SUM_FEATS) else h2t.NUM_QUERY_TOKENS
    keep = feature_dim(bb.embed_dim, bb.depth, h2t.NUM_QUERY_TOKENS, per_layer, h2t.KEEP_FRAC)
    members = []
    for k, seed in enumerate(FINAL_SEEDS):
        run = RunDir(os.path.join(base, stage, f"run{k + 1}"))
        if run.done is not None:
            members.append(Member(run, 0.5 * lr, wd, seed))
            continue
        final = _load_ckpt(_final_run(cfg, lr, wd, k), "final")
        ids = None
        if mode == "featselect":
            head = _load_ckpt(RunDir(os.path.join(base, "compress", f"run{k + 1}")), "compress")[HEAD_W]
            ids = torch.topk(head.norm(dim=0), k=keep).indices
        members.append(Member(run, 0.5 * lr, wd, seed, queries=final.get(QUERY_KEY), feat_ids=ids))
    with TaskLock(os.path.join(task_dir(cfg, "_sparsefinal"), stage)):
        return task.train(members, "train800val200", test=True, save_ckpt=True, desc=stage, freeze_queries=True,
                          lrp_coef=h2t.LRP_COEF if mode == "compress" else 0.0)


def run_protocol(cfg: CfgNode, *, dont_search: bool = False, sparse_mode: str = "", arch_feats: str = "") -> None:
    """Search (unless `dont_search`) then the 5 final runs; or one compression stage (`sparse_mode`)."""
    if cfg.MODEL.TRANSFER_TYPE != "h2t-prompt":
        raise VQTError(f"MODEL.TRANSFER_TYPE {cfg.MODEL.TRANSFER_TYPE!r}: only h2t-prompt (VQT) is implemented")
    if cfg.MODEL.MLP_NUM != 0:
        raise VQTError("MODEL.MLP_NUM must be 0: only a linear head is implemented")
    setup_logging()
    task = Task(cfg)
    try:
        if sparse_mode:
            if sparse_mode not in SPARSE_MODES:
                raise VQTError(f"--sparse-mode {sparse_mode!r} is not one of {SPARSE_MODES}")
            _sparse(task, cfg, sparse_mode)
        else:
            if not dont_search:
                _search(task, cfg, arch_feats)
            _finals(task, cfg)
    finally:
        task.close()
