"""Predict class names and probabilities with a trained VQT.

    python predict.py RUN_DIR_OR_EXPORT IMAGES_OR_FOLDER [...] [--topk 5] [--out preds.csv]

RUN_DIR_OR_EXPORT is a final run folder (OUTPUT_DIR_final/<NAME>/<FEATURE>/lr.../run1, trained with
MODEL.SAVE_CKPT True) or a file written by scripts/export.py. Folders are searched recursively for
files Pillow reads (hidden folders are not entered), as training reads its class folders; each image is
decoded and resized as in training. Prints one line per image (its top-k classes with probabilities);
--out also writes them as CSV (its folder is checked before any image is read).
"""
from __future__ import annotations

import argparse
import csv
import os

from src.errors import VQTError, run_cli
from src.utils.cli import HelpFormatter, check_out_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("model", metavar="RUN_DIR_OR_EXPORT", help="final run folder or export file")
    p.add_argument("images", metavar="IMAGES_OR_FOLDER", nargs="+", help="image files and/or folders")
    p.add_argument("--topk", type=int, default=5, help="classes shown per image")
    p.add_argument("--out", default="", help="also write the predictions to this CSV file")
    p.add_argument("--weights", default="", help="backbone weight file, if not where the run or export says")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    return p.parse_args(argv)


def image_files(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(images, skipped files): the given files, and the files under the given folders that Pillow
    recognises (`src.data.folder.images_in`, the rule of training's class folders)."""
    from src.data.folder import images_in

    found, skipped = [], []
    for item in inputs:
        if os.path.isfile(item):
            found.append(item)
            continue
        if not os.path.isdir(item):
            raise VQTError(f"{item} is neither an image file nor a folder")
        images, bad = images_in(item)
        found += images
        skipped += bad
    if not found:
        raise VQTError(f"no images found in {' '.join(inputs)}")
    return found, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    if args.topk < 1:
        raise VQTError(f"--topk must be >= 1 (got {args.topk})")
    if args.out:
        check_out_file(args.out, "--out")
    from src.models.inference import load_model  # imports torch and timm: after the arguments are checked
    from src.utils.device import resolve_device

    paths, skipped = image_files(args.images)
    if skipped:
        print(f"skipped {len(skipped)} files Pillow cannot read (e.g. {skipped[0]})")
    loaded = load_model(args.model, resolve_device(args.device), args.weights)
    probs = loaded.predict(paths, args.batch_size)
    k = min(args.topk, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    rows = [[path] + [x for c, p in zip(ci.tolist(), cp.tolist()) for x in (loaded.classes[c], f"{p:.4f}")]
            for path, ci, cp in zip(paths, top_i, top_p)]
    for row in rows:
        print(row[0] + "  " + "  ".join(f"{c} {p}" for c, p in zip(row[1::2], row[2::2])))
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path"] + [x for r in range(1, k + 1) for x in (f"class{r}", f"prob{r}")])
            w.writerows(rows)
        print(f"wrote {len(rows)} predictions to {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
