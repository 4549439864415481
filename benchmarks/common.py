"""What the benchmarks share: the one timer (`now`), epoch accounting (`Epochs`), the synthetic task
(backbone from a random .npz, train800 + val200 + test images, the protocol's config and runs) and
`train`, which trains a phase through `src.engine.train.train_phase` as the protocol does."""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Self

import numpy as np
import torch
import torch.nn.functional as F
from yacs.config import CfgNode

from src.configs.defaults import load_cfg
from src.configs.transfer import lr_wd_grid
from src.configs.vit_configs import VIT_B16, ViTArch
from src.data.loader import ImageSet
from src.data.preprocess import preprocess
from src.engine.frozen import FrozenFeatures
from src.engine.members import Members
from src.engine.memory import peak, proc_status, reset_peak
from src.engine.protocol import FINAL_SEEDS
from src.engine.record import RunRecord
from src.engine.runs import Recipe, Run, SplitStream, TaskData
from src.engine.train import Engine, train_phase
from src.models.checkpoints import load_backbone, write_random_npz
from src.models.petl import Method
from src.models.vit import VisionTransformer
from src.models.vqt import HEAD_B, HEAD_W, VQT, QuerySpec
from src.utils.cli import HelpFormatter
from src.utils.device import resolve_device
from src.utils.heap import follow_live_memory
from src.utils.layout import Layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = {"tiny": ViTArch(16, 192, 12, 3, 768), "b16": VIT_B16}  # tiny: ViT-Ti/16 shapes
N_TRAIN, N_VAL, RAW_SIZE = 800, 200, 64  # VTAB-1k train800 / val200; synthetic images are 64x64
GiB = 2 ** 30
Mark = tuple[float, float]  # (wall clock, CPU time of this process) in seconds


def now() -> Mark:
    """The time, once the GPU's queued work (if any) is done."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def since(start: Mark) -> float:
    """Wall-clock seconds from `start` to `now()`."""
    return now()[0] - start[0]


def measured_epochs(text: str) -> int:
    """The `--epochs` argument: at least 2, since a run's first epoch is timed apart from the later ones."""
    epochs = int(text)
    if epochs < 2:
        raise argparse.ArgumentTypeError(
            f"{epochs}: at least 2 (a run's first epoch is timed apart from the later ones)")
    return epochs


@dataclass
class Epochs:
    """A phase's measured training time: its runs' first epochs (mean), which carry their one-off costs
    (allocating and faulting in buffers, optimizer state), their later epochs (mean), and the total."""

    first: float
    later: float
    total: float

    @classmethod
    def from_marks(cls, starts: list[Mark], end: Mark, epochs: int, clock: int = 0) -> Epochs:
        """Consecutive runs of `epochs` epochs each that started their epochs at `starts`, the last ending
        at `end`; `clock` 0: wall-clock seconds, 1: CPU seconds."""
        bounds = [m[clock] for m in (*starts, end)]
        laps = [b - a for a, b in itertools.pairwise(bounds)]
        first, later = laps[::epochs], [lap for i, lap in enumerate(laps) if i % epochs]
        return cls(sum(first) / len(first), sum(later) / len(later), bounds[-1] - bounds[0])

    def run_seconds(self, epochs: int) -> float:
        """One run (or one stacked phase) of `epochs` epochs: its first epoch once, then the later ones."""
        return self.first + (epochs - 1) * self.later


def synthetic(n: int, classes: int, seed: int) -> ImageSet:
    """`n` noisy 64x64 uint8 images whose class sets their colour."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(0).integers(0, 256, (classes, 3)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    noise = rng.standard_normal((n, RAW_SIZE, RAW_SIZE, 3), dtype=np.float32) * 40
    images = np.clip(colours[labels, None, None] + noise, 0, 255).astype(np.uint8)
    return ImageSet(list(images), labels.astype(np.int64))


def setup(a: argparse.Namespace) -> tuple[torch.device, VisionTransformer, ImageSet]:
    """Device, the backbone loaded from the random .npz `a.ckpt`, and train800 + val200 images."""
    device = resolve_device(a.device)
    backbone = VisionTransformer(ARCHS[a.arch], a.img_size)
    load_backbone(backbone, a.ckpt, "npz")
    return device, backbone.requires_grad_(False).eval().to(device), synthetic(N_TRAIN + N_VAL, a.classes, 1)


def make_cfg(a: argparse.Namespace, out: str) -> CfgNode:
    """The protocol's config for `a.epochs` epochs (no warm-up: it would not fit in a few epochs, and costs the
    same)."""
    opts = {"DATA.NAME": "vtab-synthetic", "DATA.NUMBER_CLASSES": a.classes, "DATA.CROPSIZE": a.img_size,
            "DATA.BATCH_SIZE": a.batch_size, "ENGINE.EVAL_BATCH_SIZE": a.batch_size, "SOLVER.OPTIMIZER": "adam",
            "SOLVER.TOTAL_EPOCH": a.epochs, "SOLVER.WARMUP_EPOCH": 0, "MODEL.H2T.NUM_QUERY_TOKENS": a.q,
            "MODEL.H2T.DROPOUT": 0.1, "OUTPUT_DIR": out}
    return load_cfg(os.path.join(REPO, "configs/h2t-prompt/vtab.yaml"), [str(x) for kv in opts.items() for x in kv])


def search_runs(cfg: CfgNode, n: int) -> list[Run]:
    """The first `n` configs of the paper's Adam grid (cycled), lr scaled to the batch size as the protocol does."""
    grid = itertools.islice(itertools.cycle(itertools.product(*lr_wd_grid("adam"))), n)
    scale, layout = cfg.DATA.BATCH_SIZE / 256, Layout.from_cfg(cfg)
    return [Run(layout.run("search", lr * scale, wd, i // 20 + 1), lr * scale, wd, cfg.SEED)
            for i, (lr, wd) in enumerate(grid)]


def final_runs(cfg: CfgNode, n: int) -> list[Run]:
    """The first `n` final seeds, all with the first search config (the pick does not change the cost)."""
    best = search_runs(cfg, 1)[0]
    return [Run(Layout.from_cfg(cfg).run("final", best.lr, best.wd, k + 1), best.lr, best.wd, seed)
            for k, seed in enumerate(FINAL_SEEDS[:n])]


def task_data(a: argparse.Namespace, images: ImageSet, device: torch.device, train: int,
              test: SplitStream | None = None) -> TaskData:
    """train800 (or train800val200: `train` rows) and val200 of `images`, and the test stream if any."""
    return TaskData(images, torch.arange(train), torch.arange(N_TRAIN, len(images)), a.img_size, device,
                    None if test is None else lambda: test)


def timed_test(a: argparse.Namespace, laps: list[tuple[Mark, float]]) -> SplitStream:
    """The synthetic test set as a stream; appends (its first batch request, wall seconds to its end) to `laps`."""
    test = synthetic(a.test_size, a.classes, 2)

    def batches() -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        start = now()
        for i in range(0, len(test), a.batch_size):
            yield test.images[i:i + a.batch_size], test.labels[i:i + a.batch_size]
        laps.append((start, since(start)))
    return SplitStream(len(test), batches())


def train(cfg: CfgNode, engine: Engine, runs: list[Run], data: TaskData, save_ckpt: bool,
          recipe: Recipe | None = None) -> list[Mark]:
    """Train `runs` as the protocol trains a phase (`recipe`: the config's); returns when each epoch
    started (of the stacked phase, or of each run in turn on the reference loop)."""
    starts: list[Mark] = []
    jobs = [(r, RunRecord(r, cfg, save_ckpt=save_ckpt)) for r in runs]
    train_phase(jobs, recipe or Recipe.from_cfg(cfg), data, engine, on_epoch=lambda _: starts.append(now()))
    return starts


class PeakMemory:
    """Peak memory above the level at entry: CUDA `max_memory_allocated`; on CPU (Linux, glibc) the
    resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs), after freed heap memory
    is handed back to the OS so that what an earlier measurement left neither counts nor serves."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Self:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL(None).malloc_trim(0)
            self.base = proc_status("VmRSS")
        reset_peak()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.growth = peak()[0] - self.base


def step_method(name: str, a: argparse.Namespace) -> Method:
    """The transfer type a benchmark names: a MODEL.TRANSFER_TYPE, or prompt-shallow / prompt-deep (`a.prompts`
    prompt tokens; deep with dropout 0.1, as run_vpt_vtab.sh); vqt+prompt has deep prompts."""
    if name.startswith("prompt-") or name == "vqt+prompt":
        deep = name != "prompt-shallow"
        return Method(name.split("-")[0], prompt_tokens=a.prompts, prompt_deep=deep, prompt_dropout=0.1 * deep)
    return Method(name)


def train_step(a: argparse.Namespace, method: str) -> dict:
    """Peak memory and time of one training step (forward + backward) on `a.mem_batch` images: "vqt" as the
    stacked engine trains it (frozen pass under no_grad, then the query path), any other method (`step_method`)
    through its `VQT` module as the reference loop trains it. Also its trainable parameters without the head."""
    device, backbone, images = setup(a)
    idx = torch.arange(a.mem_batch) % len(images)
    if method == "vqt":
        frozen = FrozenFeatures(backbone, images, a.img_size, device, cache=False)
        model = Members(backbone, QuerySpec(a.q, a.classes, dropout=0.1), [0]).to(device)
        model.reset(device)
        named = model.named_trained(0)
    else:
        m = step_method(method, a)
        spec = QuerySpec(a.q, a.classes, dropout=0.1) if m.queries else QuerySpec(0, a.classes, normalize=False)
        model = VQT(backbone, spec, method=m).to(device)
        model.reset_parameters(torch.Generator().manual_seed(0))
        named = model.named_trained()
        x = preprocess([images.images[i] for i in idx.tolist()], a.img_size, device)
        y = torch.as_tensor(images.labels[idx.numpy()], device=device)
    if device.type == "cpu":
        follow_live_memory()
    with PeakMemory(device) as mem:
        start = now()
        if method == "vqt":
            feat, kvs, y = frozen.batch(idx)
            logits = model(feat, kvs, train=True)[:, 0]
        else:
            logits = model.train()(x)
        F.cross_entropy(logits, y).backward()
        seconds = since(start)
    params = sum(t.numel() for n, t in named.items() if n not in (HEAD_W, HEAD_B))
    return {"peak_bytes": mem.growth, "step_s": seconds, "params": params}


def isolated_step(a: argparse.Namespace, method: str) -> dict:
    """`train_step` here on CUDA; on CPU in a fresh process, so that its resident-set peak is the step's
    own (what earlier work left in this process's allocator blurs a figure of about 1 GiB)."""
    if resolve_device(a.device).type == "cuda":
        return train_step(a, method)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(train_step, a, method).result()


def write_json(path: str | None, figures: dict) -> None:
    """Write a benchmark's figures to `path` (its --json), if given."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)


def parser(doc: str, arch: str) -> argparse.ArgumentParser:
    """A benchmark's command line with the options they share: the backbone's shapes (`arch` by default),
    the image size, the class count, the device and --json."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    p.add_argument("--arch", choices=list(ARCHS), default=arch, help="tiny: ViT-Ti/16 shapes (dim 192, depth 12); "
                   "b16: ViT-B/16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=10, help="class count of the measured runs")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write every figure to this file")
    return p


@contextlib.contextmanager
def random_checkpoint(a: argparse.Namespace) -> Iterator[None]:
    """`a.ckpt`: a random .npz of `a.arch` at `a.img_size` in a temporary folder, while the block runs."""
    with tempfile.TemporaryDirectory() as tmp:
        a.ckpt = os.path.join(tmp, "vit.npz")
        write_random_npz(a.ckpt, ARCHS[a.arch], img_size=a.img_size, seed=0)
        yield
