"""Peak training memory and time of one training step of every method (VQT and the baselines of README
"Baselines") on the same batch, side by side: VQT as the stacked engine trains it (frozen pass under no_grad,
then the query path), every other method through its `VQT` module as the reference loop trains it. On CPU each
step runs in a fresh process, so that its resident-set peak is its own. With --accuracy (the csv that
`collect_demo_exp_results.py --methods` writes) it also draws the paper's memory-accuracy picture: measured
memory on x, each method's mean test top-1 on y.

    python -m benchmarks.bench_methods                          # ViT-B/16 shapes, 224 px, batch 16
    python -m benchmarks.bench_methods --accuracy h2t_vit_experiments/results/results_methods.csv --png m.png
"""
from __future__ import annotations

import csv
import re
import time

import torch

from benchmarks.common import GiB, isolated_step, parser, random_checkpoint, write_json
from collect_demo_exp_results import plot_memory_accuracy
from src.utils.device import resolve_device

METHODS = ("vqt", "linear", "prompt-shallow", "prompt-deep", "adapter", "adaptformer", "lora", "tinytl-bias",
           "partial-1", "end2end", "vqt+prompt", "vqt+adaptformer", "vqt+lora")


def method_of_setting(setting: str) -> str:
    """The benchmark's method name of a collector row (a launcher's setting folder): VQTSup_1_adam_final -> vqt,
    prompt-deep10_adam_final -> prompt-deep, vqt1+lora_adam_final -> vqt+lora."""
    name = setting.rsplit("_", 2)[0]
    return "vqt" if name.startswith("VQTSup") else re.sub(r"\d+", "", name)


def read_accuracy(path: str) -> dict[str, float]:
    """Method -> mean test top-1 from the collector's methods csv (the first row of each method)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    col = rows[0].index("mean")
    out: dict[str, float] = {}
    for row in rows[1:]:
        if row[col]:
            out.setdefault(method_of_setting(row[0]), float(row[col]))
    return out


def main() -> None:
    p = parser(__doc__, "b16")
    p.add_argument("--mem-batch", type=int, default=16, help="images in the measured step")
    p.add_argument("--q", type=int, default=1, help="VQT's query tokens per layer (vqt and vqt+*)")
    p.add_argument("--prompts", type=int, default=10, help="prompt tokens per layer of the prompt types")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--accuracy", help="results_methods.csv of collect_demo_exp_results.py --methods")
    p.add_argument("--png", default="methods_memory_accuracy.png", help="the picture (with --accuracy)")
    a = p.parse_args()
    device = resolve_device(a.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    what = "CUDA max_memory_allocated" if device.type == "cuda" else "resident-set peak of a fresh process"
    title = f"{a.arch} at {a.img_size} px, batch {a.mem_batch}, Q={a.q}, {a.prompts} prompts, {where}"
    print(f"one training step per method: {title}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"peak memory above the loaded backbone + images ({what}), time of forward + backward (MEASURED):")
    figures = {}
    with random_checkpoint(a):
        for name in a.methods:
            figures[name] = isolated_step(a, name)
            f, base = figures[name], figures.get("vqt")
            ratio = f"  VQT/this {base['peak_bytes'] / f['peak_bytes']:.3f}" if base and name != "vqt" else ""
            print(f"  {name:<16} {f['params'] / 1e6:9.3f} M trained (no head)  {f['peak_bytes'] / GiB:7.2f} GiB  "
                  f"{f['step_s']:7.2f} s{ratio}", flush=True)
    if a.accuracy:
        accuracy = read_accuracy(a.accuracy)
        points = {name: (f["peak_bytes"] / GiB, accuracy[name]) for name, f in figures.items() if name in accuracy}
        plot_memory_accuracy(points, a.png, title, "peak training memory of one step (GiB)", "mean test top-1 (%)",
                             {name: "tab:red" if name.startswith("vqt") else "tab:blue" for name in points})
        print(f"wrote {a.png}")
    write_json(a.json, {"args": vars(a), "device": where, "methods": figures})


if __name__ == "__main__":
    main()
