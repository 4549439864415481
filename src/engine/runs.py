"""What a training run is made of: its folder and hyper-parameters (`Run`), how it trains (`Recipe`)
and the task data it trains on (`TaskData`). Shared by the reference loop and the stacked engine."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from yacs.config import CfgNode

from src.data.loader import ImageSet
from src.data.preprocess import preprocess
from src.solver.schedule import lr_factor
from src.utils.layout import RunDir


@dataclass
class Run:
    """One run of the protocol: its folder, lr, weight decay and seed; for the sparsity stages the
    checkpoint it starts from (query tokens) and the selected head-input features."""

    dir: RunDir
    lr: float
    wd: float
    seed: int
    start: dict | None = None             # trained tensors to start from, by original name (query tokens)
    feat_ids: torch.Tensor | None = None  # (F',) kept features (featselect)
    parents: tuple[RunDir, ...] = ()      # the runs it starts from (its identity and DONE name their fingerprints)
    identity: dict | None = None          # set when the phase starts (src.engine.identity)


@dataclass(frozen=True)
class Recipe:
    """How every run of a phase trains (SOLVER.*, DATA.BATCH_SIZE, and the stage's loss and freezing)."""

    optimizer: str
    momentum: float
    epochs: int
    warmup: int
    scheduler: str
    batch_size: int
    eval_batch_size: int
    log_every: int
    max_steps: int | None = None  # DBG: at most this many steps per epoch
    lrp_coef: float = 0.0         # group lasso on the head's columns (compress)
    freeze_queries: bool = False  # sparsity stages train the head only
    tf32: bool = False            # ENGINE.TF32
    autocast: str = "off"         # ENGINE.AUTOCAST

    @classmethod
    def from_cfg(cls, cfg: CfgNode, *, lrp_coef: float = 0.0, freeze_queries: bool = False) -> Recipe:
        s = cfg.SOLVER
        return cls(s.OPTIMIZER, s.MOMENTUM, s.TOTAL_EPOCH, s.WARMUP_EPOCH, s.SCHEDULER, cfg.DATA.BATCH_SIZE,
                   cfg.ENGINE.EVAL_BATCH_SIZE, s.LOG_EVERY_N, 20 if cfg.DBG else None, lrp_coef, freeze_queries,
                   cfg.ENGINE.TF32, cfg.ENGINE.AUTOCAST)

    def steps(self, n_train: int) -> int:
        steps = math.ceil(n_train / self.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def lr_factor(self, epoch: int) -> float:
        return lr_factor(epoch, self.warmup, self.epochs, self.scheduler)

    @contextlib.contextmanager
    def numerics(self, device: torch.device) -> Iterator[None]:
        """TF32 (CUDA) and bf16 autocast as the recipe says; the global TF32 switches are restored after."""
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast == "bf16"):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class SplitStream:
    """A split streamed once at the end: (number of images, iterator of uint8 image batches + labels)."""

    size: int
    batches: Iterator[tuple[list[np.ndarray], np.ndarray]]


@dataclass
class TaskData:
    """The images a phase trains and validates on (rows of `images`), and its test split (if evaluated)."""

    images: ImageSet
    train_rows: torch.Tensor
    val_rows: torch.Tensor
    size: int                                   # DATA.CROPSIZE
    device: torch.device
    test: Callable[[], SplitStream] | None = None   # opens the test stream

    def tensors(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed images (B, 3, S, S) and labels (B,) of `rows`, on the device."""
        idx = rows.tolist()
        x = preprocess([self.images.images[i] for i in idx], self.size, self.device)
        return x, torch.as_tensor(self.images.labels[idx], dtype=torch.long, device=self.device)
