"""The stacked engine: many VQT runs of one phase trained at once on the frozen path's outputs.

An optimisation of `src.engine.fit.fit`, proven equal to it run by run (tests/test_grid.py). Each run
keeps its own lr, weight decay, seed and folder; runs that share a seed share the batch order (so one
frozen-path batch serves them all), and seed groups of equal size (the 5 final seeds) train in one
pass on their stacked batches. Runs never interact: the loss is a sum of per-run losses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from src.engine.frozen import FrozenFeatures, frozen_batches
from src.engine.record import RunRecord, divergence
from src.engine.runs import Recipe, Run, TaskData
from src.models.vqt import Members, QuerySpec
from src.solver.optim import StackedOptimizer
from src.utils.heap import retain_freed_memory


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
             data: TaskData, fused_kv_gib: float) -> list[dict | None]:
    """Train every run of `jobs` (as `fit` would, alone) and record it; returns each run's checkpoint
    (None for a diverged run) in the order of `jobs`."""
    with recipe.numerics(data.device):
        return _fit_grid(spec, frozen, jobs, recipe, data, fused_kv_gib)


def _fit_grid(spec: QuerySpec, frozen: FrozenFeatures, jobs: list[tuple[Run, RunRecord]], recipe: Recipe,
              data: TaskData, fused_kv_gib: float) -> list[dict | None]:
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0].seed)
    runs, records = [jobs[i][0] for i in order], [jobs[i][1] for i in order]
    device, bb = data.device, frozen.backbone
    if device.type == "cpu":
        retain_freed_memory()
    ids = [r.feat_ids for r in runs]
    model = Members(bb, spec, [r.seed for r in runs], None if ids[0] is None else torch.stack(ids)).to(device)
    model.reset(device)
    for g, r in enumerate(runs):
        if r.start is not None:
            model.load_trained_state(g, r.start)
    trained = [(model.query_tokens, True), (model.combine, True), (model.head_weight, True), (model.head_bias, False)]
    if recipe.freeze_queries:
        trained = trained[2:]
    trained = [(p, decay) for p, decay in trained if p is not None]
    model.requires_grad_(False)
    for p, _ in trained:
        p.requires_grad_(True)
    opt = StackedOptimizer([p for p, _ in trained], [d for _, d in trained], recipe.optimizer, recipe.momentum)
    base_lr = torch.tensor([r.lr for r in runs], device=device)
    wd = torch.tensor([r.wd for r in runs], device=device)
    active = torch.ones(len(runs), dtype=torch.bool, device=device)
    for g, rec in enumerate(records):
        rec.trainable({name: tuple(t.shape) for name, t in model.named_trained(g).items() if t.requires_grad})

    bs, n_train = recipe.batch_size, len(data.train_rows)
    steps = recipe.steps(n_train)
    groups = passes(model.seeds, max(1, frozen.max_batch_rows(fused_kv_gib) // bs))
    for epoch in tqdm(range(recipe.epochs), desc=f"{len(runs)} runs: epoch", unit="epoch", leave=False):
        factor = recipe.lr_factor(epoch)
        for r, rec in zip(runs, records):
            rec.epoch_start(epoch, recipe.epochs, r.lr * factor)
        perms = [[torch.randperm(n_train, generator=gen) for gen in p.shuffles] for p in groups]
        loss_sum = torch.zeros(len(runs), device=device)
        for step in range(steps):
            opt.zero_grad()
            losses = []
            for p, pass_perms in zip(groups, perms):  # backward per pass: its batch buffer is then free
                n = len(pass_perms)
                rows = torch.cat([data.train_rows[perm[step * bs:(step + 1) * bs]] for perm in pass_perms])
                feat, kvs, y = frozen.batch(rows, model.group_rngs(p.members, n))
                logits = model(feat, kvs, p.members, n, train=True).float()
                m = logits.shape[1]
                ce = F.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(-1, m), reduction="none")
                ce = ce.view(n, -1, m).mean(dim=1).flatten()
                if recipe.lrp_coef > 0:
                    ce = ce + recipe.lrp_coef * model.head_weight[p.members].norm(dim=1).sum(dim=1)
                torch.where(active[p.members] & torch.isfinite(ce), ce, 0.0).sum().backward()
                losses.append(ce.detach())
            loss = torch.cat(losses)
            for g in (active & ~torch.isfinite(loss)).nonzero().flatten().tolist():
                records[g].diverge(divergence(loss[g].item(), epoch, step))
                active[g] = False
            if not active.any():
                break
            opt.step(base_lr * factor, wd, active)
            loss_sum += loss.nan_to_num()
            if (step + 1) % recipe.log_every == 0:
                for g in active.nonzero().flatten().tolist():
                    records[g].step(step, steps, loss[g].item())
        if not active.any():
            break
        e = recipe.eval_batch_size
        val_logits, val_targets = _logits(model, (frozen.batch(data.val_rows[i:i + e]) for i in range(0, len(data.val_rows), e)))
        for g in active.nonzero().flatten().tolist():
            records[g].epoch_end(epoch, recipe.epochs, loss_sum[g].item() / steps, runs[g].lr * factor,
                                 val_logits[:, g], val_targets)

    if data.test is not None and active.any():
        test = data.test()
        batches = tqdm(test.batches, desc=f"test ({test.size} images, all {len(runs)} runs): batch", total=math.ceil(test.size / recipe.eval_batch_size),
                       leave=False)
        logits, targets = _logits(model, frozen_batches(bb, batches, data.size, device))
        for g in active.nonzero().flatten().tolist():
            records[g].test(logits[:, g], targets)
    ckpts = [model.trained_state(g) if active[g] else None for g in range(len(runs))]
    return [ckpts[order.index(i)] for i in range(len(jobs))]


@torch.no_grad()
def _logits(model: Members, batches) -> tuple[np.ndarray, np.ndarray]:
    """All members' logits (N, G, C) and the targets over an iterator of frozen-path batches."""
    out, targets = [], []
    for feat, kvs, labels in batches:
        out.append(model(feat, kvs).float().cpu())
        targets.append(np.asarray(labels.cpu() if torch.is_tensor(labels) else labels))
    return torch.cat(out).numpy(), np.concatenate(targets).astype(np.int64)
