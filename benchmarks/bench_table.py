"""Speed of the whole `run_demo_exp.sh` protocol (19 VTAB-1k tasks: search, finals, compression, test) on
synthetic images, reference path vs fast path, next to the FLOP-bound ratio of each phase.

Measured: per distinct Q (1, 10, 20), `--epochs` epochs of each phase on both paths (the fast search
with `--grid` configs of the 20, the reference with one config), each run's first epoch (one-off costs)
apart from its later ones, the frozen pass over 1000 images and `--test-size` test images. Computed:
every task's phases from its Q, class count and real test size (src.data.tasks), each measured phase
time scaled by the FLOPs of the task's phase over the FLOPs of the measured one (linear in configs,
images and head size; a run of 100 epochs = its first epoch + 99 later ones), and the FLOPs of both paths.

    python -m benchmarks.bench_table                  # ViT-Ti/16 shapes, 224 px, CPU (2 idle cores: ~25 min)
    python -m benchmarks.bench_table --arch b16 --device cuda --grid 20 --test-size 2048
    python -m benchmarks.bench_table --arch b16 --qs 20 --grid 2 --fast-only   # Q=20 vs its FLOP bound, ViT-B/16 shapes
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from benchmarks import common
from src.configs.vit_configs import ViTArch
from src.data.tasks import TASKS
from src.engine.frozen import FrozenFeatures
from src.engine.protocol import FINAL_SEEDS
from src.engine.runs import Recipe, Run
from src.engine.train import Engine
from src.models.vqt import QUERY_KEY, QuerySpec

EPOCHS, CONFIGS, SEEDS = 100, 20, len(FINAL_SEEDS)
N_ALL = common.N_TRAIN + common.N_VAL
LRP_COEF = 1e-4  # the compress stage's group lasso (run_vqt_vtab_sparsity.sh)
PHASES = ("search", "finals", "compress", "featselect")


@dataclass(frozen=True)
class Flops:
    """Analytic FLOPs (2 x multiply-adds) of one image through the two paths of one ViT."""

    arch: ViTArch
    img_size: int

    @property
    def tokens(self) -> int:
        return 1 + (self.img_size // self.arch.patch_size) ** 2

    def backbone(self) -> float:
        """Frozen forward: patch embedding, per layer qkv + proj + MLP (12 D^2 per token) and attention (2 T^2 D)."""
        d, t, p = self.arch.embed_dim, self.tokens, self.arch.patch_size
        layer = t * (4 * d * d + 2 * d * self.arch.mlp_dim) + 2 * t * t * d
        return 2 * ((t - 1) * 3 * p * p * d + self.arch.depth * layer)

    def query(self, q: int) -> float:
        """Query path forward of one member: per layer and token q-projection, attention over T cached
        keys/values, output projection and MLP."""
        d, t = self.arch.embed_dim, self.tokens
        return 2 * self.arch.depth * q * (2 * d * d + 2 * d * self.arch.mlp_dim + 2 * t * d)

    def head(self, q: int, classes: int, keep: float = 1.0) -> float:
        d = self.arch.embed_dim
        return 2 * classes * int(keep * (d + self.arch.depth * q * d))

    def phase(self, phase: str, q: int, classes: int, reference: bool) -> float:
        """FLOPs of one config-epoch: train steps over 800 (search) or 1000 images, then val200.
        Training the query tokens: backward = forward (input gradients only: the weights are frozen) and
        the head's weight gradient; compression stages train the head only."""
        n_train = common.N_TRAIN if phase == "search" else N_ALL
        keep = 0.7 if phase == "featselect" else 1.0
        head = self.head(q, classes, keep)
        query_bwd = self.query(q) + head if phase in ("search", "finals") else 0.0
        train = self.query(q) + head + query_bwd + head
        val = self.query(q) + head
        if reference:
            train, val = train + self.backbone(), val + self.backbone()
        return n_train * train + common.N_VAL * val

    def test(self, q: int, classes: int, members: int) -> float:
        """One test image through the backbone and `members` query paths + heads."""
        return self.backbone() + members * (self.query(q) + self.head(q, classes))


def stage_runs(cfg, stage: str, dim: int, depth: int, q: int) -> tuple[list[Run], Recipe]:
    """The 5 runs of a compression stage (queries from a final run; featselect keeps 70 % of the features)."""
    runs = common.final_runs(cfg, SEEDS)
    torch.manual_seed(0)
    for r in runs:
        r.lr *= 0.5
        r.start = {QUERY_KEY: torch.randn(depth, q, dim) * 0.02}
        if stage == "featselect":
            f = dim + depth * q * dim
            r.feat_ids = torch.randperm(f)[:int(0.7 * f)].sort().values
    return runs, Recipe.from_cfg(cfg, lrp_coef=LRP_COEF if stage == "compress" else 0.0, freeze_queries=True)


class Bench:
    """Both paths on one backbone and one synthetic train800 + val200 set, timed phase by phase."""

    def __init__(self, a: argparse.Namespace, out: str):
        self.a, self.out = a, out
        self.device, self.backbone, self.images = common.setup(a)
        start = common.now()
        self.frozen = FrozenFeatures(self.backbone, self.images, a.img_size, self.device, cache=True,
                                     dtype=a.cache_dtype, batch_size=a.batch_size)
        self.frozen_s = common.since(start)

    def cfg(self, q: int, tag: str):
        ns = argparse.Namespace(**{**vars(self.a), "q": q})
        return common.make_cfg(ns, os.path.join(self.out, tag))

    def run(self, reference: bool, q: int, phase: str) -> dict:
        """`--epochs` epochs of `phase` (then the test stream, after finals and compression stages): wall and
        CPU seconds of the runs' first epochs and of their later ones, and the test's wall seconds."""
        cfg, dim, depth = self.cfg(q, f"{'ref' if reference else 'fast'}_{phase}_{q}"), self.backbone.embed_dim, \
            self.backbone.depth
        if phase == "search":
            runs, recipe = common.search_runs(cfg, 1 if reference else self.a.grid), Recipe.from_cfg(cfg)
        elif phase == "finals":
            runs, recipe = common.final_runs(cfg, 1 if reference else SEEDS), Recipe.from_cfg(cfg)
        else:
            runs, recipe = stage_runs(cfg, phase, dim, depth, q)
            runs = runs[:1] if reference else runs
        laps: list = []
        test = None if phase == "search" else common.timed_test(self.a, laps)
        rows = common.N_TRAIN if phase == "search" else N_ALL
        data = common.task_data(self.a, self.images, self.device, rows, test)
        spec = QuerySpec.from_cfg(cfg)
        engine = Engine.reference(spec, self.backbone) if reference else \
            Engine.stacked(spec, self.frozen, cfg.ENGINE.FUSED_KV_GIB)
        starts = common.train(cfg, engine, runs, data, False, recipe)
        end = laps[0][0] if laps else common.now()
        e = self.a.epochs
        return {"configs": len(runs), "wall": vars(common.Epochs.from_marks(starts, end, e)),
                "cpu": vars(common.Epochs.from_marks(starts, end, e, clock=1)),
                "test_s": laps[0][1] if laps else 0.0}


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 10) -> tuple[float, float]:
    """Sustained fp32 GFLOP/s of an n x n x n torch.mm: per wall second and per CPU second of this process."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    start = common.now()
    for _ in range(reps):
        a @ b
    end = common.now()
    wall, cpu = end[0] - start[0], end[1] - start[1]
    flops = reps * 2 * n ** 3
    return flops / wall / 1e9, flops / cpu / 1e9


def measure(a: argparse.Namespace, qs: list[int]) -> dict:
    """Every measured figure: the frozen pass, one epoch of each phase per Q on both paths, the matmul rate."""
    with tempfile.TemporaryDirectory() as out:
        bench = Bench(a, out)
        rate = matmul_gflops(bench.device)
        figures = {"frozen_pass_s": bench.frozen_s, "frozen_images": N_ALL, "matmul_gflops": rate, "phases": {}}
        for q in qs:
            for phase in PHASES if q == 1 else PHASES[:2]:
                for reference in (False,) if a.fast_only else (False, True):
                    key = f"{'reference' if reference else 'fast'}/{phase}/Q{q}"
                    figures["phases"][key] = r = bench.run(reference, q, phase)
                    w, c = r["wall"], r["cpu"]
                    print(f"  measured {key:<24} {r['configs']:>2} configs x {a.epochs} epochs: "
                          f"first {w['first']:7.1f} s "
                          f"(CPU {c['first']:.1f} s), later {w['later']:7.1f} s/epoch (CPU {c['later']:.1f} s), "
                          f"test {a.test_size} images {r['test_s']:6.1f} s", flush=True)
        figures["matmul_gflops_after"] = matmul_gflops(bench.device)
        bench.frozen.close()
    return figures


def table(a: argparse.Namespace, m: dict) -> dict:
    """Per task and phase: seconds of both paths (computed from the measurements) and FLOPs of both."""
    fl = Flops(common.ARCHS[a.arch], a.img_size)
    rows, c0 = [], a.classes
    for t in TASKS.values():
        q, classes, n_test = t.q, t.num_classes, t.test_size
        phases = PHASES if t.fraction is not None else PHASES[:2]
        row = {"task": t.short, "q": q, "classes": classes, "test": n_test, "ref_s": 0.0, "fast_s": 0.0,
               "ref_flops": 0.0, "fast_flops": 0.0}
        # each train.py process (training; each compression stage) builds its own cache
        row["fast_s"] += len(phases[1:]) * m["frozen_pass_s"]
        row["fast_flops"] += len(phases[1:]) * N_ALL * fl.backbone()
        for phase in phases:
            n_cfg = CONFIGS if phase == "search" else SEEDS
            for path, reference in (("ref", True), ("fast", False)):
                r = m["phases"][f"{'reference' if reference else 'fast'}/{phase}/Q{q}"]
                scale = fl.phase(phase, q, classes, reference) / fl.phase(phase, q, c0, reference)
                row[f"{path}_s"] += n_cfg * scale * common.Epochs(**r["wall"]).run_seconds(EPOCHS) / r["configs"]
                row[f"{path}_flops"] += EPOCHS * n_cfg * fl.phase(phase, q, classes, reference)
                if phase != "search":  # test at the end: once per run (reference), once for all 5 runs (fast)
                    runs, members = (SEEDS, 1) if reference else (1, SEEDS)
                    tscale = fl.test(q, classes, members) / fl.test(q, c0, members)
                    row[f"{path}_s"] += runs * tscale * r["test_s"] * n_test / a.test_size
                    row[f"{path}_flops"] += runs * n_test * fl.test(q, classes, members)
        rows.append(row)
    return {"rows": rows}


def per_q(a: argparse.Namespace, m: dict) -> list[dict]:
    """Per Q and phase: s per config-epoch of both paths, measured ratio, FLOP-bound ratio, fast vs its FLOP bound."""
    fl, out = Flops(common.ARCHS[a.arch], a.img_size), []
    wall_rate, cpu_rate = m["matmul_gflops"]
    for key, r in m["phases"].items():
        path, phase, q = key.split("/")
        if path != "fast":
            continue
        q = int(q[1:])
        ref = m["phases"].get(f"reference/{phase}/Q{q}")
        fast_s = r["wall"]["later"] / r["configs"]
        ref_s = None if ref is None else ref["wall"]["later"] / ref["configs"]
        fast_f, ref_f = fl.phase(phase, q, a.classes, False), fl.phase(phase, q, a.classes, True)
        out.append({"phase": phase, "q": q, "ref_s": ref_s, "fast_s": fast_s,
                    "ratio": None if ref_s is None else ref_s / fast_s,
                    "flop_ratio": ref_f / fast_f, "fast_gflop": fast_f / 1e9, "bound_s": fast_f / 1e9 / wall_rate,
                    "over_bound": fast_s / (fast_f / 1e9 / wall_rate),
                    "over_bound_cpu": r["cpu"]["later"] / r["configs"] / (fast_f / 1e9 / cpu_rate)})
    return out


def report(a: argparse.Namespace, m: dict) -> dict:
    qs = per_q(a, m)
    wall_rate, cpu_rate = m["matmul_gflops"]
    print(f"\nsustained fp32 matmul (2048^3 torch.mm, MEASURED): {wall_rate:.0f} GFLOP/s per wall second, "
          f"{cpu_rate:.0f} per CPU second (after the run: {m['matmul_gflops_after'][0]:.0f} / "
          f"{m['matmul_gflops_after'][1]:.0f})")
    print(f"frozen pass, {N_ALL} images (MEASURED): {m['frozen_pass_s']:.1f} s")
    print(f"\nper config-epoch (MEASURED: mean of epochs 2..{a.epochs}; fast search over "
          f"{a.grid} configs together, reference 1 config; {a.classes} classes)")
    print(f"{'phase':<11}{'Q':>3}{'ref s':>9}{'fast s':>9}{'ratio':>8}{'FLOP ratio':>12}{'fast GFLOP':>12}"
          f"{'bound s':>9}{'fast/bound':>12}{'(CPU time)':>12}")
    for r in qs:
        ref_s, ratio = ("-", "-") if r["ratio"] is None else (f"{r['ref_s']:.2f}", f"{r['ratio']:.1f}x")
        print(f"{r['phase']:<11}{r['q']:>3}{ref_s:>9}{r['fast_s']:>9.3f}{ratio:>8}{r['flop_ratio']:>11.1f}x"
              f"{r['fast_gflop']:>12.1f}{r['bound_s']:>9.3f}{r['over_bound']:>11.2f}x{r['over_bound_cpu']:>11.2f}x")
    missing = sorted({t.q for t in TASKS.values()} - set(a.qs))
    if a.fast_only or missing:
        why = "--fast-only" if a.fast_only else f"Q={', '.join(map(str, missing))} not measured (--qs)"
        print(f"\nno whole-table figures: {why}")
        return {"per_q": qs}
    rows = table(a, m)["rows"]
    print(f"\nwhole run_demo_exp.sh protocol, COMPUTED per task from the measurements ({EPOCHS} epochs: each run's "
          f"first epoch once, then its later epochs' mean; {CONFIGS} search configs, {SEEDS} seeds, real test sizes; "
          "images synthetic, no TFDS decoding)")
    print(f"{'task':<15}{'Q':>3}{'C':>5}{'test':>7}{'reference s':>13}{'fast s':>9}{'ratio':>8}{'FLOP ratio':>12}")
    tot = {"ref_s": 0.0, "fast_s": 0.0, "ref_flops": 0.0, "fast_flops": 0.0}
    for r in rows:
        for k in tot:
            tot[k] += r[k]
        print(f"{r['task']:<15}{r['q']:>3}{r['classes']:>5}{r['test']:>7}{r['ref_s']:>13.0f}{r['fast_s']:>9.0f}"
              f"{r['ref_s'] / r['fast_s']:>7.1f}x{r['ref_flops'] / r['fast_flops']:>11.1f}x")
    ratio, flop_ratio = tot["ref_s"] / tot["fast_s"], tot["ref_flops"] / tot["fast_flops"]
    print(f"{'total':<30}{tot['ref_s']:>13.0f}{tot['fast_s']:>9.0f}{ratio:>7.1f}x{flop_ratio:>11.1f}x")
    print(f"  = reference {tot['ref_s'] / 3600:.1f} h, fast {tot['fast_s'] / 3600:.2f} h; FLOPs: reference "
          f"{tot['ref_flops'] / 1e15:.1f} PFLOP, fast {tot['fast_flops'] / 1e15:.2f} PFLOP")
    return {"per_q": qs, "tasks": rows, "total": {**tot, "ratio": ratio, "flop_ratio": flop_ratio}}


def main() -> None:
    p = common.parser(__doc__, "tiny")
    p.add_argument("--epochs", type=common.measured_epochs, default=2,
                   help="measured epochs per phase (at least 2: the first carries one-off costs)")
    p.add_argument("--grid", type=int, default=4, help="search configs measured together on the fast path (of 20)")
    p.add_argument("--qs", type=int, nargs="+", default=sorted({t.q for t in TASKS.values()}), help="Q values measured")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--test-size", type=int, default=256, help="measured test images per phase")
    p.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--fast-only", action="store_true",
                   help="measure the fast path only (its cost per config-epoch against its FLOP bound; no whole table)")
    a = p.parse_args()
    print(f"vqt whole-table benchmark: arch {a.arch} at {a.img_size} px, Q in {a.qs}, batch {a.batch_size}, "
          f"cache {a.cache_dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}")
    with common.random_checkpoint(a):
        m = measure(a, a.qs)
    out = {"args": vars(a), "measured": m, **report(a, m)}
    common.write_json(a.json, out)


if __name__ == "__main__":
    main()
