"""Shared argparse help layout of the entry points."""
from __future__ import annotations

import argparse
import os

from src.errors import VQTError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends "(default: X)" to every option that has a
    default worth showing (not None, False or "") unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default in (None, False, "", argparse.SUPPRESS)
                or "default" in text.lower()):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def check_can_create(path: str, what: str) -> None:
    """VQTError unless `path` can be created: its nearest existing parent is a folder this process can write.
    `what` names the option or key that gave the path."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise VQTError(f"{what} {path}: {folder} is a file, not a folder: choose another {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VQTError(f"{what} {path}: cannot write in {folder} (permission denied): choose a folder you can write")


def check_out_file(path: str, what: str) -> None:
    """VQTError unless the file `path` can be written (checked before the work that produces it)."""
    if os.path.isdir(path):
        raise VQTError(f"{what} {path} is a folder: give a file name (e.g. {os.path.join(path, 'preds.csv')})")
    check_can_create(path, what)
