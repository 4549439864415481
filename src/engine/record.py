"""What a run writes to its folder as it trains: config.yaml, logs.txt, TensorBoard scalars, per-epoch
metrics (eval_results.pth), logits and checkpoint, and DONE last (through the layout's RunDir)."""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from yacs.config import CfgNode

from src.engine.memory import peak, reset_peak
from src.engine.metrics import classification_metrics
from src.engine.runs import Run
from src.models.vqt import HEAD_B, HEAD_W
from src.utils.layout import atomic_save
from src.utils.logging import DATEFMT, get_logger


def divergence(loss: float, epoch: int, step: int) -> str:
    """Why a run must stop ("" while its loss is finite)."""
    return "" if math.isfinite(loss) else f"loss is {loss} at epoch {epoch + 1}, step {step + 1}"


class RunRecord:
    """One run's folder, written as it trains. Create it when the run starts (its folder must be missing or
    empty: clearing is the caller's explicit step); call `finish` last. With `write` False nothing is
    written (a run trained beside the redone ones of its phase only so that they train as they would have)."""

    def __init__(self, run: Run, cfg: CfgNode, *, save_ckpt: bool, write: bool = True):
        self.run, self.save_ckpt, self.log_trainable = run, save_ckpt and write, cfg.SOLVER.DBG_TRAINABLE
        self.label = f"run lr {run.lr:g} wd {run.wd:g} seed {run.seed}"
        self.val_name, self.test_name = f"val_{cfg.DATA.NAME}", f"test_{cfg.DATA.NAME}"
        self.results: dict = {}
        self.diverged = ""
        self.val: tuple[np.ndarray, np.ndarray] | None = None
        self.write = write
        self.usage: dict = {}  # trainable parameters, seconds per epoch, peak memory: logged and kept in DONE
        self._epoch_times: list[float] = []
        self._log = self._tb = None
        if not write:
            return
        run.dir.start()
        c = cfg.clone()
        c.defrost()
        c.SOLVER.BASE_LR, c.SOLVER.WEIGHT_DECAY, c.SEED, c.OUTPUT_DIR = run.lr, run.wd, run.seed, run.dir.path
        c.MODEL.SAVE_CKPT = save_ckpt
        with open(run.dir.file("config.yaml"), "w") as f:
            f.write(c.dump())
        self._log = open(run.dir.file("logs.txt"), "a")  # noqa: SIM115 (closed by finish)
        if cfg.ENGINE.TENSORBOARD:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(run.dir.file("tb"))

    def log(self, msg: str) -> None:
        if self._log is None:
            return
        self._log.write(f"[{time.strftime(DATEFMT)}] {msg}\n")
        self._log.flush()

    def trainable(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Count the trained tensors (with and without the head); log each with SOLVER.DBG_TRAINABLE."""
        sizes = {name: int(np.prod(shape)) for name, shape in shapes.items()}
        total, head = sum(sizes.values()), sum(v for k, v in sizes.items() if k in (HEAD_W, HEAD_B))
        self.usage |= {"trainable_params": total, "trainable_params_without_head": total - head}
        self.log(f"trainable parameters: {total} ({total - head} without the head)")
        if self.log_trainable:
            for name, shape in shapes.items():
                self.log(f"Trainable: {name} {shape}, {sizes[name]}")

    def epoch_start(self, epoch: int, epochs: int, lr: float) -> None:
        if epoch == 0:
            reset_peak()
        self._epoch_start = time.perf_counter()
        self.log(f"Training {epoch + 1} / {epochs} epoch, with learning rate {lr}")

    def step(self, step: int, steps: int, loss: float) -> None:
        self.log(f"\tTraining {step + 1}/{steps}. train loss: {loss:.4f}")

    def epoch_end(self, epoch: int, epochs: int, train_loss: float, lr: float, logits: np.ndarray,
                  targets: np.ndarray) -> None:
        """Record the epoch's val metrics (and keep the logits: the last epoch's are saved)."""
        self._epoch_times.append(time.perf_counter() - self._epoch_start)
        metrics = classification_metrics(logits, targets)
        self.results[f"epoch_{epoch}"] = {"classification": {self.val_name: metrics}}
        self.val = (logits, targets)
        self.log(f"Epoch {epoch + 1} / {epochs}: avg train loss: {train_loss:.4f}")
        self.log(f"Classification results with {self.val_name}: " + _fmt(metrics))
        if self._tb is not None:
            self._tb.add_scalar("train/loss", train_loss, epoch)
            self._tb.add_scalar("train/lr", lr, epoch)
            self._tb.add_scalar("val/top1", metrics["top1"], epoch)

    def diverge(self, message: str) -> None:
        self.diverged = message
        self.log(f"Encountered infinite or NaN loss, stopping this run: {message}")
        if self.write:
            get_logger().warning(f"run {self.run.dir.path} diverged: {message}")

    def test(self, logits: np.ndarray, targets: np.ndarray) -> None:
        metrics = classification_metrics(logits, targets)
        self.results[f"epoch_{len(self.results) - 1}"]["classification"][self.test_name] = metrics
        self.log(f"Classification results with {self.test_name}: " + _fmt(metrics))
        if self._tb is not None:
            self._tb.add_scalar("test/top1", metrics["top1"], len(self.results) - 1)
        if self.save_ckpt:
            _save_logits(logits, targets, self.run.dir.logits_file(self.test_name))

    def finish(self, checkpoint: dict | None) -> None:
        """Write eval_results.pth, the last val logits and `checkpoint` (with MODEL.SAVE_CKPT, unless the
        run diverged), then DONE (which vouches for them and names the runs it started from)."""
        if not self.write:
            return
        self._measure()
        d = self.run.dir
        atomic_save(self.results, d.results_file)
        if self.save_ckpt and not self.diverged and checkpoint is not None:
            logits, targets = self.val
            _save_logits(logits, targets, d.logits_file(self.val_name))
            atomic_save(checkpoint, d.checkpoint_file)
        if self._tb is not None:
            self._tb.close()
        self._log.close()
        d.finish("diverged" if self.diverged else "ok", self.diverged, len(self.results), self.run.identity or {},
                 self.run.parents, self.usage)

    def _measure(self) -> None:
        """Time per epoch (training and validation) and the peak memory since the first epoch, logged once and
        kept in `usage` (runs a stacked phase trains together share both figures)."""
        nbytes, what = peak()
        per_epoch = sum(self._epoch_times) / max(len(self._epoch_times), 1)
        self.usage |= {"seconds_per_epoch": per_epoch, "peak_memory_bytes": nbytes, "peak_memory": what}
        self.log(f"{per_epoch:.2f} s per epoch; peak memory {nbytes / 2 ** 30:.3f} GiB ({what})")


def _save_logits(logits: np.ndarray, targets: np.ndarray, path: str) -> None:
    """A logits file as the original writes it: {"targets", "joint_logits"} (torch tensors here)."""
    atomic_save({"targets": torch.from_numpy(targets), "joint_logits": torch.from_numpy(logits.copy())}, path)


def _fmt(metrics: dict[str, float]) -> str:
    return "\t".join(f"{k}: {v * 100:.2f}" for k, v in metrics.items())
