"""The VQT protocol for one task: lr x wd search on train800/val200, best pick, 5 seeds on
train800val200 with test at the last epoch, and the optional classifier compression stages.

Every phase trains its runs on the stacked engine (`fit_grid`) when it can express them, else one by
one on the reference loop (`fit`); both write the same run folders (`src.utils.layout`).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch
from yacs.config import CfgNode

from src.configs.defaults import get_cfg
from src.configs.vit_configs import MODEL_ZOO, zoo_entry
from src.data.folder import check_folder_classes, scan, write_classes
from src.data.loader import ImageSet, check_classes, check_task_data, data_identity, load_split, stream_split
from src.data.tasks import get_task
from src.engine.fit import fit
from src.engine.frozen import CacheDoesNotFit, FrozenFeatures
from src.engine.grid import fit_grid
from src.engine.identity import differences, run_identity, task_settings
from src.engine.record import RunRecord
from src.engine.runs import AUTOCAST, Recipe, Run, SplitStream, TaskData
from src.engine.search_grids import DEFAULT_GRID, lr_wd_grid
from src.errors import VQTError
from src.models.checkpoints import build_backbone, image_config, weight_path
from src.models.petl import TRANSFER_TYPES, Method
from src.models.vqt import HEAD_B, HEAD_W, VQT, QuerySpec
from src.utils.device import describe_device, resolve_device
from src.utils.layout import Layout, RunDir, TaskLock, last_epoch, stage_name
from src.utils.logging import environment, get_logger, setup_logging, task_log

FINAL_SEEDS = (42, 44, 82, 100, 800)
SPARSE_MODES = ("compress", "featselect")
QUERY_KEYS = ("NUM_QUERY_TOKENS", "DROPOUT", "NORMALIZE_FEATS", "POOLING_FEATS", "WEIGHTED_SUM_FEATS", "EMBED_DROPOUT_IN_TRAIN",
              "QUERY_ATTENDS_QUERIES")  # the MODEL.H2T keys only a method with query tokens reads


def check_supported(cfg: CfgNode) -> None:
    """Reject the original's options that are not implemented, and contradictory settings (one line each)."""
    m, sol, data, eng = cfg.MODEL, cfg.SOLVER, cfg.DATA, cfg.ENGINE
    problems = {
        f"MODEL.TRANSFER_TYPE {m.TRANSFER_TYPE!r} is not one of {', '.join(TRANSFER_TYPES)}":
            m.TRANSFER_TYPE not in TRANSFER_TYPES,
        "MODEL.MLP_NUM must be 0: only a linear head is implemented": m.MLP_NUM != 0,
        f"SOLVER.OPTIMIZER {sol.OPTIMIZER!r}: use adam or sgd (adamw is not implemented)":
            sol.OPTIMIZER not in ("adam", "sgd"),
        f"SOLVER.SCHEDULER {sol.SCHEDULER!r}: use cosine or constant": sol.SCHEDULER not in ("cosine", "constant"),
        f"SOLVER.LOSS {sol.LOSS!r}: only softmax cross-entropy": sol.LOSS != "softmax",
        f"SOLVER.PATIENCE {sol.PATIENCE} < TOTAL_EPOCH: early stopping is not implemented; set PATIENCE >= TOTAL_EPOCH":
            sol.PATIENCE < sol.TOTAL_EPOCH,
        "DATA.MULTILABEL True: VTAB tasks are single-label": data.MULTILABEL,
        f"DATA.CLASS_WEIGHTS_TYPE {data.CLASS_WEIGHTS_TYPE!r}: only none": data.CLASS_WEIGHTS_TYPE != "none",
        "give both SOLVER.BASE_LR and SOLVER.WEIGHT_DECAY (or --lr and --wd) to skip the search, or neither":
            (sol.BASE_LR is None) != (sol.WEIGHT_DECAY is None),
        f"ENGINE.CACHE {eng.CACHE!r} is not one of auto, on, off": eng.CACHE not in ("auto", "on", "off"),
        f"ENGINE.AUTOCAST {eng.AUTOCAST!r} is not one of {', '.join(AUTOCAST)}": eng.AUTOCAST not in AUTOCAST,
        "ENGINE.CACHE on needs ENGINE.GRID True (the reference loop runs the backbone every step)":
            eng.CACHE == "on" and not eng.GRID,
        "ENGINE.CACHE on is not exact with MODEL.H2T.EMBED_DROPOUT_IN_TRAIN True (the frozen path is random in "
        "training); use ENGINE.CACHE auto or off": eng.CACHE == "on" and m.H2T.EMBED_DROPOUT_IN_TRAIN,
    }
    for message, bad in problems.items():
        if bad:
            raise VQTError(message)
    check_method(cfg)


def check_method(cfg: CfgNode) -> None:
    """The method's keys hold values it runs, and no key of another method is set (it would be ignored)."""
    m = cfg.MODEL
    p, default = m.PROMPT, get_cfg().MODEL
    fixed = {"MODEL.PROMPT.LOCATION": (p.LOCATION, "prepend"), "MODEL.PROMPT.INITIATION": (p.INITIATION, "random"),
             "MODEL.PROMPT.NUM_DEEP_LAYERS": (p.NUM_DEEP_LAYERS, None),
             "MODEL.PROMPT.DEEP_SHARED": (p.DEEP_SHARED, False),
             "MODEL.PROMPT.VIT_POOL_TYPE": (p.VIT_POOL_TYPE, "original"),
             "MODEL.ADAPTER.STYLE": (m.ADAPTER.STYLE, "Pfeiffer")}
    for key, (value, only) in fixed.items():
        if value != only:
            raise VQTError(f"{key} {value!r}: only {only!r} is implemented (the original code runs no other)")
    method = Method.from_cfg(cfg)
    readers = {"PROMPT": ("prompt",), "ADAPTER": ("adapter",), "ADAPTFORMER": ("adaptformer",), "LORA": ("lora",)}
    for node, bases in readers.items():
        changed = [k for k, v in m[node].items() if v != default[node][k]]
        if changed and method.base not in bases:
            raise VQTError(f"MODEL.{node}.{changed[0]} is set but MODEL.TRANSFER_TYPE {method.name} does not use it: "
                           f"drop it, or set a TRANSFER_TYPE that does ({', '.join(bases)})")
    queries = [k for k in QUERY_KEYS if m.H2T[k] != default.H2T[k]]
    if queries and not method.queries:
        raise VQTError(f"MODEL.H2T.{queries[0]} is set but MODEL.TRANSFER_TYPE {method.name} has no query tokens: "
                       "drop it, or use h2t-prompt or a vqt+ type")
    if cfg.ENGINE.CACHE == "on" and not method.frozen_path:
        raise VQTError(f"ENGINE.CACHE on: MODEL.TRANSFER_TYPE {method.name} trains inside the backbone, so its path "
                       "cannot be cached; use ENGINE.CACHE auto or off")


def find_best_lrwd(layout: Layout) -> tuple[float, float]:
    """Best (lr, wd) by val top-1 at the last epoch over the finished search runs; ties go to the
    smaller lr, then to the larger wd."""
    logger = get_logger()
    found, skipped = [], []
    for lr, wd, run in layout.search_runs():
        done = run.finished
        if done is None or done["status"] != "ok":
            skipped.append((run.path, "incomplete" if done is None else done["status"], (done or {}).get("message", "")))
            continue
        results = run.load_results()
        found.append((lr, wd, results[f"epoch_{last_epoch(results)}"]["classification"][f"val_{layout.data_name}"]["top1"]))
    if skipped:
        logger.warning("search runs not used for the pick: " + "; ".join(f"{p} ({s})" for p, s, _ in sorted(skipped)))
    diverged = [(p, m) for p, s, m in sorted(skipped) if s == "diverged"]
    if not found and diverged and len(diverged) == len(skipped):
        raise VQTError(f"all {len(diverged)} search runs diverged (first: {diverged[0][0]}: {diverged[0][1]}); fix the "
                       "cause (checkpoint, MODEL.H2T.DROPOUT, ...) and rerun: diverged runs retrain under new settings")
    if not found:
        raise VQTError(f"no finished search run under {layout.task_dir('search')}: run the search first "
                       "(train.py without --dont_search), or give --lr and --wd")
    found.sort(key=lambda t: (-t[0], -t[1]))
    best = found[0]
    for lr, wd, acc in found[1:]:
        if acc > best[2] or (acc == best[2] and lr < best[0]):
            best = (lr, wd, acc)
    logger.info(f"best search run: lr {best[0]}, wd {best[1]} (val top-1 {best[2] * 100:.2f})")
    return best[0], best[1]


class Task:
    """What one task's runs share: the backbone, the train800 + val200 images and, for the stacked
    engine, their frozen path; `train` picks the engine."""

    def __init__(self, cfg: CfgNode, overwrite: bool = False):
        check_names(cfg)
        self.cfg = cfg
        self.layout = Layout.from_cfg(cfg)
        self.spec, self.method = QuerySpec.from_cfg(cfg), Method.from_cfg(cfg)
        self.device = resolve_device(cfg.DEVICE)
        self.device_line = f"device: {describe_device(self.device)}"
        get_logger().info(self.device_line)
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
        self.grid = cfg.ENGINE.GRID and self.spec.stackable and self.method.frozen_path
        if cfg.ENGINE.GRID and not self.method.frozen_path:
            get_logger().info(f"MODEL.TRANSFER_TYPE {self.method.name} trains inside the backbone: the frozen-path "
                              "cache and the stacked engine cannot serve it; training on the reference path")
        elif cfg.ENGINE.GRID and not self.spec.stackable:
            get_logger().info("MODEL.H2T.QUERY_ATTENDS_QUERIES: the stacked engine packs runs into the token axis, "
                              "which needs queries that never attend to queries; training on the reference path")
        self.overwrite = overwrite
        self._backbone = self._images = self._frozen = self._settings = None
        self.n_train = 0

    @property
    def backbone(self):
        if self._backbone is None:
            self._backbone = build_backbone(self.cfg).to(self.device)
        return self._backbone

    @property
    def images(self) -> ImageSet:
        """train800 rows 0..799 then val200 rows 800..999 (= train800val200), loaded on first use."""
        if self._images is None:
            train, val = load_split(self.cfg, "train800"), load_split(self.cfg, "val200")
            self._images = ImageSet(images=train.images + val.images, labels=np.concatenate([train.labels, val.labels]))
            self.n_train = len(train)
        return self._images

    @property
    def frozen(self) -> FrozenFeatures:
        if self._frozen is None:
            e = self.cfg.ENGINE
            cache = e.CACHE == "on" or (e.CACHE == "auto" and self.backbone.pos_drop.p == 0)
            try:
                self._frozen = self._frozen_features(cache)
            except CacheDoesNotFit as err:
                if e.CACHE != "auto":
                    raise
                get_logger().warning(
                    f"the frozen-path cache ({err.nbytes / 2**30:.2f} GiB) fits neither in memory nor in {err.folder} "
                    f"({err.free / 2**30:.2f} GiB free): ENGINE.CACHE auto trains without it, the backbone running once "
                    "per batch for all runs of a phase (same numbers, slower); free space there or set "
                    "ENGINE.CACHE_DTYPE bfloat16 to cache")
                self._frozen = self._frozen_features(False)
        return self._frozen

    def _frozen_features(self, cache: bool) -> FrozenFeatures:
        e = self.cfg.ENGINE
        return FrozenFeatures(self.backbone, self.images, self.cfg.DATA.CROPSIZE, self.device, cache=cache,
                              dtype=e.CACHE_DTYPE, location=e.CACHE_LOCATION, batch_size=e.EVAL_BATCH_SIZE,
                              scratch_dir=self.layout.cache_dir(), pin_memory=self.cfg.DATA.PIN_MEMORY)

    def data(self, train: str, test: bool) -> TaskData:
        n, n_train = len(self.images), self.n_train
        rows = {"train800": torch.arange(n_train), "train800val200": torch.arange(n)}[train]
        return TaskData(self.images, rows, torch.arange(n_train, n), self.cfg.DATA.CROPSIZE, self.device,
                        self.test_set if test else None)

    def test_set(self) -> SplitStream:
        return SplitStream(*stream_split(self.cfg, "test", self.cfg.ENGINE.EVAL_BATCH_SIZE))

    @property
    def settings(self) -> dict[str, str]:
        """What every run's identity shares (after the backbone loaded, so a missing file is one clear line)."""
        if self._settings is None:
            _ = self.backbone
            self._settings = task_settings(self.cfg, weight_path(self.cfg), data_identity(self.cfg))
        return self._settings

    def train(self, phase: str, runs: list[Run], recipe: Recipe, *, train: str, test: bool, save_ckpt: bool) -> None:
        """Train the runs of a phase unless finished under the same identity. Interrupted runs are redone;
        a finished run with another identity stops the phase (or is redone with `overwrite`, or when it
        diverged)."""
        logger = get_logger()
        todo, stale, reused = [], [], 0
        for r in runs:
            r.identity = run_identity(self.settings, r.lr, r.wd, r.seed, r.parent)
            done = r.dir.finished
            if done is None:
                if r.dir.leftover:
                    logger.warning(f"interrupted or unreadable run, redoing it: {r.dir.path}")
                todo.append(r)
            elif done.get("identity") == r.identity["identity"]:
                reused += 1
            elif done["status"] == "diverged" or self.overwrite:
                logger.info(f"settings changed ({'; '.join(differences(done, r.identity))}), retraining {r.dir.path}")
                todo.append(r)
            else:
                stale.append((r, done))
        if stale:
            r, done = stale[0]
            raise VQTError(f"{len(stale)} finished {phase} runs (e.g. {r.dir.path}) were trained with other settings: "
                           f"{'; '.join(differences(done, r.identity))}. Use another OUTPUT_DIR, or --overwrite to "
                           "retrain them")
        engine = "stacked engine" if self.grid else "reference loop"
        logger.info(f"{phase}: {len(todo)} runs to train on the {engine}, {reused} finished with the same settings "
                    "(reused)")
        if not todo:
            return
        data = self.data(train, test)
        if self.grid:
            jobs = [(r, RunRecord(r, self.cfg, save_ckpt=save_ckpt)) for r in todo]
            ckpts = fit_grid(self.spec, self.frozen, jobs, recipe, data, self.cfg.ENGINE.FUSED_KV_GIB)
            for (_, record), ckpt in zip(jobs, ckpts):
                record.finish(ckpt)
            return
        for r in todo:
            model = VQT(self.backbone, self.spec, r.feat_ids, self.method)
            record = RunRecord(r, self.cfg, save_ckpt=save_ckpt)
            fit(model, r, recipe, data, record)
            record.finish(model.trained_state())

    def close(self) -> None:
        if self._frozen is not None:
            self._frozen.close()


@contextlib.contextmanager
def _phase(task: Task, phase: str, stage: str = "") -> Iterator[None]:
    """Hold the phase's lock and log to its task log (which starts with what produced it)."""
    layout = task.layout
    with layout.lock(phase, stage), task_log(layout.task_log(phase), environment() + [task.device_line]):
        yield


def _search(task: Task, cfg: CfgNode, arch_feats: str, grid: str) -> None:
    lrs, wds = lr_wd_grid(cfg.SOLVER.OPTIMIZER, arch_feats, grid or DEFAULT_GRID[cfg.MODEL.TRANSFER_TYPE])
    scale = cfg.DATA.BATCH_SIZE / 256
    runs = [Run(task.layout.run("search", lr * scale, wd, 1), lr * scale, wd, cfg.SEED) for lr in lrs for wd in wds]
    with _phase(task, "search"):
        task.train("search", runs, Recipe.from_cfg(cfg, lrp_coef=cfg.MODEL.H2T.LRP_COEF), train="train800", test=False,
                   save_ckpt=False)
        find_best_lrwd(task.layout)


def _lr_wd(cfg: CfgNode, layout: Layout, phase: str) -> tuple[float, float]:
    """SOLVER.BASE_LR / WEIGHT_DECAY when given, else the search's pick; recorded in the phase's pick.json."""
    lr, wd = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    if lr is not None:
        lr, wd, source = float(lr), float(wd), "given (SOLVER.BASE_LR / WEIGHT_DECAY)"
    else:
        (lr, wd), source = find_best_lrwd(layout), "search"
    layout.write_pick(phase, lr, wd, source)
    return lr, wd


def _finals(task: Task, cfg: CfgNode) -> None:
    lr, wd = _lr_wd(cfg, task.layout, "final")
    runs = [Run(task.layout.run("final", lr, wd, k + 1), lr, wd, seed) for k, seed in enumerate(FINAL_SEEDS)]
    with _phase(task, "final"):
        task.train("final", runs, Recipe.from_cfg(cfg, lrp_coef=cfg.MODEL.H2T.LRP_COEF), train="train800val200",
                   test=True, save_ckpt=cfg.MODEL.SAVE_CKPT)
        _report_test(runs, cfg.DATA.NAME, "final")


def _report_test(runs: list[Run], name: str, phase: str) -> None:
    """One console line: the phase's test top-1 over its finished runs."""
    top1 = [100 * (res := r.dir.load_results())[f"epoch_{last_epoch(res)}"]["classification"][f"test_{name}"]["top1"]
            for r in runs if (r.dir.finished or {}).get("status") == "ok"]
    if top1:
        get_logger().info(f"{phase}: test top-1 {np.mean(top1):.2f} ± {np.std(top1):.2f} over {len(top1)} runs")


def _finished_run(run: RunDir, what: str, fix: str, lock: TaskLock) -> dict:
    """The DONE record of a finished run this stage starts from, or one line saying what is missing."""
    done = run.finished
    if done is None or done["status"] != "ok":
        if done is None and os.path.isdir(run.path) and (holder := lock.holder()):
            raise VQTError(f"{what} run {run.path} is still running ({holder} holds {lock.path}): wait for it to finish")
        state = "missing" if not os.path.isdir(run.path) else ("incomplete" if done is None else done["status"])
        raise VQTError(f"{what} run {run.path} is {state}; {fix}")
    if not os.path.isfile(run.checkpoint_file):
        raise VQTError(f"{run.checkpoint_file} is missing (the {what} runs were trained with MODEL.SAVE_CKPT False): "
                       f"delete {os.path.dirname(run.path)} and train the {what} runs again with MODEL.SAVE_CKPT True")
    return done


def _sparse(task: Task, cfg: CfgNode, mode: str) -> None:
    h2t = cfg.MODEL.H2T
    if mode == "compress" and not (h2t.KEEP_FRAC == 1.0 and h2t.LRP_COEF > 0):
        raise VQTError("compress needs MODEL.H2T.KEEP_FRAC 1.0 and MODEL.H2T.LRP_COEF > 0")
    if mode == "featselect" and not (0 < h2t.KEEP_FRAC <= 1.0 and h2t.LRP_COEF == 0.0):
        raise VQTError("featselect needs 0 < MODEL.H2T.KEEP_FRAC <= 1.0 and MODEL.H2T.LRP_COEF 0.0")
    layout = task.layout
    lr, wd = _lr_wd(cfg, layout, "sparse")
    stage = stage_name(mode, h2t.KEEP_FRAC)
    keep = int(task.spec.feature_dim(task.backbone.embed_dim, task.backbone.depth) * h2t.KEEP_FRAC)
    runs = []
    for k, seed in enumerate(FINAL_SEEDS):
        final = layout.run("final", lr, wd, k + 1)
        done = _finished_run(final, "final", "run scripts/VQT/run_vqt_vtab.sh first", layout.lock("final"))
        run = Run(layout.run("sparse", lr, wd, k + 1, stage), 0.5 * lr, wd, seed, parent=done["identity"])
        run.start = {key: v for key, v in final.load_checkpoint()["model"].items() if key not in (HEAD_W, HEAD_B)}
        if mode == "featselect":
            compress = layout.run("sparse", lr, wd, k + 1, stage_name("compress", 1.0))
            done = _finished_run(compress, "compress", "run the compress stage first (--sparse-mode compress)",
                                 layout.lock("sparse", "compress"))
            run.parent += " " + done["identity"]
            run.feat_ids = torch.topk(compress.load_checkpoint()["model"][HEAD_W].norm(dim=0), k=keep).indices
        runs.append(run)
    recipe = Recipe.from_cfg(cfg, lrp_coef=h2t.LRP_COEF if mode == "compress" else 0.0, freeze_queries=True)
    with _phase(task, "sparse", stage):
        task.train("sparse", runs, recipe, train="train800val200", test=True, save_ckpt=cfg.MODEL.SAVE_CKPT)
        _report_test(runs, cfg.DATA.NAME, stage)


def check_names(cfg: CfgNode) -> None:
    """The VTAB task (and its class count) and the zoo backbone exist, where they are named."""
    if cfg.DATA.SOURCE != "folder":
        check_classes(cfg, get_task(cfg.DATA.NAME))
    if not cfg.MODEL.TIMM_NAME:
        zoo_entry(cfg.DATA.FEATURE)


def resolve_cfg(cfg: CfgNode) -> CfgNode:
    """A copy of `cfg` with what a run derives filled in (the runs' config.yaml record it): DATA.CROPSIZE 0
    -> the backbone's size; with MODEL.TIMM_NAME, a zoo key in DATA.FEATURE (the default) -> the timm name;
    SOURCE folder: an empty DATA.NAME -> the DATAPATH folder's name, DATA.NUMBER_CLASSES -1 -> the classes."""
    cfg = cfg.clone()
    cfg.defrost()
    if cfg.MODEL.TIMM_NAME and cfg.DATA.FEATURE in MODEL_ZOO:
        if cfg.DATA.FEATURE != get_cfg().DATA.FEATURE:
            raise VQTError(f"MODEL.TIMM_NAME {cfg.MODEL.TIMM_NAME} and the zoo backbone DATA.FEATURE {cfg.DATA.FEATURE} "
                           "are both given: drop one (with TIMM_NAME, DATA.FEATURE only labels the output folders)")
        cfg.DATA.FEATURE = cfg.MODEL.TIMM_NAME
    cfg.DATA.CROPSIZE = image_config(cfg).size
    if cfg.DATA.SOURCE == "folder":
        cfg.DATA.NAME = cfg.DATA.NAME or os.path.basename(os.path.normpath(cfg.DATA.DATAPATH))
        classes = scan(cfg.DATA.DATAPATH).classes
        check_folder_classes(cfg, classes)
        cfg.DATA.NUMBER_CLASSES = len(classes)
    cfg.freeze()
    return cfg


def run_protocol(cfg: CfgNode, *, dont_search: bool = False, sparse_mode: str | None = None,
                 arch_feats: str = "", overwrite: bool = False, grid: str = "") -> None:
    """Search (unless `dont_search` or an lr/wd is given) then the 5 final runs; or one compression
    stage (`sparse_mode`). `overwrite`: retrain finished runs whose settings changed."""
    check_supported(cfg)
    if sparse_mode is not None and sparse_mode not in SPARSE_MODES:
        raise VQTError(f"--sparse-mode {sparse_mode!r} is not one of {SPARSE_MODES}")
    if sparse_mode is not None and cfg.MODEL.TRANSFER_TYPE != "h2t-prompt":
        raise VQTError(f"--sparse-mode compresses VQT's head (MODEL.TRANSFER_TYPE h2t-prompt), not "
                       f"{cfg.MODEL.TRANSFER_TYPE}'s")
    setup_logging()
    counts = check_task_data(cfg)
    cfg = resolve_cfg(cfg)
    if cfg.DATA.SOURCE != "folder":  # a folder dataset's images per folder are logged as it is scanned
        get_logger().info(f"{cfg.DATA.NAME}: " + ", ".join(f"{split} {n}" for split, n in counts.items()) + " examples")
    task = Task(cfg, overwrite)
    if cfg.DATA.SOURCE == "folder":  # class names for predict.py / scripts/export.py
        write_classes(task.layout.task_dir("final" if sparse_mode is None else "sparse"), scan(cfg.DATA.DATAPATH).classes)
    with contextlib.closing(task):
        if sparse_mode is not None:
            _sparse(task, cfg, sparse_mode)
            return
        if cfg.MODEL.H2T.KEEP_FRAC != 1.0:
            raise VQTError("MODEL.H2T.KEEP_FRAC applies to --sparse-mode featselect only; leave it at 1.0")
        if not dont_search and cfg.SOLVER.BASE_LR is None:
            _search(task, cfg, arch_feats, grid)
        _finals(task, cfg)
