"""The benchmark scripts run end to end on tiny shapes (their figures are not asserted: speed is
measured by running them, see benchmarks/README.md), and their epoch accounting is right."""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_methods import METHODS, read_accuracy
from benchmarks.bench_table import PHASES, report
from benchmarks.common import Epochs

ROOT = Path(__file__).resolve().parents[1]


def test_first_epochs_are_timed_apart_from_later_ones():
    # two runs of 2 epochs: run 1 starts its epochs at 0 and 5, run 2 at 6 and 10, the last ends at 11
    starts = [(0.0, 0.0), (5.0, 10.0), (6.0, 12.0), (10.0, 20.0)]
    wall, cpu = Epochs.from_marks(starts, (11.0, 22.0), 2), Epochs.from_marks(starts, (11.0, 22.0), 2, clock=1)
    assert (wall.first, wall.later, wall.total) == (4.5, 1.0, 11.0)
    assert (cpu.first, cpu.later, cpu.total) == (9.0, 2.0, 22.0)
    assert wall.run_seconds(100) == 4.5 + 99 * 1.0


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    p = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", "--img-size", "32", "--test-size", "16",
                        "--grid", "2", "--json", str(out), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_protocol_runs(tmp_path):
    figures = _run("bench_protocol", "--parts", "protocol", tmp_path=tmp_path)["protocol"]
    assert figures["reference_s"] > 0 and figures["fast_s"] > 0
    assert {row["phase"] for row in figures["extrapolated"]} == {"search", "finals", "test", "frozen pass"}


def test_bench_table_runs(tmp_path):
    out = _run("bench_table", "--qs", "1", tmp_path=tmp_path)
    assert {(r["phase"], r["q"]) for r in out["per_q"]} == {(p, 1) for p in PHASES}
    assert "tasks" not in out  # Q=10 and Q=20 not measured: no whole table
    a, m = argparse.Namespace(**out["args"]), out["measured"]
    for q in (10, 20):  # the whole table from these figures, as if Q=10 and Q=20 had measured the same
        m["phases"].update({k.replace("/Q1", f"/Q{q}"): v for k, v in m["phases"].items()
                            if k.endswith(("search/Q1", "finals/Q1"))})
    a.qs = [1, 10, 20]
    figures = report(a, m)
    assert len(figures["tasks"]) == 19 and figures["total"]["ratio"] > 0


def test_bench_methods_runs_and_draws_memory_against_accuracy(tmp_path):
    """Every method's step on tiny shapes; the picture from a collector methods csv (rows named as the launchers
    name their settings)."""
    csv_path = tmp_path / "results_methods.csv"
    csv_path.write_text("method,dtd,mean\nVQTSup_1_adam_final,70.0,70.0\nprompt-deep10_adam_final,60.0,60.0\n"
                        "vqt1+lora_adam_final,72.0,72.0\n")
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    methods = ["vqt", "linear", "lora", "end2end"]  # a fresh process each: the others run the same code
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_methods", "--arch", "tiny", "--img-size", "32",
                        "--mem-batch", "2", "--methods", *methods, "--accuracy", str(csv_path), "--png", str(png),
                        "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    figures = json.loads(out.read_text())["methods"]
    assert list(figures) == methods and set(methods) < set(METHODS) and png.stat().st_size > 0
    assert figures["linear"]["params"] == 0 and figures["end2end"]["params"] > figures["lora"]["params"] > 0
    assert figures["vqt"]["params"] == 12 * 1 * 192  # ViT-Ti's L x Q x D query tokens
    assert read_accuracy(str(csv_path)) == {"vqt": 70.0, "prompt-deep": 60.0, "vqt+lora": 72.0}


@pytest.mark.parametrize("script", ["bench_protocol", "bench_table", "bench_cache_dtype", "bench_methods"])
def test_help_shows_the_whole_docstring(script):
    module = importlib.import_module(f"benchmarks.{script}")
    p = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert " ".join(module.__doc__.split()) in " ".join(p.stdout.split())
