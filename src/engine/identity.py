"""A run's identity: every setting that changes its numbers, the backbone's weights and the task's data.

A finished run is reused only when the identity recorded in its DONE equals the one requested.
Settings that do not change a run's numbers (paths, device, logging, how the engine runs) stay out.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os

from yacs.config import CfgNode

from src.configs.defaults import TAGS

# Keys outside the settings: tagged where defined (src/configs/defaults.py), as never changing a run's
# numbers or as entering per run (the lr, weight decay and seed are added by `run_identity`).
NOT_SETTINGS = frozenset(TAGS)


def _flat(node: CfgNode, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@functools.cache
def file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file (cached per path, size and modification time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(path: str) -> str:
    st = os.stat(path)
    return file_digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def task_settings(cfg: CfgNode, weights: str, data: str) -> dict[str, str]:
    """The settings every run of a task shares: config keys that change numbers, weights and data identity."""
    out = {k: repr(v) for k, v in _flat(cfg).items() if k not in NOT_SETTINGS}
    return out | {"weights": digest(weights), "data": data}


def run_identity(settings: dict[str, str], lr: float, wd: float, seed: int, parent: str = "") -> dict:
    """What a run's DONE records: {"identity": hash, "settings": the settings it hashes}."""
    full = settings | {"lr": repr(float(lr)), "wd": repr(float(wd)), "seed": repr(seed), "parent": parent}
    return {"identity": hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16], "settings": full}


def differences(recorded: dict, wanted: dict) -> list[str]:
    """Settings whose values differ, as "KEY old -> new"."""
    old = recorded.get("settings") or {}
    new = wanted["settings"]
    if not old:
        return ["(no identity recorded)"]
    return [f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]
