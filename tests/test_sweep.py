"""The submitit sweep launcher, with a fake per-task command that records its arguments."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from src.data.tasks import GROUPS, TASKS, select_tasks
from src.engine.sweep import TaskJob, launch, task_commands
from src.errors import VQTError

ALL_TASKS = list(TASKS.values())

REPO = Path(__file__).resolve().parents[1]

# Records argv, CUDA_VISIBLE_DEVICES and start/end times; fails on request (a task name containing FAIL_ON).
FAKE = """
import json, os, sys, time, uuid
out, step, fail_on, *args = sys.argv[1:]
start = time.time()
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
rec = {"step": step, "args": args, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time()}
with open(os.path.join(out, uuid.uuid4().hex + ".json"), "w") as f:
    json.dump(rec, f)
if fail_on and fail_on in args[1] and step == "sparsity":
    print("loading...\\nboom: " + args[1], file=sys.stderr)
    sys.exit(3)
"""


def _templates(tmp_path: Path, fail_on: str = "") -> tuple[str, str]:
    script = tmp_path / "fake_task.py"
    script.write_text(FAKE)
    out = tmp_path / "markers"
    out.mkdir(exist_ok=True)
    head = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(out))}"
    fail = shlex.quote(fail_on) if fail_on else "''"
    return (f"{head} train {fail} {{gpu}} {{name}} {{classes}} {{q}} {{optimizer}} {{feature}}",
            f"{head} sparsity {fail} {{gpu}} {{name}} {{classes}} {{q}} {{optimizer}} {{feature}} {{fraction}}")


def _markers(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (tmp_path / "markers").glob("*.json")]


def _jobs(tmp_path: Path, names: list[str] | None, fail_on: str = "") -> list[TaskJob]:
    train, sparsity = _templates(tmp_path, fail_on)
    return [TaskJob(t, "feat_x", "adam", str(REPO), train, sparsity) for t in select_tasks(names)]


def test_demo_task_table():
    assert len(ALL_TASKS) == 19 and len({t.name for t in ALL_TASKS}) == 19
    assert sum(t.fraction == 0.7 for t in ALL_TASKS) == 12
    assert {t.q for t in ALL_TASKS if t.fraction is None} == {10, 20}
    assert [sum(t.group == g for t in ALL_TASKS) for g in GROUPS] == [7, 4, 8]


def test_default_commands_match_run_demo_exp():
    job = TaskJob(select_tasks(["vtab-dtd"])[0], "sup_vitb16_imagenet1k", "adam", ".")
    assert task_commands(job, "0") == [
        ["bash", "scripts/VQT/run_vqt_vtab.sh", "0", "vtab-dtd", "47", "1", "adam", "sup_vitb16_imagenet1k"],
        ["bash", "scripts/VQT/run_vqt_vtab_sparsity.sh", "0", "vtab-dtd", "47", "1", "adam",
         "sup_vitb16_imagenet1k", "0.7"]]
    kitti = TaskJob(select_tasks(['vtab-kitti(task="closest_vehicle_distance")'])[0], "f", "adam", ".")
    assert task_commands(kitti, "3") == [["bash", "scripts/VQT/run_vqt_vtab.sh", "3",
                                          'vtab-kitti(task="closest_vehicle_distance")', "4", "20", "adam", "f"]]


def test_bad_input_raises():
    with pytest.raises(VQTError, match="vtab-nope"):
        select_tasks(["vtab-nope"])
    with pytest.raises(VQTError, match="bad command template"):
        task_commands(TaskJob(ALL_TASKS[0], "f", "adam", ".", "run {gpuidx}"), "0")
    with pytest.raises(VQTError, match="--cluster"):
        launch([], "kubernetes", "unused")


def test_debug_executor_runs_every_task_once(tmp_path):
    results = launch(_jobs(tmp_path, None), "debug", tmp_path / "logs", poll_s=0.01)
    assert [r.name for r in results] == [t.name for t in ALL_TASKS] and all(r.ok for r in results)
    recs = _markers(tmp_path)
    train = sorted(tuple(r["args"][1:]) for r in recs if r["step"] == "train")
    assert train == sorted((t.name, str(t.num_classes), str(t.q), "adam", "feat_x") for t in ALL_TASKS)
    sparsity = sorted(tuple(r["args"][1:]) for r in recs if r["step"] == "sparsity")
    assert sparsity == sorted((t.name, str(t.num_classes), "1", "adam", "feat_x", "0.7")
                              for t in ALL_TASKS if t.fraction)
    for rec in recs:  # the sparsity step of a task starts after its training step
        if rec["step"] == "sparsity":
            assert any(r["step"] == "train" and r["args"][1] == rec["args"][1] and r["end"] <= rec["start"]
                       for r in recs)


def test_local_executor_distinct_gpus_and_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    monkeypatch.setenv("FAKE_SLEEP", "0.5")
    names = ["vtab-dtd", "vtab-svhn", "vtab-dmlab"]
    results = launch(_jobs(tmp_path, names, fail_on="dtd"), "local", tmp_path / "logs", timeout_min=2, poll_s=0.1)
    by_name = {r.name: r for r in results}
    assert by_name["vtab-svhn"].ok and by_name["vtab-dmlab"].ok
    bad = by_name["vtab-dtd"]
    assert not bad.ok and bad.returncode == 3 and "boom: vtab-dtd" in bad.stderr_tail
    recs = _markers(tmp_path)
    assert sorted(r["args"][1] for r in recs if r["step"] == "train") == sorted(names)
    assert all(r["cuda"] in ("4", "7") and r["args"][0] == r["cuda"] for r in recs)  # GPUIDX = the job's GPU
    # one task per GPU: runs on the same GPU never overlap, and both GPUs were used
    assert {r["cuda"] for r in recs} == {"4", "7"}
    for a in recs:
        for b in recs:
            if a is not b and a["cuda"] == b["cuda"] and a["args"][1] != b["args"][1]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"]


def test_local_cpu_runs_one_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    names = ["vtab-svhn", "vtab-dmlab"]
    results = launch(_jobs(tmp_path, names), "local", tmp_path / "logs", timeout_min=2, poll_s=0.1)
    assert all(r.ok for r in results)
    a, b = sorted(_markers(tmp_path), key=lambda r: r["start"])
    assert a["end"] <= b["start"] and a["cuda"] == b["cuda"] == ""
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert "%j" not in logs and sum(name.endswith("_0_log.err") for name in logs) == 2


def test_cli_reports_failure_with_nonzero_exit(tmp_path):
    train, sparsity = _templates(tmp_path, fail_on="caltech")
    proc = subprocess.run(
        [sys.executable, "scripts/launch_sweep.py", "--cluster", "debug", "--log-dir", str(tmp_path / "logs"),
         "--tasks", "vtab-caltech101", "vtab-svhn", "--command-template", train, "--sparsity-template", sparsity],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "[ok]     vtab-svhn" in proc.stdout
    assert "[FAILED] vtab-caltech101: exit 3 from" in proc.stdout and "| boom: vtab-caltech101" in proc.stdout
    assert "1/2 tasks succeeded" in proc.stdout


def test_killed_job_is_reported(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 0)  # do not wait 15 s for a result file
    kill_parent = f"{shlex.quote(sys.executable)} -c 'import os, signal; os.kill(os.getppid(), signal.SIGKILL)'"
    job = TaskJob(select_tasks(["vtab-svhn"])[0], "f", "adam", str(REPO), kill_parent)
    [result] = launch([job], "local", tmp_path / "logs", timeout_min=2, poll_s=0.1)
    assert not result.ok and result.returncode is None and "has not produced any output" in result.message
