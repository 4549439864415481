"""The stacked engine: many VQT runs of one phase trained at once on the frozen path's outputs.

An optimisation of `src.engine.fit.fit`, proven equal to it run by run (tests/test_grid.py). Each run
keeps its own lr, weight decay, seed and folder; runs that share a seed share the batch order (so one
frozen-path batch serves them all), and seed groups of equal size (the 5 final seeds) train in one
pass on their stacked batches. Runs never interact: the loss is a sum of per-run losses.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from src.engine.frozen import FrozenFeatures, frozen_batches
from src.engine.members import Members
from src.engine.record import RunRecord, divergence
from src.engine.runs import Recipe, Run, TaskData
from src.models.vit import VisionTransformer
from src.models.vqt import QuerySpec
from src.solver.optim import StackedOptimizer


@dataclass
class Pass:
    """Runs trained in one forward/backward per step: `len(shuffles)` seed groups of equal size, each on
    its own batch (its seed's shuffle), stacked into one batch."""

    members: slice
    shuffles: list[torch.Generator]


def passes(seeds: list[int], max_groups: int) -> list[Pass]:
    """Consecutive seed groups (`seeds` sorted) of equal size share a pass, at most `max_groups` per pass."""
    groups = [(seed, len(list(grp))) for seed, grp in groupby(seeds)]
    out, start = [], 0
    for size, run in groupby(groups, key=lambda g: g[1]):
        group_seeds = [seed for seed, _ in run]
        for k in range(0, len(group_seeds), max_groups):
            chunk = group_seeds[k:k + max_groups]
            out.append(Pass(slice(start, start + size * len(chunk)), [torch.Generator().manual_seed(s) for s in chunk]))
            start += size * len(chunk)
    return out


def fit_grid(spec: QuerySpec, frozen: FrozenFeatures, jobs: list[tuple[Run, RunRecord]], recipe: Recipe,
             data: TaskData, fused_kv_gib: float, on_epoch: Callable[[int], None] | None = None) -> list[dict | None]:
    """Train every run of `jobs` (as `fit` would, alone) and record it; returns each run's checkpoint
    (None for a diverged run) in the order of `jobs`. `on_epoch(epoch)` is called as each epoch starts."""
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0].seed)
    runs, records = [jobs[i][0] for i in order], [jobs[i][1] for i in order]
    with recipe.numerics(data.device):
        model = _members(spec, frozen.backbone, runs, data.device)
        opt = _optimizer(model, recipe, records)
        state = _Grid(model, opt, runs, records, recipe, frozen, data, fused_kv_gib)
        for epoch in tqdm(range(recipe.epochs), desc=f"{len(runs)} runs: epoch", unit="epoch", leave=False):
            if on_epoch is not None:
                on_epoch(epoch)
            if not state.epoch(epoch):
                break
        state.test()
    ckpts = [model.trained_state(g) if state.active[g] else None for g in range(len(runs))]
    return [ckpts[order.index(i)] for i in range(len(jobs))]


def _members(spec: QuerySpec, backbone: VisionTransformer, runs: list[Run], device: torch.device) -> Members:
    """The runs (sorted by seed) stacked, initialised as each alone, from `run.start` where given."""
    ids = [r.feat_ids for r in runs]
    model = Members(backbone, spec, [r.seed for r in runs], None if ids[0] is None else torch.stack(ids)).to(device)
    model.reset(device)
    for g, r in enumerate(runs):
        if r.start is not None:
            model.load_trained_state(g, r.start)
    return model


def _optimizer(model: Members, recipe: Recipe, records: list[RunRecord]) -> StackedOptimizer:
    """The stacked optimizer over the trained tensors (the head only when the recipe freezes the queries)."""
    trained = [(model.query_tokens, True), (model.combine, True), (model.head_weight, True), (model.head_bias, False)]
    if recipe.freeze_queries:
        trained = trained[2:]
    trained = [(p, decay) for p, decay in trained if p is not None]
    model.requires_grad_(False)
    for p, _ in trained:
        p.requires_grad_(True)
    for g, rec in enumerate(records):
        rec.trainable({name: tuple(t.shape) for name, t in model.named_trained(g).items() if t.requires_grad})
    return StackedOptimizer([p for p, _ in trained], [d for _, d in trained], recipe.optimizer, recipe.momentum)


class _Grid:
    """The stacked runs of one phase as they train: which are still active, an epoch, the test."""

    def __init__(self, model: Members, opt: StackedOptimizer, runs: list[Run], records: list[RunRecord],
                 recipe: Recipe, frozen: FrozenFeatures, data: TaskData, fused_kv_gib: float):
        self.model, self.opt, self.runs, self.records = model, opt, runs, records
        self.recipe, self.frozen, self.data = recipe, frozen, data
        device = data.device
        self.base_lr = torch.tensor([r.lr for r in runs], device=device)
        self.wd = torch.tensor([r.wd for r in runs], device=device)
        self.active = torch.ones(len(runs), dtype=torch.bool, device=device)
        self.passes = passes(model.seeds, max(1, frozen.max_batch_rows(fused_kv_gib) // recipe.batch_size))

    def _alive(self) -> list[int]:
        return self.active.nonzero().flatten().tolist()

    def epoch(self, epoch: int) -> bool:
        """Train one epoch and record it; False once every run has diverged."""
        recipe, data, n_train = self.recipe, self.data, len(self.data.train_rows)
        factor, steps = recipe.lr_factor(epoch), recipe.steps(n_train)
        for r, rec in zip(self.runs, self.records):
            rec.epoch_start(epoch, recipe.epochs, r.lr * factor)
        perms = [[torch.randperm(n_train, generator=gen) for gen in p.shuffles] for p in self.passes]
        loss_sum = torch.zeros(len(self.runs), device=data.device)
        for step in range(steps):
            loss = self._step(perms, step)
            for g in (self.active & ~torch.isfinite(loss)).nonzero().flatten().tolist():
                self.records[g].diverge(divergence(loss[g].item(), epoch, step))
                self.active[g] = False
            if not self.active.any():
                return False
            self.opt.step(self.base_lr * factor, self.wd, self.active)
            loss_sum += loss.nan_to_num()
            if (step + 1) % recipe.log_every == 0:
                for g in self._alive():
                    self.records[g].step(step, steps, loss[g].item())
        e, val = recipe.eval_batch_size, data.val_rows
        logits, targets = _logits(self.model, (self.frozen.batch(val[i:i + e]) for i in range(0, len(val), e)))
        for g in self._alive():
            self.records[g].epoch_end(epoch, recipe.epochs, loss_sum[g].item() / steps, self.runs[g].lr * factor,
                                      logits[:, g], targets)
        return True

    def _step(self, perms: list[list[torch.Tensor]], step: int) -> torch.Tensor:
        """Forward and backward of every pass on its batches of `step` (the optimizer not stepped yet);
        returns each run's loss (G,)."""
        model, recipe, bs = self.model, self.recipe, self.recipe.batch_size
        self.opt.zero_grad()
        losses = []
        for p, pass_perms in zip(self.passes, perms):  # backward per pass: its batch buffer is then free
            n = len(pass_perms)
            rows = torch.cat([self.data.train_rows[perm[step * bs:(step + 1) * bs]] for perm in pass_perms])
            feat, kvs, y = self.frozen.batch(rows, model.group_rngs(p.members, n))
            logits = model(feat, kvs, p.members, n, train=True).float()
            m = logits.shape[1]
            ce = F.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(-1, m), reduction="none")
            ce = ce.view(n, -1, m).mean(dim=1).flatten()
            if recipe.lrp_coef > 0:
                ce = ce + recipe.lrp_coef * model.head_weight[p.members].norm(dim=1).sum(dim=1)
            torch.where(self.active[p.members] & torch.isfinite(ce), ce, 0.0).sum().backward()
            losses.append(ce.detach())
        return torch.cat(losses)

    def test(self) -> None:
        """The test split once through the backbone for all active runs (if the phase evaluates it)."""
        if self.data.test is None or not self.active.any():
            return
        test, n = self.data.test(), len(self.runs)
        batches = tqdm(test.batches, desc=f"test ({test.size} images, all {n} runs): batch",
                       total=math.ceil(test.size / self.recipe.eval_batch_size), leave=False)
        logits, targets = _logits(self.model, frozen_batches(self.frozen.backbone, batches, self.data.size,
                                                             self.data.device))
        for g in self._alive():
            self.records[g].test(logits[:, g], targets)


@torch.no_grad()
def _logits(model: Members, batches) -> tuple[np.ndarray, np.ndarray]:
    """All members' logits (N, G, C) and the targets over an iterator of frozen-path batches."""
    out, targets = [], []
    for feat, kvs, labels in batches:
        out.append(model(feat, kvs).float().cpu())
        targets.append(np.asarray(labels.cpu() if torch.is_tensor(labels) else labels))
    return torch.cat(out).numpy(), np.concatenate(targets).astype(np.int64)
