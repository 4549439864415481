"""Every entry point: --help is fast and documents every option; the demo writer's console is quiet."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.utils.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([p.name for p in ROOT.glob("*.py")] + [f"scripts/{p.name}" for p in (ROOT / "scripts").glob("*.py")])


def test_all_scripts_are_listed():
    assert {"train.py", "collect_demo_exp_results.py", "predict.py", "scripts/export.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_fast(script):
    start = time.monotonic()
    p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       check=False)
    elapsed = time.monotonic() - start
    assert p.returncode == 0 and p.stdout.startswith("usage:") and p.stderr == ""
    assert elapsed < 3, f"{script} --help took {elapsed:.1f} s (target: < 1 s; import torch/TF after parsing)"


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help(script, monkeypatch):
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    spec = importlib.util.spec_from_file_location(f"cli_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    with pytest.raises(_Parsed):
        module.main([])
    [parser] = parsers
    assert parser.formatter_class is HelpFormatter  # defaults shown
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{script}: {action.dest} has no help text"


def test_help_shows_defaults():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--a", default="x", help="an option")
    parser.add_argument("--b", nargs="+", default=["p", "q"], help="a list")
    parser.add_argument("--c", default=None, help="no default")
    parser.add_argument("--d", action="store_true", help="a flag")
    parser.add_argument("--e", default=3, help="explained (default: three)")
    text = " ".join(parser.format_help().split())
    assert "an option (default: x)" in text and "a list (default: p q)" in text
    assert "no default --d" in text and "a flag" in text and "explained (default: three)" in text


def test_demo_writer_is_quiet(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    p = subprocess.run([sys.executable, "scripts/make_demo_assets.py", "--dest", str(tmp_path), "--tasks",
                        "vtab-eurosat"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    for noise in ("Downloading and preparing", "Shuffling", "downloaded and prepared", "Generating", "oneDNN",
                  "absl::InitializeLog", "cpu_feature_guard"):
        assert noise not in p.stdout + p.stderr
    assert [line.split(":")[0] for line in p.stdout.splitlines()] == ["demo backbone", "demo data"]
    assert p.stderr == ""


YAML = str(ROOT / "configs/h2t-prompt/vtab.yaml")  # sets SOLVER.OPTIMIZER sgd


@pytest.fixture
def protocol_calls(monkeypatch):
    """train.py's run_protocol replaced by a recorder of the config it gets."""
    import src.engine.protocol

    calls = []
    monkeypatch.setattr(src.engine.protocol, "run_protocol", lambda cfg, **kw: calls.append((cfg, kw)))
    return calls


def test_train_optimizer_sets_solver_optimizer(protocol_calls, capsys):
    import train

    assert train.main(["--config-file", YAML, "--optimizer", "adam", "DATA.NAME", "vtab-dtd"]) == 0
    assert train.main(["--config-file", YAML, "--optimizer", "adam", "SOLVER.OPTIMIZER", "adam"]) == 0
    assert train.main(["--config-file", YAML, "--sparse-mode", "compress"]) == 0
    assert [cfg.SOLVER.OPTIMIZER for cfg, _ in protocol_calls] == ["adam", "adam", "sgd"]
    assert protocol_calls[0][0].DATA.NAME == "vtab-dtd" and protocol_calls[2][1]["sparse_mode"] == "compress"
    assert train.main(["--config-file", YAML, "--optimizer", "adam", "SOLVER.OPTIMIZER", "sgd"]) == 2
    assert capsys.readouterr().err == ("error: --optimizer adam but the overrides set SOLVER.OPTIMIZER sgd: "
                                       "drop one of them\n")


@pytest.mark.parametrize("argv, flag", [
    (["DATA.NAME", "vtab-dtd", "--dont_search"], "--dont_search"),
    (["DATA.NAME", "vtab-dtd", "--sparse-mode", "compress"], "--sparse-mode"),
    (["DATA.NAME", "vtab-dtd", "--optimizer=adam", "SOLVER.TOTAL_EPOCH", "2"], "--optimizer"),
])
def test_train_flag_after_overrides(protocol_calls, capsys, argv, flag):
    import train

    assert train.main(["--config-file", YAML, *argv]) == 2
    assert capsys.readouterr().err == f"error: option {flag} must come before the KEY VALUE overrides\n"
    assert protocol_calls == []


def test_train_sparse_mode_choices(capsys):
    import train

    with pytest.raises(SystemExit) as e:
        train.parse_args(["--sparse-mode", ""])
    assert e.value.code == 2 and "invalid choice: ''" in capsys.readouterr().err
    assert train.parse_args([]).sparse_mode is None


@pytest.mark.parametrize("bench", sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py")))
def test_benchmark_help_is_whole(bench, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module(bench[:-3])
    monkeypatch.setattr(sys, "argv", [bench, "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    last = module.__doc__.strip().splitlines()[-1]
    assert done.value.code == 0 and last in capsys.readouterr().out
