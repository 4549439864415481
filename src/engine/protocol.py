"""The VQT protocol for one task: lr x wd search on train800/val200, best pick, 5 seeds on
train800val200 with test at the last epoch, and the optional classifier compression stages.

Every phase trains its runs through `src.engine.train.train_phase`: on the stacked engine when it can
express them, else one by one on the reference loop; both write the same run folders (`src.utils.layout`).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch
from yacs.config import CfgNode

from src.configs.transfer import DEFAULT_GRID, lr_wd_grid
from src.configs.validate import validate
from src.configs.vit_configs import MODEL_ZOO
from src.data.folder import check_folder_classes, scan, write_classes
from src.data.loader import ImageSet, check_task_data, data_identity, load_split, stream_split
from src.engine.frozen import CacheDoesNotFit, FrozenFeatures
from src.engine.identity import differences, run_identity, task_settings
from src.engine.memory import check_training_memory
from src.engine.record import RunRecord
from src.engine.runs import Recipe, Run, SplitStream, TaskData
from src.engine.train import Engine, train_phase
from src.errors import VQTError
from src.models.checkpoints import backbone_image_config, build_backbone, weight_path
from src.models.petl import Method
from src.models.timm_backbone import check_timm_name
from src.models.vqt import HEAD_B, HEAD_W, QuerySpec
from src.utils.cli import check_can_create
from src.utils.device import describe_device, resolve_device
from src.utils.layout import PHASES, Layout, RunState, TaskLock, remove_dead_temps, scratch, stage_name
from src.utils.logging import environment, get_logger, setup_logging, task_log

FINAL_SEEDS = (42, 44, 82, 100, 800)
# Keys a sparsity stage sets for itself: the runs it starts from are checked on every other setting.
STAGE_KEYS = ("MODEL.H2T.LRP_COEF", "MODEL.H2T.KEEP_FRAC")


def find_best_lrwd(layout: Layout, grid: list[Run]) -> tuple[float, float]:
    """Best (lr, wd) by val top-1 at the last epoch over the runs of the current grid (`grid`, identities set)
    that finished ok under the current setting; ties go to the smaller lr, then to the larger wd. Other runs
    present in the search folder (another grid, an earlier setting) never compete: one log line names them."""
    logger = get_logger()
    found, skipped = [], []
    for r in grid:
        state = r.dir.status(r.identity["identity"])
        if state is RunState.DONE:
            found.append((r.lr, r.wd, r.dir.top1(f"val_{layout.data_name}")))
        elif state is not RunState.MISSING:
            skipped.append((r.dir.path, state, (r.dir.record or {}).get("message", "")))
    ours = {r.dir.path for r in grid}
    others = [run.path for _, _, run in layout.search_runs() if run.path not in ours]
    if others:
        logger.warning(f"{len(others)} search runs are not of the current grid and setting, not used for the pick: "
                       + ", ".join(others))
    if skipped:
        logger.warning("search runs not used for the pick: "
                       + "; ".join(f"{p} ({s.value})" for p, s, _ in sorted(skipped)))
    diverged = [(p, m) for p, s, m in sorted(skipped) if s is RunState.DIVERGED]
    if not found and diverged and len(diverged) == len(skipped):
        raise VQTError(f"all {len(diverged)} search runs diverged (first: {diverged[0][0]}: {diverged[0][1]}); fix the "
                       "cause (checkpoint, MODEL.H2T.DROPOUT, ...) and rerun: diverged runs retrain under new settings")
    if not found:
        raise VQTError(f"no search run under {layout.task_dir('search')} finished under the current settings: run the "
                       "search first (train.py without --dont_search), or give --lr and --wd")
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
                    f"({err.free / 2**30:.2f} GiB free): ENGINE.CACHE auto trains without it, the backbone running "
                    "once per batch for all runs of a phase (same numbers, slower); free space there or set "
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

    def identify(self, run: Run, as_parent: bool = False) -> dict:
        """Set and return the run's identity under the current settings. `as_parent`: for a run a sparsity stage
        starts from, whose stage keys (STAGE_KEYS) are its own, as DONE recorded them."""
        settings = self.settings
        if as_parent:
            recorded = (run.dir.record or {}).get("settings") or {}
            settings = settings | {k: recorded[k] for k in STAGE_KEYS if k in recorded}
        parent = " ".join(p.fingerprint() for p in run.parents)
        run.identity = run_identity(settings, run.lr, run.wd, run.seed, parent)
        return run.identity

    def plan(self, phase: str, runs: list[Run]) -> list[Run]:
        """The runs of a phase to (re)train, their folders cleared (crash-safe); stops, before anything is
        cleared, on a folder we did not write, a file we did not write, or a run finished under other settings
        (unless `overwrite`, it diverged, or only the runs it started from changed)."""
        logger = get_logger()
        todo, stale = [], []
        for r in runs:
            self.identify(r)
            r.dir.tidy()
            state = r.dir.status(r.identity["identity"])
            if state in (RunState.FOREIGN, RunState.EXTERNAL):
                r.dir.check_clearable(state)
            if state is RunState.BROKEN:
                logger.warning(f"{r.dir.damage()}, redoing the run: {r.dir.path}")
            elif state is RunState.PARTIAL:
                logger.warning(f"interrupted run, redoing it: {r.dir.path}")
            elif state is RunState.STALE:
                diffs = differences(rec := r.dir.record, r.identity)
                only_parents = all(d.startswith("parent ") for d in diffs)
                if not (rec["status"] == "diverged" or self.overwrite or only_parents):
                    stale.append((r, diffs))
                    continue
                logger.info(f"settings changed ({'; '.join(diffs)}), retraining {r.dir.path}")
            if state not in (RunState.DONE, RunState.DIVERGED):
                todo.append(r)
        if stale:
            r, diffs = stale[0]
            raise VQTError(f"{len(stale)} finished {phase} runs (e.g. {r.dir.path}) were trained with other settings: "
                           f"{'; '.join(diffs)}. Use another OUTPUT_DIR, or --overwrite to retrain them")
        for r in todo:
            r.dir.check_clearable()
        for r in todo:
            r.dir.clear()
        return todo

    def train(self, phase: str, runs: list[Run], recipe: Recipe, *, train: str, test: bool, save_ckpt: bool) -> None:
        """Train the runs of a phase unless finished under the same identity (`plan`). On the stacked engine the
        reused runs train beside the redone ones, unwritten, so that these equal an uninterrupted phase's bit
        for bit (same runs stacked, same reduction order)."""
        todo = self.plan(phase, runs)
        engine = "stacked engine" if self.grid else "reference loop"
        beside = " (trained beside them, unwritten, as in an uninterrupted phase)" if self.grid and todo and \
            len(todo) < len(runs) else ""
        get_logger().info(f"{phase}: {len(todo)} runs to train on the {engine}, {len(runs) - len(todo)} finished with "
                          f"the same settings (reused){beside}")
        if not todo:
            return
        check_training_memory(self.spec, self.backbone, [r.seed for r in runs] if self.grid else [0], recipe,
                              self.device, self.frozen if self.grid else None)
        data, engine = self.data(train, test), self.engine()
        jobs = [(r, RunRecord(r, self.cfg, save_ckpt=save_ckpt, write=any(r is t for t in todo)))
                for r in (runs if engine.grid else todo)]
        train_phase(jobs, recipe, data, engine)

    def engine(self) -> Engine:
        """The stacked engine on the task's frozen path, or the reference loop (ENGINE.GRID False, or a
        spec the stack cannot express)."""
        if self.grid:
            return Engine.stacked(self.spec, self.frozen, self.cfg.ENGINE.FUSED_KV_GIB)
        return Engine.reference(self.spec, self.backbone, self.method)

    def close(self) -> None:
        if self._frozen is not None:
            self._frozen.close()


@contextlib.contextmanager
def _phase(task: Task, phase: str, stage: str = "") -> Iterator[None]:
    """Hold the phase's lock and log to its task log (which starts with what produced it); temporary files that
    killed processes of ours left in its bookkeeping folder are removed."""
    layout = task.layout
    with layout.lock(phase, stage), task_log(layout.task_log(phase), environment() + [task.device_line]):
        remove_dead_temps(layout.meta_dir(phase))
        yield


def search_grid(task: Task, cfg: CfgNode, arch_feats: str = "", as_parent: bool = False) -> list[Run]:
    """The search runs of the current setting: SOLVER.SEARCH_GRID's grid (default: MODEL.TRANSFER_TYPE's), lr
    scaled by DATA.BATCH_SIZE / 256, identities set (`as_parent`: as a sparsity stage sees them, see
    `Task.identify`)."""
    grid = cfg.SOLVER.SEARCH_GRID or DEFAULT_GRID[cfg.MODEL.TRANSFER_TYPE]
    lrs, wds = lr_wd_grid(cfg.SOLVER.OPTIMIZER, arch_feats, grid)
    scale = cfg.DATA.BATCH_SIZE / 256
    runs = [Run(task.layout.run("search", lr * scale, wd, 1), lr * scale, wd, cfg.SEED) for lr in lrs for wd in wds]
    for r in runs:
        task.identify(r, as_parent)
    return runs


def search(task: Task, cfg: CfgNode, arch_feats: str = "") -> None:
    """The lr x wd search on train800 / val200 (one run per grid point); `pick_lr_wd` picks among its runs."""
    runs = search_grid(task, cfg, arch_feats)
    with _phase(task, "search"):
        task.train("search", runs, Recipe.from_cfg(cfg, lrp_coef=cfg.MODEL.H2T.LRP_COEF), train="train800", test=False,
                   save_ckpt=False)


def pick_lr_wd(task: Task, cfg: CfgNode, phase: str, arch_feats: str = "") -> tuple[float, float]:
    """SOLVER.BASE_LR / WEIGHT_DECAY when given, else the search's pick among the current grid's runs (refused
    while a search of this task holds its lock); recorded in the phase's pick.json."""
    lr, wd, layout = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, task.layout
    if lr is not None:
        lr, wd, source = float(lr), float(wd), "given (SOLVER.BASE_LR / WEIGHT_DECAY)"
    else:
        lock = layout.lock("search")
        if holder := lock.holder():
            raise VQTError(f"the search of this task is still running ({holder} holds {lock.path}): wait for it to "
                           "finish, then rerun")
        grid = search_grid(task, cfg, arch_feats, as_parent=phase == "sparse")
        (lr, wd), source = find_best_lrwd(layout, grid), "search"
    layout.write_pick(phase, lr, wd, source)
    return lr, wd


def finals(task: Task, cfg: CfgNode, arch_feats: str = "") -> list[Run]:
    """The 5 final runs (FINAL_SEEDS) on train800val200 at the picked lr/wd, tested at the last epoch."""
    lr, wd = pick_lr_wd(task, cfg, "final", arch_feats)
    runs = [Run(task.layout.run("final", lr, wd, k + 1), lr, wd, seed) for k, seed in enumerate(FINAL_SEEDS)]
    with _phase(task, "final"):
        task.train("final", runs, Recipe.from_cfg(cfg, lrp_coef=cfg.MODEL.H2T.LRP_COEF), train="train800val200",
                   test=True, save_ckpt=cfg.MODEL.SAVE_CKPT)
        _report_test(runs, cfg.DATA.NAME, "final")
    return runs


def _report_test(runs: list[Run], name: str, phase: str) -> None:
    """One console line: the phase's test top-1 over its finished runs; a VQTError when every run diverged."""
    states = [r.dir.status(r.identity["identity"]) for r in runs]
    top1 = [100 * r.dir.top1(f"test_{name}") for r, s in zip(runs, states) if s is RunState.DONE]
    if top1:
        get_logger().info(f"{phase}: test top-1 {np.mean(top1):.2f} ± {np.std(top1):.2f} over {len(top1)} runs")
    if all(s is RunState.DIVERGED for s in states):
        first = runs[0].dir
        raise VQTError(f"all {len(runs)} {phase} runs diverged (first: {first.path}: {first.record['message']}); fix "
                       "the cause (lr, checkpoint, MODEL.H2T.DROPOUT, ...) and rerun: diverged runs retrain under new "
                       "settings")


def _check_start_run(task: Task, run: Run, what: str, fix: str, lock: TaskLock) -> None:
    """That a sparsity stage can start from `run`, a finished run of the current setting; else one line saying why
    it cannot (missing, running, interrupted, damaged, diverged, other settings, no checkpoint)."""
    d = run.dir
    state = d.status(task.identify(run, as_parent=True)["identity"], lock)
    if state is RunState.RUNNING:
        raise VQTError(f"{what} run {d.path} is still running ({lock.holder()} holds {lock.path}): wait for it to "
                       "finish")
    if state is RunState.STALE:
        raise VQTError(f"{what} run {d.path} was trained with other settings: "
                       f"{'; '.join(differences(d.record, run.identity))}; {fix} with the current settings")
    if state is RunState.BROKEN:
        raise VQTError(f"{what} run {d.path} is damaged: {d.damage()}; {fix} (it is redone)")
    if state is not RunState.DONE:
        raise VQTError(f"{what} run {d.path} is {'incomplete' if state is RunState.PARTIAL else state.value}; {fix}")
    if not os.path.isfile(d.checkpoint_file):
        raise VQTError(f"{d.checkpoint_file} is missing (the {what} runs were trained with MODEL.SAVE_CKPT False): "
                       f"delete {os.path.dirname(d.path)} and train the {what} runs again with MODEL.SAVE_CKPT True")


def sparse_stage(task: Task, cfg: CfgNode, mode: str, arch_feats: str = "") -> list[Run]:
    """A classifier compression stage on the final runs of the current setting: `compress` (group lasso on the
    head, from each final's query tokens) or `featselect` (the head retrained on the MODEL.H2T.KEEP_FRAC
    features with the largest compressed-head column norms)."""
    h2t = cfg.MODEL.H2T
    layout = task.layout
    lr, wd = pick_lr_wd(task, cfg, "sparse", arch_feats)
    stage = stage_name(mode, h2t.KEEP_FRAC)
    keep = int(task.spec.feature_dim(task.backbone.embed_dim, task.backbone.depth) * h2t.KEEP_FRAC)
    runs = []
    for k, seed in enumerate(FINAL_SEEDS):
        final = Run(layout.run("final", lr, wd, k + 1), lr, wd, seed)
        _check_start_run(task, final, "final", "run scripts/VQT/run_vqt_vtab.sh first", layout.lock("final"))
        run = Run(layout.run("sparse", lr, wd, k + 1, stage), 0.5 * lr, wd, seed, parents=(final.dir,))
        trained = final.dir.load_checkpoint()["model"]
        run.start = {key: v for key, v in trained.items() if key not in (HEAD_W, HEAD_B)}
        if mode == "featselect":
            compress = Run(layout.run("sparse", lr, wd, k + 1, stage_name("compress", 1.0)), 0.5 * lr, wd, seed,
                           parents=(final.dir,))
            _check_start_run(task, compress, "compress", "run the compress stage first (--sparse-mode compress)",
                             layout.lock("sparse", "compress"))
            run.parents += (compress.dir,)
            run.feat_ids = torch.topk(compress.dir.load_checkpoint()["model"][HEAD_W].norm(dim=0), k=keep).indices
        runs.append(run)
    recipe = Recipe.from_cfg(cfg, lrp_coef=h2t.LRP_COEF if mode == "compress" else 0.0, freeze_queries=True)
    with _phase(task, "sparse", stage):
        task.train("sparse", runs, recipe, train="train800val200", test=True, save_ckpt=cfg.MODEL.SAVE_CKPT)
        _report_test(runs, cfg.DATA.NAME, stage)
    return runs


def resolve_cfg(cfg: CfgNode) -> CfgNode:
    """A copy of `cfg` with what a run derives filled in (the runs' config.yaml record it): DATA.CROPSIZE 0
    -> the backbone's size, DATA.INTERPOLATION "" -> its resampling filter; with MODEL.TIMM_NAME, a zoo key
    in DATA.FEATURE (the default) -> the timm name;
    SOURCE folder: an empty DATA.NAME -> the DATAPATH folder's name, DATA.NUMBER_CLASSES -1 -> the classes."""
    cfg = cfg.clone()
    cfg.defrost()
    if cfg.MODEL.TIMM_NAME and cfg.DATA.FEATURE in MODEL_ZOO:
        cfg.DATA.FEATURE = cfg.MODEL.TIMM_NAME
    image = backbone_image_config(cfg)
    cfg.DATA.CROPSIZE, cfg.DATA.INTERPOLATION = image.size, image.interpolation
    if cfg.DATA.SOURCE == "folder":
        cfg.DATA.NAME = cfg.DATA.NAME or os.path.basename(os.path.abspath(cfg.DATA.DATAPATH))
        classes = scan(cfg.DATA.DATAPATH).classes
        check_folder_classes(cfg, classes)
        cfg.DATA.NUMBER_CLASSES = len(classes)
    cfg.freeze()
    return cfg


def run_protocol(cfg: CfgNode, *, dont_search: bool = False, sparse_mode: str | None = None,
                 arch_feats: str = "", overwrite: bool = False) -> None:
    """Search (unless `dont_search` or an lr/wd is given) then the 5 final runs; or one compression
    stage (`sparse_mode`). `overwrite`: retrain finished runs whose settings changed."""
    validate(cfg, sparse_mode)
    if cfg.MODEL.TIMM_NAME:
        check_timm_name(cfg.MODEL.TIMM_NAME)  # a family VQT runs, before anything is written
    check_can_create(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    setup_logging()
    phases = ("sparse",) if sparse_mode else ("final",) if dont_search or cfg.SOLVER.BASE_LR is not None else \
        ("search", "final")
    get_logger().info(f"results go to {', '.join(os.path.abspath(cfg.OUTPUT_DIR) + PHASES[p] for p in phases)} "
                      f"(OUTPUT_DIR {cfg.OUTPUT_DIR})")
    cfg = resolve_cfg(cfg)
    task = Task(cfg, overwrite)
    _ = task.backbone  # a missing or wrong weight file stops here, before anything is written
    with scratch(task.layout.cache_dir()), contextlib.closing(task):
        counts = check_task_data(cfg)
        if cfg.DATA.SOURCE != "folder":  # a folder dataset's images per folder are logged as it is scanned
            get_logger().info(f"{cfg.DATA.NAME}: " + ", ".join(f"{split} {n}" for split, n in counts.items())
                              + " examples")
        if cfg.DATA.SOURCE == "folder":  # class names for predict.py / scripts/export.py
            write_classes(task.layout.task_dir("final" if sparse_mode is None else "sparse"),
                          scan(cfg.DATA.DATAPATH).classes)
        if sparse_mode is not None:
            sparse_stage(task, cfg, sparse_mode, arch_feats)
            return
        if not dont_search and cfg.SOLVER.BASE_LR is None:
            search(task, cfg, arch_feats)
        finals(task, cfg, arch_feats)
