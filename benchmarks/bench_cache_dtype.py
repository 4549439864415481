"""Effect of ENGINE.CACHE_DTYPE (and ENGINE.AUTOCAST) on accuracy and speed: the 5 final seeds of one
config trained on scikit-learn's digits (1797 real 8x8 scans, 10 classes; 800 train + 200 val, the rest
test) through a random-weight ViT, with an fp32, bf16 and fp16 cache. Reports the largest val/test logit
difference to fp32, val/test top-1 and the seconds per epoch of the finals.

    python benchmarks/bench_cache_dtype.py                                # ViT-Ti/16 shapes at 32 px (patch 4)
    python benchmarks/bench_cache_dtype.py --img-size 224 --patch 16 --epochs 1   # speed at 224 px
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from PIL import Image

from src.configs.defaults import load_cfg
from src.configs.vit_configs import ViTArch
from src.data.loader import ImageSet
from src.engine.frozen import FrozenFeatures
from src.engine.grid import fit_grid
from src.engine.protocol import FINAL_SEEDS
from src.engine.record import RunRecord
from src.engine.runs import Recipe, Run, SplitStream, TaskData
from src.models.checkpoints import load_backbone, write_random_npz
from src.models.vit import VisionTransformer
from src.models.vqt import QuerySpec
from src.utils.layout import RunDir


def digits() -> tuple[ImageSet, ImageSet]:
    """(train800 + val200, test) of the digits in a fixed random order, as 32x32 RGB uint8 images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    images = [np.asarray(Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32))
                         .convert("RGB")) for i in order]
    labels = d.target[order].astype(np.int64)
    return ImageSet(images[:1000], labels[:1000]), ImageSet(images[1000:], labels[1000:])


def train(a: argparse.Namespace, bb: VisionTransformer, data: tuple[ImageSet, ImageSet], dtype: str,
          autocast: str, out: str) -> dict:
    """The 5 final seeds on train800val200 with a `dtype` cache: val/test logits and top-1, s per epoch."""
    images, test = data
    opts = {"DATA.NAME": "vtab-eurosat", "DATA.NUMBER_CLASSES": 10, "DATA.CROPSIZE": a.img_size,
            "DATA.BATCH_SIZE": 128, "SOLVER.OPTIMIZER": "adam", "SOLVER.TOTAL_EPOCH": a.epochs,
            "SOLVER.WARMUP_EPOCH": min(10, a.epochs - 1), "MODEL.H2T.NUM_QUERY_TOKENS": a.q, "MODEL.H2T.DROPOUT": 0.1,
            "ENGINE.AUTOCAST": autocast, "OUTPUT_DIR": out}
    cfg = load_cfg("", [str(x) for kv in opts.items() for x in kv])
    device = torch.device("cpu")
    frozen = FrozenFeatures(bb, images, a.img_size, device, cache=True, dtype=dtype)

    def stream() -> SplitStream:
        return SplitStream(len(test), ((test.images[i:i + 128], test.labels[i:i + 128]) for i in range(0, len(test), 128)))
    task = TaskData(images, torch.arange(1000), torch.arange(800, 1000), a.img_size, device, stream)
    runs = [Run(RunDir(os.path.join(out, dtype + autocast, f"run{k}")), a.lr, 0.0, s) for k, s in enumerate(FINAL_SEEDS)]
    jobs = [(r, RunRecord(r, cfg, save_ckpt=True)) for r in runs]
    start = time.perf_counter()
    for (_, rec), ckpt in zip(jobs, fit_grid(QuerySpec.from_cfg(cfg), frozen, jobs, Recipe.from_cfg(cfg), task, 10.0)):
        rec.finish(ckpt)
    seconds = time.perf_counter() - start
    frozen.close()
    out = {"s_per_epoch": seconds / a.epochs}
    for split in ("val", "test"):
        logits = torch.stack([torch.load(r.dir.logits_file(f"{split}_{cfg.DATA.NAME}"), weights_only=True)["joint_logits"]
                              for r in runs])
        out[f"{split}_logits"] = logits
        out[f"{split}_top1"] = [100 * r.dir.load_results()[f"epoch_{a.epochs - 1}"]["classification"]
                                [f"{split}_{cfg.DATA.NAME}"]["top1"] for r in runs]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--q", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--runs", nargs="+", default=["float32/off", "bfloat16/off", "float16/off", "float32/bf16"],
                   help="CACHE_DTYPE/AUTOCAST pairs (the first is the baseline)")
    a = p.parse_args()
    arch = ViTArch(a.patch, 192, 12, 3, 768)
    print(f"digits, ViT-Ti shapes (patch {a.patch}, {a.img_size} px, random weights), Q={a.q}, lr {a.lr}, "
          f"{a.epochs} epochs, 5 final seeds, {torch.get_num_threads()} threads, torch {torch.__version__}")
    data = digits()
    with tempfile.TemporaryDirectory() as tmp:
        write_random_npz(os.path.join(tmp, "vit.npz"), arch, img_size=a.img_size, seed=0)
        bb = VisionTransformer(arch, a.img_size)
        load_backbone(bb, os.path.join(tmp, "vit.npz"), "npz")
        bb.eval().requires_grad_(False)
        base = None
        for spec in a.runs:
            dtype, autocast = spec.split("/")
            r = train(a, bb, data, dtype, autocast, tmp)
            base = base or r
            diff = {s: (r[f"{s}_logits"] - base[f"{s}_logits"]).abs().max().item() for s in ("val", "test")}
            print(f"cache {dtype:<9} autocast {autocast:<5} {r['s_per_epoch']:6.2f} s/epoch  "
                  f"val top-1 {np.mean(r['val_top1']):6.2f} ({' '.join(f'{x:.1f}' for x in r['val_top1'])})  "
                  f"test top-1 {np.mean(r['test_top1']):6.2f}  max |logit - fp32|: val {diff['val']:.2e}, "
                  f"test {diff['test']:.2e}", flush=True)


if __name__ == "__main__":
    main()
