"""run_demo_exp.sh with a stub PYTHON that records every train.py call and fails for chosen tasks (the task
rows, `python -m src.data.tasks --rows`, come from the real interpreter)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


def test_one_ctrl_c_stops_the_whole_sweep(tmp_path):
    """SIGINT to the sweep's process group while the second task trains (a Python that ends on Ctrl-C
    through vqt's own `run_cli`, as train.py does): no later step starts, exit 130, and the message
    names the finished steps and how to resume."""
    ready = tmp_path / "ready"
    stub = tmp_path / "python"
    stub.write_text(f"""#!/usr/bin/env bash
[ "$1" = -m ] && exec {sys.executable} "$@"
printf '%s\\n' "$*" >> "$STUB_CALLS"
case "$*" in
    *"DATA.NAME vtab-dtd "*) exec {sys.executable} -c "import sys, time; from src.errors import run_cli; \\
sys.exit(run_cli(lambda: (open('{ready}', 'w').close(), time.sleep(60))))" ;;
esac
""")
    stub.chmod(0o755)
    env = os.environ | {"PYTHON": str(stub), "STUB_CALLS": str(tmp_path / "calls"), "EXP_ROOT": str(tmp_path / "exp")}
    p = subprocess.Popen(["bash", "run_demo_exp.sh", "3"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert ready.exists()
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 4 and "DATA.NAME vtab-dtd " in calls[-1]  # caltech101, its 2 sparsity stages, dtd
    assert "interrupted during vtab-dtd; steps finished: vtab-caltech101, vtab-caltech101.compression" in err
    assert "rerun `bash run_demo_exp.sh 3` to resume" in err and "step(s) failed" not in err


def test_launchers_help(tmp_path):
    for launcher in sorted((ROOT / "scripts" / "VQT").glob("run_*.sh")):
        p = subprocess.run(["bash", str(launcher.relative_to(ROOT)), "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=30, check=False)
        assert p.returncode == 0 and p.stderr == "", launcher
        assert f"usage: bash scripts/VQT/{launcher.name} GPUIDX DATA_NAME" in p.stdout
