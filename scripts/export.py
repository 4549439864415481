"""Export a trained VQT run as one self-contained file.

    python scripts/export.py RUN_DIR --out model.pt

The file holds the trained tensors (query tokens, head, feature ids) with their QuerySpec, the
backbone's identity (timm name or zoo key) and the absolute path of its weight file, the
preprocessing (size, mean, std, resampling) and the class names. Load it with
`src.models.inference.load_model("model.pt")`: `.model(images)` gives logits for images in [0, 1],
`.predict(paths)` class probabilities; or run `python predict.py model.pt IMAGES`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.errors import run_cli
from src.utils.cli import HelpFormatter, check_out_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("run_dir", metavar="RUN_DIR", help="final run folder (.../lr.../run1) with last_model.pth")
    p.add_argument("--out", required=True, help="export file to write (e.g. model.pt)")
    p.add_argument("--weights", default="", help="backbone weight file, if not where the run's config says")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _run(parse_args(argv)))


def _run(args: argparse.Namespace) -> None:
    from src.models.inference import load_export, run_export
    from src.utils.layout import atomic_save

    check_out_file(args.out, "--out")
    export = run_export(args.run_dir, args.weights)
    load_export(export)  # the backbone reference and the tensors load: fail now, not at the user's
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save(export, args.out)
    print(f"wrote {args.out}: {len(export['classes'])} classes, backbone "
          f"{export['backbone']['timm_name'] or export['backbone']['feature']} "
          f"({export['backbone']['weights'] or 'timm cache'})")


if __name__ == "__main__":
    raise SystemExit(main())
