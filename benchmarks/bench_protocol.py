"""Speed and memory of one VTAB-1k task's VQT protocol (lr x wd search + 5 final seeds) on synthetic images.

Reference path: the frozen backbone runs at every step, each config trains alone, the test set is
streamed once per final run (as the original). Fast path: one cached frozen pass, all configs of a
phase trained together, the test set streamed once for all finals. Both run in this process, one
after the other, over a few epochs, extrapolated to the full protocol (100 epochs); the printout
says which figures are measured and which are extrapolated. Also: training-step memory of VQT vs
VPT-deep (prompts inside the backbone, backprop through every layer) on the same batch.

    python -m benchmarks.bench_protocol                   # ViT-Ti/16 shapes at 224 px (2 CPU cores: ~4 min)
    python -m benchmarks.bench_protocol --arch b16 --device cuda --epochs 2
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.common import (
    N_TRAIN,
    N_VAL,
    RAW_SIZE,
    Epochs,
    GiB,
    PeakMemory,
    final_runs,
    isolated_step,
    make_cfg,
    measured_epochs,
    now,
    parser,
    random_checkpoint,
    search_runs,
    setup,
    since,
    task_data,
    timed_test,
    train,
    write_json,
)
from src.engine.frozen import FrozenFeatures
from src.engine.protocol import FINAL_SEEDS
from src.engine.train import Engine
from src.models.vqt import QuerySpec
from src.utils.device import resolve_device


def _phases(a: argparse.Namespace, engine: Engine, cfg, images, device: torch.device, configs: int,
            finals: int) -> dict:
    """`configs` search runs, then `finals` final runs and the test streamed after them, on `engine`."""
    test = []
    starts = train(cfg, engine, search_runs(cfg, configs), task_data(a, images, device, N_TRAIN), False)
    search = Epochs.from_marks(starts, now(), a.epochs)
    starts = train(cfg, engine, final_runs(cfg, finals),
                   task_data(a, images, device, len(images), timed_test(a, test)), True)
    return {"search": search, "finals": Epochs.from_marks(starts, test[0][0], a.epochs), "test_s": test[0][1]}


def fast_path(a: argparse.Namespace) -> dict:
    """Cached frozen pass, the whole search grid together, the 5 finals together with the test streamed once."""
    device, backbone, images = setup(a)
    with PeakMemory(device) as mem, tempfile.TemporaryDirectory() as out:
        cfg, start = make_cfg(a, out), now()
        frozen = FrozenFeatures(backbone, images, a.img_size, device, cache=True, dtype=a.cache_dtype,
                                batch_size=a.batch_size)
        build = since(start)
        grid = Engine.stacked(QuerySpec.from_cfg(cfg), frozen, cfg.ENGINE.FUSED_KV_GIB)
        figures = _phases(a, grid, cfg, images, device, a.grid, len(FINAL_SEEDS))
        cache_bytes = frozen.kv.numel() * frozen.kv.element_size()
        frozen.close()
    return {"frozen_pass_s": build, **figures, "cache_bytes": cache_bytes, "peak_bytes": mem.growth}


def reference_path(a: argparse.Namespace) -> dict:
    """The reference loop (backbone at every step, one run at a time): `--ref-configs` search configs and one final."""
    device, backbone, images = setup(a)
    with PeakMemory(device) as mem, tempfile.TemporaryDirectory() as out:
        cfg = make_cfg(a, out)
        figures = _phases(a, Engine.reference(QuerySpec.from_cfg(cfg), backbone), cfg, images, device,
                          a.ref_configs, 1)
    return {**figures, "peak_bytes": mem.growth}


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
    vqt, vpt = isolated_step(a, "vqt"), isolated_step(a, "prompt-deep")
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
    p = parser(__doc__, "tiny")
    p.add_argument("--epochs", type=measured_epochs, default=2,
                   help="measured epochs of every run (both paths; at least 2: the first carries one-off costs)")
    p.add_argument("--full-epochs", type=int, default=100, help="epochs of the extrapolated full protocol")
    p.add_argument("--grid", type=int, default=20,
                   help="search configs: the paper's Adam grid has 20 (more cycle through it)")
    p.add_argument("--ref-configs", type=int, default=1, help="search configs measured on the reference path")
    p.add_argument("--q", type=int, default=1, help="query tokens per layer")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--test-size", type=int, default=500, help="measured test images")
    p.add_argument("--full-test-size", type=int, default=10000, help="test images of the extrapolated protocol")
    p.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mem-batch", type=int, default=128, help="batch of the VQT vs VPT-deep memory step")
    p.add_argument("--prompts", type=int, default=10, help="VPT-deep prompt tokens per layer")
    p.add_argument("--parts", nargs="+", choices=["protocol", "memory"], default=["protocol", "memory"],
                   help="protocol: speed and memory of both paths; memory: VQT vs VPT-deep training step")
    a = p.parse_args()
    device = resolve_device(a.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"vqt protocol benchmark: arch {a.arch} at {a.img_size} px, Q={a.q}, {a.classes} classes, "
          f"batch {a.batch_size}, {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    out = {"args": vars(a).copy(), "device": where, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    with random_checkpoint(a):
        for part in a.parts:
            out[part] = (report_protocol if part == "protocol" else report_memory)(a)
    write_json(a.json, out)


if __name__ == "__main__":
    main()
