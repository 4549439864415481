"""Collect the run_demo_exp.sh results: test top-1 (%) per VTAB-1k task, mean ± std over seeds.

With no arguments it prints the original table (settings VQTSup_1_adam_sparsefinal (keep_frac_0.7),
VQTSup_10_adam_final, VQTSup_20_adam_final; feature sup_vitb16_imagenet1k) with these fixes: the
lr/wd folder is the one the protocol recorded in pick.json (else the one holding complete runs, said
so when several do), the last epoch present is read (not epoch_99), runs whose DONE status is "ok"
count, and so do results the original code wrote (no DONE: listed as "external"); missing, running,
incomplete, diverged, unreadable (a file DONE vouches for changed), stale (started from runs that changed
since) and foreign runs are listed at the end. Runs are read through `RunDir.status`, as the protocol reads
them; nothing is written under the root but --out. It also writes results.csv, results.md and results.png
to --out (default ROOT/results; a selection other than the default table gets its own file names,
results_<selection>.*, so no table is overwritten by another's). The exit status is 0 even when runs are
missing (this is a report); 2 on bad input, 1 when the result files cannot be written.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from src.data.tasks import GROUPS, PRINT_ORDER, TASKS, VTABTask, select_tasks
from src.errors import VQTError
from src.utils.cli import HelpFormatter
from src.utils.layout import (
    PHASES,
    RunDir,
    RunState,
    TaskLock,
    phase_lock,
    read_pick,
    run_name,
    setting_name,
    stage_name,
    task_dir,
)
from src.utils.quiet import quiet_tensorflow


def demo_setting(task: VTABTask, optimizer: str = "adam") -> str:
    """The setting run_demo_exp.sh reports a task from: the sparsity runs when it has a keep fraction."""
    return setting_name(task.q, optimizer) + PHASES["sparse" if task.fraction is not None else "final"]


# task -> setting its number comes from (Q=1 tasks: sparsefinal keep_frac_0.7; Q=10/20: final).
TASK_SETTINGS: dict[str, str] = {t.name: demo_setting(t) for t in TASKS.values()}
DEFAULT_SETTINGS: tuple[str, ...] = tuple(dict.fromkeys(TASK_SETTINGS.values()))
DEFAULT_RUNS = 5
COUNTED = ("ok", "external")  # run statuses whose test top-1 enters the table
USAGE = ("trainable_params", "trainable_params_without_head", "seconds_per_epoch", "peak_memory_bytes")


@dataclass
class SeedResult:
    """One seed's run folder: status is one of STATUS's values."""

    k: int
    status: str
    top1: float | None = None  # test top-1 in %
    epochs: int | None = None
    detail: str = ""
    usage: dict = field(default_factory=dict)  # DONE's trainable parameters, seconds per epoch, peak memory


@dataclass
class Cell:
    """The runs of one (setting, task): the chosen lr/wd folder and a note when the choice was ambiguous."""

    setting: str
    task: VTABTask
    task_dir: Path
    hyparam: str | None = None
    runs: list[SeedResult] = field(default_factory=list)
    note: str = ""

    @property
    def values(self) -> list[float]:
        return [r.top1 for r in self.runs if r.status in COUNTED]

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        """Population std (numpy's default) over the seeds that count."""
        return float(np.std(self.values)) if self.values else None

    @property
    def epochs(self) -> str:
        """Epoch count(s) of the counted runs, e.g. "100" or "50/100" when they differ."""
        return "/".join(str(e) for e in sorted({r.epochs for r in self.runs if r.status in COUNTED}))


def run_subdir(setting: str, task: VTABTask) -> str | None:
    """Folder between the lr/wd folder and run{k}: keep_frac_F for sparsity settings (None if the task has
    no keep fraction), nothing otherwise."""
    if setting.endswith(PHASES["sparse"]):
        return None if task.fraction is None else stage_name("featselect", task.fraction)
    return ""


# RunDir states -> the collector's statuses (ok and external count), the others in the problem list's order.
STATUS = {RunState.MISSING: "missing", RunState.RUNNING: "running", RunState.PARTIAL: "incomplete",
          RunState.DIVERGED: "diverged", RunState.BROKEN: "unreadable", RunState.STALE: "stale",
          RunState.FOREIGN: "foreign", RunState.EXTERNAL: "external", RunState.DONE: "ok"}


def read_run(run_dir: Path, k: int, name: str, lock: TaskLock | None = None) -> SeedResult:
    """Status (`RunDir.status`, the protocol's own reading) and, for a run that counts, the test top-1 (%) of
    the last epoch. A folder the original code wrote (results but no DONE, no marker of ours) is "external"."""
    run = RunDir(str(run_dir))
    state = run.status(lock=lock)
    if STATUS[state] not in COUNTED:
        return SeedResult(k, STATUS[state], detail=_detail(run, state))
    try:
        top1, epochs = run.top1(f"test_{name}"), run.epochs
    except Exception as err:  # noqa: BLE001 - any broken file is reported, not fatal
        why = f"{Path(run.results_file).name}: {type(err).__name__}: {str(err).strip().splitlines()[0]}"
        return SeedResult(k, "unreadable", detail=why)
    usage = {key: value for key, value in (run.record or {}).items() if key in USAGE}
    return SeedResult(k, STATUS[state], top1 * 100, epochs, _detail(run, state), usage)


def _detail(run: RunDir, state: RunState) -> str:
    """Why a run is in `state`, for the problem list ("" for ok and missing runs)."""
    if state is RunState.DIVERGED:
        return str((run.record or {}).get("message"))
    if state is RunState.BROKEN:
        return run.damage()
    if state is RunState.STALE:
        return "started from runs that changed since: " + ", ".join(run.changed_parents())
    return _DETAIL.get(state, "")


_DETAIL = {RunState.PARTIAL: "no DONE: interrupted", RunState.RUNNING: "no DONE: still running",
           RunState.FOREIGN: "not written by vqt", RunState.EXTERNAL: "no DONE: written by the original code"}


def _count_ok(hp_dir: Path, sub: str, n_runs: int) -> tuple[int, int]:
    """(runs with results that count, run folders present) in one lr/wd folder."""
    states = [RunDir(str(hp_dir / sub / run_name(k))).status() for k in range(1, n_runs + 1)]
    return sum(STATUS[s] in COUNTED for s in states), sum(s is not RunState.MISSING for s in states)


def collect_cell(root: Path, setting: str, task: VTABTask, feature: str, n_runs: int) -> Cell | None:
    """Read one (setting, task); None when its folder does not exist (or the setting does not apply)."""
    folder = Path(task_dir(str(root / setting), task.name, feature))
    sub = run_subdir(setting, task)
    if sub is None or not folder.is_dir():
        return None
    cell = Cell(setting, task, folder)
    counts = {d.name: _count_ok(d, sub, n_runs) for d in sorted(folder.iterdir()) if d.is_dir()}
    if not counts:
        return cell
    pick = read_pick(str(root / setting), task.name, feature)
    holding = [h for h in counts if counts[h][0]]
    if pick and pick["folder"] in counts:
        cell.hyparam = pick["folder"]
    else:  # most ok runs, then most run folders, then name order
        cell.hyparam = max(counts, key=counts.__getitem__)
    if len(holding) > 1 and not (pick and pick["folder"] == cell.hyparam):
        cell.note = (f"several lr/wd folders hold complete runs: "
                     f"{', '.join(f'{h} ({counts[h][0]} ok)' for h in holding)}; using {cell.hyparam}")
    lock = phase_lock(str(root / setting), task.name, feature, sub or "final")
    cell.runs = [read_run(folder / cell.hyparam / sub / run_name(k), k, task.name, lock) for k in range(1, n_runs + 1)]
    return cell


@dataclass
class Report:
    """All cells read, the cell each task's number comes from, and the problems found."""

    cells: dict[tuple[str, str], Cell]
    reported: dict[str, Cell | None]  # task name -> cell (None: no results at all)
    problems: list[str]


def collect(root: Path, feature: str, settings: list[str], tasks: list[VTABTask], n_runs: int = DEFAULT_RUNS
            ) -> Report:
    """Read every (setting, task); each task is reported from TASK_SETTINGS[task] when that setting is
    among `settings`, else from the first listed setting holding complete runs for it."""
    if not root.is_dir():
        raise VQTError(f"experiment root {root} does not exist: run run_demo_exp.sh first, or pass --root")
    cells = {(s, t.name): c for s in settings for t in tasks
             if (c := collect_cell(root, s, t, feature, n_runs)) is not None}
    reported: dict[str, Cell | None] = {}
    problems = []
    for t in tasks:
        mapped = TASK_SETTINGS[t.name]
        if mapped in settings:
            reported[t.name] = cells.get((mapped, t.name))
            if reported[t.name] is None:
                problems.append(f"missing     {mapped} / {t.name}: no {feature} folder (not run yet?)")
        else:
            reported[t.name] = next((c for s in settings if (c := cells.get((s, t.name))) and c.values), None)
            if reported[t.name] is None:
                problems.append(f"missing     {t.name}: no complete runs under any of {settings}")
    for (setting, name), cell in cells.items():
        where = f"{setting} / {name} / {cell.hyparam or '(no lr/wd folder)'}"
        for status in (s for s in STATUS.values() if s != "ok"):
            bad = [r for r in cell.runs if r.status == status]
            if bad:
                runs = ", ".join(f"run{r.k}" + (f" ({r.detail})" if r.detail else "") for r in bad)
                problems.append(f"{status:<11} {where}: {runs}")
        if not cell.runs:
            problems.append(f"missing     {where}: no lr/wd folder in {cell.task_dir}")
    return Report(cells, reported, problems)


def _pm(mean: float | None, std: float | None) -> str:
    return "n/a" if mean is None else f"{mean:.2f} ± {std:.2f}"


def print_table(report: Report, settings: list[str], tasks: list[VTABTask], feature: str) -> None:
    """The original stdout table, plus std, epoch counts, group means and the problem list."""
    names = [n for n in PRINT_ORDER if n in {t.name for t in tasks}]
    for setting in settings:
        if setting not in {TASK_SETTINGS[n] for n in names} | {s for s, _ in report.cells}:
            continue  # none of the selected tasks reports from it, and none has a folder there: no empty section
        print(f"====== {setting} ======")
        for name in names:
            cell = report.cells.get((setting, name))
            if cell is None:
                continue
            print(f"--- {name} - {feature} - {cell.hyparam}")
            if cell.note:
                print(f"note: {cell.note}")
            print(f"=====> {len(cell.values)}")
            print(f"{_pm(cell.mean, cell.std)}" + (f"  (epochs: {cell.epochs})" if cell.values else ""))
        print()
    print("====== group means (test top-1 %, each task from its demo setting) ======")
    for label, mean, counts in group_means(report, tasks):
        print(f"{label}: {'n/a' if mean is None else f'{mean:.2f}'}  ({counts})")
    print()
    print("====== problems ======" if report.problems else "====== no missing, incomplete or diverged runs ======")
    for line in report.problems:
        print(line)


def table_order(tasks: list[VTABTask]) -> list[VTABTask]:
    """Tasks by group (Natural, Specialized, Structured), then in the original print order."""
    return sorted(tasks, key=lambda t: (GROUPS.index(t.group), PRINT_ORDER.index(t.name)))


def group_means(report: Report, tasks: list[VTABTask]) -> list[tuple[str, float | None, str]]:
    """(label, mean, "k/n tasks|groups" with results) per group, over all tasks, and over the group means."""
    def mean_of(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    rows = []
    for group in GROUPS:
        members = [t for t in tasks if t.group == group]
        means = [c.mean for t in members if (c := report.reported[t.name]) and c.mean is not None]
        if members:
            rows.append((group, mean_of(means), f"{len(means)}/{len(members)} tasks"))
    group_values = [mean for _, mean, _ in rows if mean is not None]
    task_means = [c.mean for c in report.reported.values() if c and c.mean is not None]
    return [*rows, ("All (mean over tasks)", mean_of(task_means), f"{len(task_means)}/{len(tasks)} tasks"),
            ("All (mean of group means)", mean_of(group_values), f"{len(group_values)}/{len(rows)} groups")]


def _setting_label(cell: Cell) -> str:
    sub = run_subdir(cell.setting, cell.task)
    return f"{cell.setting}/{sub}" if sub else cell.setting


def write_csv(report: Report, tasks: list[VTABTask], path: Path, n_runs: int) -> None:
    """One row per task: task, group, setting, lr/wd folder, epochs, n_runs, mean, std, run1..runN (%)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "group", "setting", "hyparam", "epochs", "n_runs", "mean", "std",
                    *(f"run{k}" for k in range(1, n_runs + 1))])
        for t in table_order(tasks):
            c = report.reported[t.name]
            if c is None:
                w.writerow([t.name, t.group, "", "", "", 0, "", "", *[""] * n_runs])
                continue
            per_seed = {r.k: f"{r.top1:.4f}" for r in c.runs if r.status in COUNTED}
            stats = [f"{c.mean:.4f}", f"{c.std:.4f}"] if c.values else ["", ""]
            w.writerow([t.name, t.group, _setting_label(c), c.hyparam or "", c.epochs, len(c.values), *stats,
                        *(per_seed.get(k, "") for k in range(1, n_runs + 1))])


def write_markdown(report: Report, tasks: list[VTABTask], path: Path, root: Path, feature: str, n_runs: int) -> None:
    """Per-task mean ± std table, then the group and overall means."""
    lines = ["# VQT on VTAB-1k", "",
             (f"Root `{root}`, feature `{feature}`. Test top-1 (%) at the last epoch, mean ± std (population) "
              f"over the seeds whose DONE status is ok (of {n_runs})."), "",
             "| Task | Group | Setting | Runs | Epochs | Top-1 (%) |", "|---|---|---|---|---|---|"]
    for t in table_order(tasks):
        c = report.reported[t.name]
        lines.append(f"| `{t.name}` | {t.group} | {_setting_label(c) if c else '–'} | "
                     f"{len(c.values) if c else 0}/{n_runs} | {c.epochs if c else ''} | "
                     f"{_pm(c.mean, c.std) if c else 'n/a'} |")
    lines += ["", "| Group | Mean top-1 (%) | With results |", "|---|---|---|"]
    for label, mean, counts in group_means(report, tasks):
        lines.append(f"| {label} | {'n/a' if mean is None else f'{mean:.2f}'} | {counts} |")
    if report.problems:
        lines += ["", "Problems:", "", *(f"- {p}" for p in report.problems)]
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: Report, tasks: list[VTABTask], path: Path, feature: str) -> None:
    """Bar chart of the per-task means (value on each bar) with std error bars, colored by group; the
    legend sits between the title and the bars, so nothing overlaps for 1 task as for 19."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = table_order(tasks)
    colors = dict(zip(GROUPS, ("tab:green", "tab:orange", "tab:blue"), strict=True))
    cells = [report.reported[t.name] for t in ordered]
    means = [c.mean if c and c.values else 0.0 for c in cells]
    stds = [c.std if c and c.values else 0.0 for c in cells]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(ordered) + 2), 5))
    x = np.arange(len(ordered))
    ax.bar(x, means, yerr=[s or np.nan for s in stds], capsize=3, color=[colors[t.group] for t in ordered])
    for i, c in enumerate(cells):  # the value above the error bar ("n/a": no result)
        label = f"{means[i]:.1f}" if c and c.values else "n/a"
        ax.text(i, means[i] + stds[i] + 1, label, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [t.short for t in ordered], rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(ordered) - 0.4)
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, max(100.0, *(m + s for m, s in zip(means, stds, strict=True))) + 8)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(f"VQT on VTAB-1k ({feature})\ntest top-1, mean ± std over seeds", fontsize=11, pad=24)
    groups = [g for g in GROUPS if any(t.group == g for t in ordered)]
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=colors[g]) for g in groups], groups, loc="lower center",
              bbox_to_anchor=(0.5, 1.0), ncol=len(groups), frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class MethodRow:
    """One setting folder (a method: VQTSup_1_adam_final, prompt-deep10_adam_final, ...) over the tasks: per-task
    mean test top-1, the group means and the plain mean, and what training used (means over its counted runs)."""

    setting: str
    cells: dict[str, Cell | None]
    usage: dict[str, float]


def method_rows(root: Path, feature: str, tasks: list[VTABTask], n_runs: int) -> list[MethodRow]:
    """A row for every setting folder under `root` holding final or sparsity runs of `feature`."""
    if not root.is_dir():
        raise VQTError(f"experiment root {root} does not exist: run the launchers first, or pass --root")
    rows = []
    for setting in sorted(p.name for p in root.iterdir() if p.name.endswith((PHASES["final"], PHASES["sparse"]))):
        cells = {t.name: collect_cell(root, setting, t, feature, n_runs) for t in tasks}
        counted = [r.usage for c in cells.values() if c for r in c.runs if r.status in COUNTED]
        usage = {key: float(np.mean(values)) for key in USAGE if (values := [u[key] for u in counted if key in u])}
        if any(c and c.values for c in cells.values()):
            rows.append(MethodRow(setting, cells, usage))
    if not rows:
        raise VQTError(f"{root} holds no finished final runs of feature {feature}: pass the EXP_ROOT of the launchers "
                       "as --root (nothing was written)")
    return rows


def method_columns(row: MethodRow, tasks: list[VTABTask]) -> list[str]:
    """A row's cells: per-task mean, the group means, the mean over tasks, trainable parameters (M, without the
    head) and peak training memory (GiB); "" where absent."""
    report = Report({}, row.cells, [])
    means = [f"{c.mean:.1f}" if c and c.values else "" for c in (row.cells[t.name] for t in table_order(tasks))]
    groups = [f"{m:.1f}" if m is not None else "" for _, m, _ in group_means(report, tasks)[:-1]]
    u = row.usage
    params = f"{u['trainable_params_without_head'] / 1e6:.3f}" if "trainable_params_without_head" in u else ""
    memory = f"{u['peak_memory_bytes'] / 2 ** 30:.2f}" if "peak_memory_bytes" in u else ""
    return [*means, *groups, params, memory]


def write_methods(rows: list[MethodRow], tasks: list[VTABTask], stem: Path, feature: str) -> None:
    """The method x task table: printed, and as stem.csv / stem.md; stem.png plots mean accuracy against peak
    training memory (the paper's memory-accuracy picture, from the runs' own DONE records)."""
    groups = [label for label, _, _ in group_means(Report({}, rows[0].cells, []), tasks)[:-2]]
    header = ["method", *(t.short for t in table_order(tasks)), *groups, "mean", "params (M, no head)",
              "train memory (GiB)"]
    table = [[r.setting, *method_columns(r, tasks)] for r in rows]
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *table])
    note = "Test top-1 (%), mean over the seeds that count; the memory is each run's recorded peak (its DONE)."
    lines = [f"# Methods on VTAB-1k ({feature})", "", note, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in table)]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    _plot_methods(rows, tasks, stem.with_suffix(".png"), feature)


def _plot_methods(rows: list[MethodRow], tasks: list[VTABTask], path: Path, feature: str) -> None:
    points = {}
    for r in rows:
        means = [c.mean for c in r.cells.values() if c and c.values]
        if "peak_memory_bytes" in r.usage and means:
            points[r.setting.rsplit("_", 2)[0]] = (r.usage["peak_memory_bytes"] / 2 ** 30, float(np.mean(means)))
    plot_memory_accuracy(points, path, f"Memory and accuracy per method ({feature})", "peak training memory (GiB)",
                         f"mean test top-1 (%) over {len(tasks)} task(s)")


def plot_memory_accuracy(points: dict[str, tuple[float, float]], path: Path | str, title: str, xlabel: str,
                         ylabel: str, colors: dict[str, str] | None = None) -> None:
    """The paper's memory-accuracy picture: one labelled point (memory GiB, accuracy %) per method; `colors` by
    label (default: matplotlib's cycle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, (x, y) in points.items():
        ax.scatter([x], [y], color=(colors or {}).get(label))
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (all optional: no arguments reproduces the original script)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--root", default="h2t_vit_experiments", help="experiment root (EXP_ROOT of the launchers)")
    p.add_argument("--feature", default="sup_vitb16_imagenet1k", help="DATA.FEATURE folder to read")
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                   help="setting folders to print, e.g. VQTSup_1_adam_final")
    p.add_argument("--tasks", nargs="+", metavar="NAME", help="subset of DATA.NAMEs (default: all 19)")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="seeds expected per setting (run1..runN)")
    p.add_argument("--methods", action="store_true", help="one row per setting folder under --root (VQT and the "
                   "baselines): per-task means, group means, trainable parameters, training memory; writes "
                   "results_methods.* (csv, md, and a png of accuracy against memory)")
    p.add_argument("--out", help="folder for the result files (default: ROOT/results); a selection other than the "
                   "default table (--settings, --tasks, --feature, --runs) writes results_<selection>.* there")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the table and write the result files; 0 even when runs are missing, 2 on bad input, 1 when
    the output folder cannot be written."""
    quiet_tensorflow()
    args = parse_args(argv)
    root = Path(args.root)
    try:
        if args.runs < 1:
            raise VQTError(f"--runs must be >= 1, got {args.runs}")
        tasks = select_tasks(args.tasks)
        write = _methods_table(args, root, tasks) if args.methods else _settings_table(args, root, tasks)
    except VQTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else root / "results"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: cannot create the output folder {out} ({err.strerror}): pass a writable --out", file=sys.stderr)
        return 1
    stem = write(out)
    print(f"\nwrote {stem}.csv, {stem.name}.md, {stem.name}.png")
    return 0


def _settings_table(args: argparse.Namespace, root: Path, tasks: list[VTABTask]) -> Callable[[Path], Path]:
    """Read the selected settings; returns what prints the table and writes its files into a folder."""
    report = collect(root, args.feature, args.settings, tasks, args.runs)
    if not report.cells:
        raise VQTError(f"{root} holds none of the settings {', '.join(args.settings)} for feature "
                       f"{args.feature}: pass the EXP_ROOT of the launchers as --root (nothing was written)")

    def write(out: Path) -> Path:
        print_table(report, args.settings, tasks, args.feature)
        stem = out / output_stem(args.settings, args.tasks, args.feature, args.runs)
        write_csv(report, tasks, stem.with_suffix(".csv"), args.runs)
        write_markdown(report, tasks, stem.with_suffix(".md"), root, args.feature, args.runs)
        write_plot(report, tasks, stem.with_suffix(".png"), args.feature)
        return stem
    return write


def _methods_table(args: argparse.Namespace, root: Path, tasks: list[VTABTask]) -> Callable[[Path], Path]:
    """Read every setting under the root (--methods); returns what prints and writes the method x task table."""
    rows = method_rows(root, args.feature, tasks, args.runs)

    def write(out: Path) -> Path:
        stem = out / output_stem(["methods"], args.tasks, args.feature, args.runs)
        write_methods(rows, tasks, stem, args.feature)
        return stem
    return write


def output_stem(settings: list[str], tasks: list[str] | None, feature: str, runs: int) -> str:
    """`results` for the default table; another selection gets its own name, so it never overwrites the
    files of the full table (or of another selection): results_<settings>[_<feature>][_<n>tasks-<hash>][_<k>runs]."""
    parts = [] if list(settings) == list(DEFAULT_SETTINGS) else ["+".join(settings)]
    parts += [] if feature == parse_args([]).feature else [feature]
    if tasks is not None:
        digest = hashlib.sha1("\n".join(sorted(tasks)).encode()).hexdigest()[:6]
        parts.append(f"{len(set(tasks))}tasks-{digest}")
    parts += [] if runs == DEFAULT_RUNS else [f"{runs}runs"]
    name = "_".join(["results", *parts])
    return re.sub(r"[^A-Za-z0-9_.+=-]", "-", name)[:150]


if __name__ == "__main__":
    sys.exit(main())
