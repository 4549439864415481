"""run_demo_exp.sh with a stub PYTHON that records every train.py call and fails for chosen tasks (the task
rows, `python -m src.data.tasks --rows`, come from the real interpreter)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from src.data.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/usr/bin/env bash
[ "$1" = -m ] && exec "$REAL_PYTHON" "$@"
printf '%s\\n' "$*" >> "$STUB_CALLS"
args=("$@")
for ((i = 0; i < $#; i++)); do [ "${args[i]}" = DATA.NAME ] && name=${args[i + 1]}; done
case " $STUB_FAIL " in
    *" $name "*) echo "loading $name" >&2; echo "error: $name: not prepared" >&2; echo "bye" >&2; exit 2 ;;
esac
"""


def _run(tmp_path: Path, *args: str, fail: str = "") -> subprocess.CompletedProcess:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = os.environ | {"PYTHON": str(stub), "STUB_CALLS": str(tmp_path / "calls"), "STUB_FAIL": fail,
                        "EXP_ROOT": str(tmp_path / "exp"), "REAL_PYTHON": sys.executable}
    return subprocess.run(["bash", "run_demo_exp.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_every_task_runs_and_failures_are_summarised(tmp_path):
    p = _run(tmp_path, "3", fail="vtab-dtd vtab-dmlab")
    assert p.returncode == 1
    calls = (tmp_path / "calls").read_text().splitlines()
    main = [c for c in calls if "--sparse-mode" not in c]
    sparse = [c for c in calls if "--sparse-mode" in c]
    assert len(main) == 19
    for t, call in zip(TASKS.values(), main):  # the table's rows, in its order
        assert f"MODEL.H2T.NUM_QUERY_TOKENS {t.q} " in call and f"DATA.NUMBER_CLASSES {t.num_classes} " in call
        assert f"DATA.NAME {t.name} " in call and f"OUTPUT_DIR {tmp_path}/exp/VQTSup_{t.q}_adam " in call
    with_sparsity = [t.name for t in TASKS.values() if t.fraction and t.name != "vtab-dtd"]
    assert [c.split("KEEP_FRAC ")[1] for c in sparse if "featselect" in c] == ["0.7"] * len(with_sparsity)
    assert len(sparse) == 2 * len(with_sparsity) == 22  # compress + featselect, not after a failed main step
    assert not any("DATA.NAME vtab-dtd " in c for c in sparse)
    summary = p.stderr.split("step(s) failed")[1].splitlines()
    assert summary[1:] == ["  vtab-dtd (exit 2): error: vtab-dtd: not prepared",
                           "  vtab-dmlab (exit 2): error: vtab-dmlab: not prepared"]
    assert (tmp_path / "exp" / "logs" / "vtab-dtd.stderr").read_text().splitlines()[-1] == "bye"


def test_all_ok_exits_zero(tmp_path):
    p = _run(tmp_path, "0")
    assert p.returncode == 0 and "all tasks finished" in p.stdout
    assert len((tmp_path / "calls").read_text().splitlines()) == 19 + 2 * 12


def test_help_and_usage(tmp_path):
    for flag in ("--help", "-h"):
        p = _run(tmp_path, flag)
        assert p.returncode == 0 and p.stdout.startswith("usage: bash run_demo_exp.sh GPUIDX")
    p = _run(tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("usage:")
    assert not (tmp_path / "calls").exists()
