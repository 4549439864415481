"""Speed and memory of one VTAB-1k task's VQT protocol (lr x wd search + 5 final seeds) on synthetic images.

Reference path: the frozen backbone runs at every step, each config trains alone, the test set is
streamed once per final run (as the original). Fast path: one cached frozen pass, all configs of a
phase trained together, the test set streamed once for all finals. Both run in this process, one
after the other, over a few epochs, extrapolated to the full protocol (100 epochs); the printout
says which figures are measured and which are extrapolated. Also: training-step memory of VQT vs
VPT-deep (prompts inside the backbone, backprop through every layer) on the same batch.

    python benchmarks/bench_protocol.py                   # ViT-Ti/16 shapes at 224 px (2 CPU cores: ~4 min)
    python benchmarks/bench_protocol.py --arch b16 --device cuda --epochs 2
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Self

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode

from src.configs.defaults import load_cfg
from src.configs.vit_configs import VIT_B16, ViTArch
from src.data.loader import ImageSet
from src.data.preprocess import preprocess
from src.engine.fit import fit
from src.engine.frozen import FrozenFeatures
from src.engine.grid import fit_grid
from src.engine.protocol import FINAL_SEEDS
from src.engine.record import RunRecord
from src.engine.runs import Recipe, Run, SplitStream, TaskData
from src.engine.search_grids import lr_wd_grid
from src.models.checkpoints import load_backbone, write_random_npz
from src.models.vit import VisionTransformer
from src.models.vqt import VQT, Members, QuerySpec
from src.utils.device import resolve_device
from src.utils.layout import Layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = {"tiny": ViTArch(16, 192, 12, 3, 768), "b16": VIT_B16}  # tiny: ViT-Ti/16 shapes
N_TRAIN, N_VAL, RAW_SIZE = 800, 200, 64  # VTAB-1k train800 / val200; synthetic images are 64x64
GiB = 2 ** 30
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
LIBC = ctypes.CDLL(None)


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
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            LIBC.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() if self.cuda else _proc_status("VmHWM")
        self.growth = self.peak - self.base


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


class Clock:
    """Wall-clock laps, synchronising CUDA first."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        return dt


def synthetic(n: int, classes: int, seed: int) -> ImageSet:
    """`n` noisy 64x64 uint8 images whose class sets their colour."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(0).integers(0, 256, (classes, 3)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    noise = rng.standard_normal((n, RAW_SIZE, RAW_SIZE, 3), dtype=np.float32) * 40
    images = np.clip(colours[labels, None, None] + noise, 0, 255).astype(np.uint8)
    return ImageSet(list(images), labels.astype(np.int64))


def setup(a: argparse.Namespace) -> tuple[torch.device, VisionTransformer, ImageSet]:
    """Device, the backbone loaded from the random .npz, and train800 + val200 images."""
    device = resolve_device(a.device)
    backbone = VisionTransformer(ARCHS[a.arch], a.img_size)
    load_backbone(backbone, a.ckpt, "npz")
    return device, backbone.requires_grad_(False).eval().to(device), synthetic(N_TRAIN + N_VAL, a.classes, 1)


def make_cfg(a: argparse.Namespace, out: str) -> CfgNode:
    """The protocol's config for `a.epochs` epochs (no warm-up: it would not fit in a few epochs, and costs the same)."""
    opts = {"DATA.NAME": "vtab-synthetic", "DATA.NUMBER_CLASSES": a.classes, "DATA.CROPSIZE": a.img_size,
            "DATA.BATCH_SIZE": a.batch_size, "ENGINE.EVAL_BATCH_SIZE": a.batch_size, "SOLVER.OPTIMIZER": "adam",
            "SOLVER.TOTAL_EPOCH": a.epochs, "SOLVER.WARMUP_EPOCH": 0, "MODEL.H2T.NUM_QUERY_TOKENS": a.q, "MODEL.H2T.DROPOUT": 0.1,
            "OUTPUT_DIR": out}
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


Mark = tuple[float, float]  # (wall clock, CPU time of this process) in seconds


def now() -> Mark:
    return time.perf_counter(), time.process_time()


def measured_epochs(text: str) -> int:
    """The `--epochs` argument: at least 2, since a run's first epoch is timed apart from the later ones."""
    epochs = int(text)
    if epochs < 2:
        raise argparse.ArgumentTypeError(f"{epochs}: at least 2 (a run's first epoch is timed apart from the later ones)")
    return epochs


class TimedRecord(RunRecord):
    """A run record that also notes, in the shared list `starts`, when each of its epochs starts."""

    def __init__(self, run: Run, cfg: CfgNode, starts: list[Mark], *, save_ckpt: bool):
        super().__init__(run, cfg, save_ckpt=save_ckpt)
        self.starts = starts

    def epoch_start(self, epoch: int, epochs: int, lr: float) -> None:
        self.starts.append(now())
        super().epoch_start(epoch, epochs, lr)


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


def train_grid(cfg: CfgNode, frozen: FrozenFeatures, runs: list[Run], data: TaskData, save_ckpt: bool,
               recipe: Recipe | None = None) -> list[Mark]:
    """The stacked engine, as the protocol runs a phase (`recipe`: the config's); returns when each epoch started."""
    starts: list[Mark] = []
    jobs = [(r, TimedRecord(r, cfg, starts if i == 0 else [], save_ckpt=save_ckpt)) for i, r in enumerate(runs)]
    ckpts = fit_grid(QuerySpec.from_cfg(cfg), frozen, jobs, recipe or Recipe.from_cfg(cfg), data, cfg.ENGINE.FUSED_KV_GIB)
    for (_, record), ckpt in zip(jobs, ckpts):
        record.finish(ckpt)
    return starts


def train_reference(cfg: CfgNode, backbone: VisionTransformer, runs: list[Run], data: TaskData,
                    save_ckpt: bool, recipe: Recipe | None = None) -> list[Mark]:
    """The reference loop (ENGINE.GRID False): each run alone, backbone at every step (`recipe`: the
    config's); returns when each epoch of each run started."""
    starts: list[Mark] = []
    for r in runs:
        model = VQT(backbone, QuerySpec.from_cfg(cfg), r.feat_ids)
        record = TimedRecord(r, cfg, starts, save_ckpt=save_ckpt)
        fit(model, r, recipe or Recipe.from_cfg(cfg), data, record)
        record.finish(model.trained_state())
    return starts


def timed_test(a: argparse.Namespace, laps: list[tuple[Mark, float]]) -> SplitStream:
    """The synthetic test set as a stream; appends (its first batch request, wall seconds to its end) to `laps`."""
    test = synthetic(a.test_size, a.classes, 2)

    def batches() -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        start = now()
        for i in range(0, len(test), a.batch_size):
            yield test.images[i:i + a.batch_size], test.labels[i:i + a.batch_size]
        laps.append((start, time.perf_counter() - start[0]))
    return SplitStream(len(test), batches())


def fast_path(a: argparse.Namespace) -> dict:
    """Cached frozen pass, the whole search grid together, the 5 finals together with the test streamed once."""
    device, backbone, images = setup(a)
    test = []
    with PeakMemory(device) as mem, tempfile.TemporaryDirectory() as out:
        cfg, clock = make_cfg(a, out), Clock(device)
        frozen = FrozenFeatures(backbone, images, a.img_size, device, cache=True, dtype=a.cache_dtype,
                                batch_size=a.batch_size)
        build = clock.lap()
        starts = train_grid(cfg, frozen, search_runs(cfg, a.grid), task_data(a, images, device, N_TRAIN), False)
        search = Epochs.from_marks(starts, now(), a.epochs)
        starts = train_grid(cfg, frozen, final_runs(cfg, len(FINAL_SEEDS)),
                            task_data(a, images, device, len(images), timed_test(a, test)), True)
        finals = Epochs.from_marks(starts, test[0][0], a.epochs)
        cache_bytes = frozen.kv.numel() * frozen.kv.element_size()
        frozen.close()
    return {"frozen_pass_s": build, "search": search, "finals": finals, "test_s": test[0][1],
            "cache_bytes": cache_bytes, "peak_bytes": mem.growth}


def reference_path(a: argparse.Namespace) -> dict:
    """The reference loop (backbone at every step, one run at a time): `--ref-configs` search configs and one final."""
    device, backbone, images = setup(a)
    test = []
    with PeakMemory(device) as mem, tempfile.TemporaryDirectory() as out:
        cfg = make_cfg(a, out)
        starts = train_reference(cfg, backbone, search_runs(cfg, a.ref_configs),
                                 task_data(a, images, device, N_TRAIN), False)
        search = Epochs.from_marks(starts, now(), a.epochs)
        starts = train_reference(cfg, backbone, final_runs(cfg, 1),
                                 task_data(a, images, device, len(images), timed_test(a, test)), True)
        finals = Epochs.from_marks(starts, test[0][0], a.epochs)
    return {"search": search, "finals": finals, "test_s": test[0][1], "peak_bytes": mem.growth}


def vpt_deep_logits(backbone: VisionTransformer, x: torch.Tensor, prompts: torch.Tensor,
                    head: nn.Linear) -> torch.Tensor:
    """VPT-deep: layer i's P prompt tokens replace the previous prompt outputs after CLS; the frozen blocks
    attend over [CLS, prompts, patches], so gradients flow back through every layer."""
    x = backbone.embed(x)
    p = prompts.shape[1]
    for i, blk in enumerate(backbone.blocks):
        patches = x[:, 1 + p:] if i else x[:, 1:]
        x = blk(torch.cat([x[:, :1], prompts[i].expand(x.shape[0], -1, -1), patches], dim=1))[0]
    return head(backbone.norm(x)[:, 0])


def train_step(a: argparse.Namespace, method: str) -> dict:
    """Peak memory and time of one training step (forward + backward) on `--mem-batch` images."""
    device, backbone, images = setup(a)
    idx = torch.arange(a.mem_batch) % len(images)
    d = backbone.embed_dim
    if method == "vqt":
        frozen = FrozenFeatures(backbone, images, a.img_size, device, cache=False)
        model = Members(backbone, QuerySpec(a.q, a.classes, dropout=0.1), [0]).to(device)
        model.reset(device)
    else:
        prompts = nn.Parameter(torch.empty(backbone.depth, a.prompts, d, device=device).uniform_(-0.05, 0.05))
        head = nn.Linear(d, a.classes).to(device)
    if device.type == "cpu":  # glibc keeps freed blocks below its (adaptive) mmap threshold: pin it to 1 MiB
        LIBC.mallopt(M_MMAP_THRESHOLD, 2 ** 20)  # so that the resident set follows the live tensors
    with PeakMemory(device) as mem:
        clock = Clock(device)
        if method == "vqt":
            feat, kvs, y = frozen.batch(idx)  # frozen pass under no_grad, as the uncached path
            logits = model(feat, kvs, train=True)[:, 0]
        else:
            x = preprocess([images.images[i] for i in idx.tolist()], a.img_size, device)
            y = torch.as_tensor(images.labels[idx.numpy()], device=device)
            logits = vpt_deep_logits(backbone, x, prompts, head)
        F.cross_entropy(logits, y).backward()
        seconds = clock.lap()
    return {"peak_bytes": mem.growth, "step_s": seconds}


def isolated_step(a: argparse.Namespace, method: str) -> dict:
    """`train_step` here on CUDA; on CPU in a fresh process, so that its resident-set peak is the step's
    own (what the protocol left in this process's allocator blurs a figure of about 1 GiB)."""
    if resolve_device(a.device).type == "cuda":
        return train_step(a, method)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(train_step, a, method).result()


def extrapolate(a: argparse.Namespace, fast: dict, ref: dict) -> list[tuple]:
    """Rows (path, phase, measured work, measured s, first-epoch s, later s per config-epoch, full work, full s).
    Every run (the fast path: every stacked phase) costs its measured first epoch once and its later
    epochs' mean for each further epoch; the reference is linear in runs; frozen pass and test streaming
    are fixed costs (the test scaled linearly to `--full-test-size` images)."""
    e, full, n_final = a.epochs, a.full_epochs, len(FINAL_SEEDS)
    test_scale = a.full_test_size / a.test_size
    rs, rf, fs, ff = ref["search"], ref["finals"], fast["search"], fast["finals"]
    return [
        ("reference", "search", f"{a.ref_configs} cfg x {e} ep", rs.total, rs.first, rs.later,
         f"{a.grid} cfg x {full} ep", a.grid * rs.run_seconds(full)),
        ("reference", "finals", f"1 cfg x {e} ep", rf.total, rf.first, rf.later,
         f"{n_final} cfg x {full} ep", n_final * rf.run_seconds(full)),
        ("reference", "test", f"{a.test_size} img x 1 run", ref["test_s"], None, None,
         f"{a.full_test_size} img x {n_final} runs", n_final * ref["test_s"] * test_scale),
        ("fast", "frozen pass", f"{N_TRAIN + N_VAL} img", fast["frozen_pass_s"], None, None, "once",
         fast["frozen_pass_s"]),
        ("fast", "search", f"{a.grid} cfg x {e} ep", fs.total, fs.first, fs.later / a.grid,
         f"{a.grid} cfg x {full} ep", fs.run_seconds(full)),
        ("fast", "finals", f"{n_final} cfg x {e} ep", ff.total, ff.first, ff.later / n_final,
         f"{n_final} cfg x {full} ep", ff.run_seconds(full)),
        ("fast", "test", f"{a.test_size} img x 1", fast["test_s"], None, None, f"{a.full_test_size} img x 1",
         fast["test_s"] * test_scale),
    ]


def report_protocol(a: argparse.Namespace) -> dict:
    """Measure both paths, print the measured and extrapolated table and their peak memory; return the figures."""
    ref, fast = reference_path(a), fast_path(a)
    rows = extrapolate(a, fast, ref)
    print(f"task: {N_TRAIN} train + {N_VAL} val synthetic {RAW_SIZE}x{RAW_SIZE} images, test {a.test_size} measured; "
          f"search grid {a.grid} Adam configs, finals {len(FINAL_SEEDS)} seeds")
    print(f"\n{'path':<10}{'phase':<12}{'MEASURED work':<22}{'seconds':>9}{'1st epoch':>11}{'later s/cfg-ep':>16}   "
          f"{'EXTRAPOLATED work':<26}{'seconds':>10}")
    totals = {"reference": 0.0, "fast": 0.0}
    for path, phase, work, sec, first, per, full_work, full_sec in rows:
        totals[path] += full_sec
        first_s, per_s = ("fixed", "") if per is None else (f"{first:.2f}", f"{per:.3f}")
        print(f"{path:<10}{phase:<12}{work:<22}{sec:>9.1f}{first_s:>11}{per_s:>16}   {full_work:<26}{full_sec:>10.0f}")
    ratio = totals["reference"] / totals["fast"]
    print(f"\nfull protocol ({a.full_epochs} epochs, test {a.full_test_size} images), EXTRAPOLATED from the "
          f"{a.epochs}-epoch measurements above (each run's first epoch once, its later epochs' mean after):")
    print(f"  reference {totals['reference']:.0f} s ({totals['reference'] / 3600:.2f} h), "
          f"fast {totals['fast']:.0f} s ({totals['fast'] / 3600:.2f} h): ratio {ratio:.1f}x (target >= 50x)")
    print(f"\npeak memory above the loaded backbone + images (MEASURED, {memory_kind(a, False)}):")
    print(f"  reference path {ref['peak_bytes'] / GiB:.2f} GiB; fast path {fast['peak_bytes'] / GiB:.2f} GiB "
          f"(frozen-path cache {fast['cache_bytes'] / GiB:.2f} GiB {a.cache_dtype})")
    keys = ("path", "phase", "measured_work", "measured_s", "first_epoch_s", "later_s_per_config_epoch",
            "full_work", "full_s")
    measured = {path: {k: vars(v) if isinstance(v, Epochs) else v for k, v in d.items()}
                for path, d in (("reference", ref), ("fast", fast))}
    return {"measured": measured, "extrapolated": [dict(zip(keys, r)) for r in rows],
            "reference_s": totals["reference"], "fast_s": totals["fast"], "ratio": ratio}


def report_memory(a: argparse.Namespace) -> dict:
    """Measure and print the training-step memory of VQT vs VPT-deep; return the figures."""
    vqt, vpt = isolated_step(a, "vqt"), isolated_step(a, "vpt")
    ratio = vqt["peak_bytes"] / vpt["peak_bytes"]
    print(f"\none training step, batch {a.mem_batch}, peak memory above the loaded backbone + images "
          f"(MEASURED, {memory_kind(a, True)}):")
    print(f"  VQT {vqt['peak_bytes'] / GiB:.2f} GiB ({vqt['step_s']:.1f} s); VPT-deep {a.prompts} prompts/layer "
          f"{vpt['peak_bytes'] / GiB:.2f} GiB ({vpt['step_s']:.1f} s): VQT/VPT {ratio:.3f} (target <= 0.25)")
    return {"vqt_step": vqt, "vpt_deep_step": vpt, "vqt_over_vpt": ratio}


def memory_kind(a: argparse.Namespace, step: bool) -> str:
    if resolve_device(a.device).type == "cuda":
        return "CUDA max_memory_allocated"
    return "resident-set high-water mark" + (", a fresh process each, glibc mmap threshold 1 MiB" if step else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=list(ARCHS), default="tiny", help="tiny: ViT-Ti/16 shapes (dim 192, depth 12)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--epochs", type=measured_epochs, default=2,
                   help="measured epochs of every run (both paths; at least 2: the first carries one-off costs)")
    p.add_argument("--full-epochs", type=int, default=100, help="epochs of the extrapolated full protocol")
    p.add_argument("--grid", type=int, default=20,
                   help="search configs: the paper's Adam grid has 20 (more cycle through it)")
    p.add_argument("--ref-configs", type=int, default=1, help="search configs measured on the reference path")
    p.add_argument("--q", type=int, default=1, help="query tokens per layer")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--test-size", type=int, default=500, help="measured test images")
    p.add_argument("--full-test-size", type=int, default=10000, help="test images of the extrapolated protocol")
    p.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mem-batch", type=int, default=128, help="batch of the VQT vs VPT-deep memory step")
    p.add_argument("--prompts", type=int, default=10, help="VPT-deep prompt tokens per layer")
    p.add_argument("--parts", nargs="+", choices=["protocol", "memory"], default=["protocol", "memory"],
                   help="protocol: speed and memory of both paths; memory: VQT vs VPT-deep training step")
    p.add_argument("--json", help="also write every figure to this file")
    a = p.parse_args()
    device = resolve_device(a.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"vqt protocol benchmark: arch {a.arch} at {a.img_size} px, Q={a.q}, {a.classes} classes, "
          f"batch {a.batch_size}, {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    out = {"args": vars(a).copy(), "device": where, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        a.ckpt = os.path.join(tmp, "vit.npz")
        write_random_npz(a.ckpt, ARCHS[a.arch], img_size=a.img_size, seed=0)
        for part in a.parts:
            out[part] = (report_protocol if part == "protocol" else report_memory)(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
