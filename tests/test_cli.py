"""Every entry point: --help is fast and documents every option; the demo writer's console is quiet."""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.utils.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train.py", "collect_demo_exp_results.py", *sorted(f"scripts/{p.name}" for p in (ROOT / "scripts").glob("*.py"))]


def test_all_scripts_are_listed():
    assert len(SCRIPTS) == 6


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
