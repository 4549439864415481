"""The demo's real-data task: scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 10
classes) written as an image folder and trained through DATA.SOURCE folder on the demo ViT, with
the whole protocol (search on val, 5 final seeds on train+val, test at the end): VQT next to a linear
probe, VPT-deep and AdaptFormer on the same backbone. Prints one line with their test accuracies. The two
baselines that train inside the backbone run on the reference loop, so to keep the demo short they train at one
lr / wd of their grids (VPT-deep 0.25 / 1e-4, AdaptFormer 0.001 / 1e-4) for `--baseline-epochs` instead of
searching.

    python scripts/demo_digits.py --dest demo_assets --exp-root h2t_vit_experiments_demo
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.errors import VQTError, run_cli
from src.utils.cli import HelpFormatter
from src.utils.quiet import quiet_tensorflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = {"train": 0.6, "val": 0.2}  # of each class; the rest is test
PNG_SIZE = 32


def write_digits(folder: str) -> None:
    """folder/{train,val,test}/<digit>/<index>.png: each scan as a 32x32 RGB PNG (bilinear upscale of
    its 0..16 grey levels), split 60/20/20 per class in a fixed random order (seed 0). Kept if present."""
    import numpy as np
    from PIL import Image

    from src.data.digits import digit_images

    if os.path.isdir(os.path.join(folder, "test")):
        return
    images, labels = digit_images(PNG_SIZE)
    rng = np.random.default_rng(0)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_train, n_val = round(SPLIT["train"] * len(idx)), round(SPLIT["val"] * len(idx))
        parts = {"train": idx[:n_train], "val": idx[n_train:n_train + n_val], "test": idx[n_train + n_val:]}
        for part, rows in parts.items():
            out = os.path.join(folder, part, str(label))
            os.makedirs(out, exist_ok=True)
            for i in rows:
                Image.fromarray(images[i]).save(os.path.join(out, f"{i:04d}.png"))


def test_accuracies(output_dir: str) -> list[float]:
    """Test top-1 (%) of the finished final runs of the digits task under `output_dir`."""
    from src.utils.layout import RunDir, RunState

    accs = [100 * run.top1("test_digits") for folder, _, _ in sorted(os.walk(output_dir + "_final"))
            if (run := RunDir(folder)).status() is RunState.DONE]
    if not accs:
        raise VQTError(f"no finished final run of the digits task under {output_dir}_final")
    return accs


def main(argv: list[str] | None = None) -> int:
    quiet_tensorflow()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dest", default="demo_assets", help="assets folder (digits/ and pre-trained_weights/ inside)")
    p.add_argument("--exp-root", default="h2t_vit_experiments_demo", help="results root")
    p.add_argument("--queries", type=int, default=2, help="VQT query tokens per layer")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (1 warm-up)")
    p.add_argument("--prompts", type=int, default=5, help="VPT-deep prompt tokens per layer")
    p.add_argument("--baseline-epochs", type=int, default=6, help="epochs per run of VPT-deep and AdaptFormer")
    args = p.parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    import train
    from src.utils.layout import setting_name

    data = os.path.join(args.dest, "digits")
    write_digits(data)
    methods = [
        (f"VQT (Q={args.queries})", setting_name(args.queries, "adam"),
         ["MODEL.H2T.NUM_QUERY_TOKENS", str(args.queries)]),
        ("linear probe", setting_name(0, "adam", "linear"), ["MODEL.TRANSFER_TYPE", "linear"]),
        (f"VPT-deep ({args.prompts} prompts)", setting_name(0, "adam", f"prompt-deep{args.prompts}"),
         ["MODEL.TRANSFER_TYPE", "prompt", "MODEL.PROMPT.DEEP", "True", "MODEL.PROMPT.NUM_TOKENS", str(args.prompts),
          "MODEL.PROMPT.DROPOUT", "0.1", "SOLVER.BASE_LR", "0.25", "SOLVER.WEIGHT_DECAY", "0.0001",
          "SOLVER.TOTAL_EPOCH", str(args.baseline_epochs)]),
        ("AdaptFormer", setting_name(0, "adam", "adaptformer"),
         ["MODEL.TRANSFER_TYPE", "adaptformer", "SOLVER.BASE_LR", "0.001", "SOLVER.WEIGHT_DECAY", "0.0001",
          "SOLVER.TOTAL_EPOCH", str(args.baseline_epochs)]),
    ]
    line = []
    for label, setting, method in methods:
        out = os.path.join(args.exp_root, setting)
        status = train.main(["--config-file", os.path.join(ROOT, "configs/h2t-prompt/vtab.yaml"), "--optimizer", "adam",
                             "DATA.SOURCE", "folder", "DATA.DATAPATH", data, "DATA.NAME", "digits",
                             "DATA.FEATURE", "demo_vit_tiny",
                             "MODEL.MODEL_ROOT", os.path.join(args.dest, "pre-trained_weights"),
                             "DATA.CROPSIZE", "64", "OUTPUT_DIR", out, "SOLVER.TOTAL_EPOCH", str(args.epochs),
                             "SOLVER.WARMUP_EPOCH", "1", *method])
        if status:
            raise VQTError(f"training the digits task with {label} failed (exit {status})")
        accs = test_accuracies(out)
        line.append(f"{label} {statistics.mean(accs):.1f} ± {statistics.pstdev(accs):.1f}")
    print("digits (scikit-learn's real 8x8 scans, 10 classes, DATA.SOURCE folder, demo ViT): test top-1 "
          + " | ".join(line) + f" (5 seeds each; chance 10.0; VPT-deep and AdaptFormer: {args.baseline_epochs} "
          "epochs at one lr / wd, not searched)")


if __name__ == "__main__":
    sys.exit(main())
