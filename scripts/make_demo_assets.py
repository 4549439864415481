"""Assets of the built-in demo, written offline: a tiny random ViT checkpoint in the JAX .npz layout
(DATA.FEATURE demo_vit_tiny) and small synthetic VTAB tasks in real TFDS format whose images encode
their labels. Existing assets are kept.

    python scripts/make_demo_assets.py --dest demo_assets --tasks vtab-eurosat vtab-svhn
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.errors import run_cli
from src.utils.cli import HelpFormatter
from src.utils.quiet import quiet_tensorflow

DEMO_FEATURE = "demo_vit_tiny"
DEMO_IMG_SIZE = 64


def main(argv: list[str] | None = None) -> int:
    quiet_tensorflow()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dest", default="demo_assets",
                   help="output folder: pre-trained_weights/ (MODEL_ROOT) and vtab_data/ (DATA_PATH) inside")
    p.add_argument("--tasks", nargs="+", default=["vtab-eurosat", "vtab-svhn"], metavar="DATA.NAME",
                   help="VTAB-1k tasks to write synthetic data for")
    args = p.parse_args(argv)
    return run_cli(lambda: make_assets(args.dest, args.tasks))


def make_assets(dest: str, tasks: list[str]) -> None:
    """Write the demo checkpoint and the synthetic data of `tasks` under `dest` (existing ones are kept)."""
    from src.configs.vit_configs import MODEL_ZOO
    from src.data.synthetic import write_fake_tfds
    from src.models.checkpoints import write_random_npz
    from src.utils.layout import scratch

    entry = MODEL_ZOO[DEMO_FEATURE]
    weights = os.path.join(dest, "pre-trained_weights", entry.file)
    if not os.path.exists(weights):
        os.makedirs(os.path.dirname(weights), exist_ok=True)
        write_random_npz(weights, entry.arch, img_size=DEMO_IMG_SIZE, seed=0)
    print(f"demo backbone: {weights}")
    with scratch(dest):  # TFDS's temporary folders: removed after, or by the next call if this one is killed
        for name in tasks:
            print(f"demo data: {name} -> {write_fake_tfds(name, os.path.join(dest, 'vtab_data'), learnable=True)}")


if __name__ == "__main__":
    sys.exit(main())
