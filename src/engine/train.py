"""One training entry for a phase's runs: `train_phase` trains them on the stacked engine or on the
reference loop, as its `Engine` says, and finishes their records. The protocol, the benchmarks and the
tests all train through it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from src.engine.fit import fit
from src.engine.frozen import FrozenFeatures
from src.engine.grid import fit_grid
from src.engine.record import RunRecord
from src.engine.runs import Recipe, Run, TaskData
from src.models.petl import VQT_METHOD, Method
from src.models.vit import VisionTransformer
from src.models.vqt import VQT, QuerySpec
from src.utils.heap import retain_freed_memory


@dataclass(frozen=True)
class Engine:
    """Where a phase's runs train: the stacked engine on `frozen`'s outputs (`grid`), or the reference
    loop, one `VQT` on `backbone` (adapted by `method`) at a time. `fused_kv_gib` caps the keys/values of one
    stacked batch (ENGINE.FUSED_KV_GIB)."""

    spec: QuerySpec
    backbone: VisionTransformer
    frozen: FrozenFeatures | None = None
    fused_kv_gib: float = 10.0
    method: Method = VQT_METHOD

    @property
    def grid(self) -> bool:
        return self.frozen is not None

    @classmethod
    def stacked(cls, spec: QuerySpec, frozen: FrozenFeatures, fused_kv_gib: float = 10.0) -> Engine:
        return cls(spec, frozen.backbone, frozen, fused_kv_gib)

    @classmethod
    def reference(cls, spec: QuerySpec, backbone: VisionTransformer, method: Method = VQT_METHOD) -> Engine:
        return cls(spec, backbone, method=method)


def train_phase(jobs: list[tuple[Run, RunRecord]], recipe: Recipe, data: TaskData, engine: Engine,
                on_epoch: Callable[[int], None] | None = None) -> None:
    """Train every run of `jobs` and finish its record (DONE last). `on_epoch(epoch)` is called as each
    epoch starts: once per epoch of the stacked phase, or of each run in turn on the reference loop."""
    if data.device.type == "cpu":
        retain_freed_memory()
    if engine.grid:
        ckpts = fit_grid(engine.spec, engine.frozen, jobs, recipe, data, engine.fused_kv_gib, on_epoch)
        for (_, record), ckpt in zip(jobs, ckpts):
            record.finish(ckpt)
        return
    for run, record in jobs:
        model = VQT(engine.backbone, engine.spec, run.feat_ids, engine.method)
        with torch.random.fork_rng(devices=[data.device] if data.device.type == "cuda" else []):
            torch.manual_seed(run.seed)  # the dropout masks' stream (the caller's RNG state is untouched)
            fit(model, run, recipe, data, record, on_epoch)
        record.finish(model.trained_state())
