"""Training of stacked VQT members on frozen-path outputs.

Every member is one run of the original protocol (its own lr, weight decay, seed and run folder).
Members that share a seed share the batch order (as the original's seeded runs would), so one
frozen-path batch serves them all; seed groups of equal size (the 5 final seeds) train in one pass
on their stacked batches. Members never interact (the loss is a sum of per-member losses), so each
follows exactly the trajectory it would follow alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from yacs.config import CfgNode

from src.engine.frozen import FrozenFeatures, frozen_batches
from src.engine.metrics import classification_metrics
from src.models.vit import VisionTransformer
from src.models.vqt import Members
from src.solver.optim import StackedOptimizer
from src.solver.schedule import lr_factor
from src.utils.logging import RunLog, get_logger
from src.utils.rundir import RunDir, atomic_save

QUERY_KEY = "enc.transformer.encoder.query_prompt_embeddings"  # parameter names of the original's
HEAD_W, HEAD_B = "head.last_layer.weight", "head.last_layer.bias"  # checkpoints (VPT-compatible)


@dataclass
class Member:
    """One run: its folder, hyper-parameters and, for the sparsity stages, what it starts from."""

    run: RunDir
    lr: float
    wd: float
    seed: int
    queries: torch.Tensor | None = None    # query tokens to start from (L, Q, D)
    feat_ids: torch.Tensor | None = None   # selected head-input features (F',)
    results: dict = field(default_factory=dict)
    diverged: str = ""


@dataclass
class TestSet:
    """A split streamed once at the end: (number of images, iterator of uint8 batches)."""

    size: int
    batches: object


@dataclass
class Pass:
    """Members trained in one forward/backward per step: `len(shuffle_gens)` seed groups of equal size,
    each on its own batch (its seed's shuffle), stacked into one batch."""

    members: slice
    shuffle_gens: list[torch.Generator]
    drop_gens: list[torch.Generator]  # one per member, seeded with its seed


def _passes(members: list[Member], device: torch.device, max_groups: int) -> list[Pass]:
    """Consecutive seed groups (members sorted by seed) of equal size share a pass, at most `max_groups`."""
    groups = [(seed, len(list(grp))) for seed, grp in groupby(members, key=lambda m: m.seed)]
    passes, start = [], 0
    for size, run in groupby(groups, key=lambda g: g[1]):
        seeds = [seed for seed, _ in run]
        for k in range(0, len(seeds), max_groups):
            chunk = seeds[k:k + max_groups]
            passes.append(Pass(slice(start, start + size * len(chunk)), [torch.Generator().manual_seed(s) for s in chunk],
                               [torch.Generator(device=device).manual_seed(s) for s in chunk for _ in range(size)]))
            start += size * len(chunk)
    return passes


def _pass_loss(model: Members, backbone: VisionTransformer, batch: tuple, p: Pass, lrp_coef: float) -> torch.Tensor:
    """Per-member training loss (G',) of pass `p` on its stacked batch (seed group j: row block j)."""
    feat, kvs, y = batch
    n = len(p.shuffle_gens)
    logits = model(backbone, feat, kvs, p.members, p.drop_gens, n)
    m = logits.shape[1]
    ce = F.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(-1, m), reduction="none")
    ce = ce.view(n, -1, m).mean(dim=1).flatten()
    if lrp_coef > 0:
        ce = ce + lrp_coef * model.head_weight[p.members].norm(dim=1).sum(dim=1)
    return ce


def build_members(cfg: CfgNode, backbone: VisionTransformer, members: list[Member]) -> Members:
    h2t = cfg.MODEL.H2T
    ids = [m.feat_ids for m in members]
    model = Members(len(members), backbone.depth, backbone.embed_dim, backbone.arch.patch_size,
                    h2t.NUM_QUERY_TOKENS, cfg.DATA.NUMBER_CLASSES, normalize=h2t.NORMALIZE_FEATS,
                    pooling=h2t.POOLING_FEATS, weighted_sum=h2t.WEIGHTED_SUM_FEATS, dropout=h2t.DROPOUT,
                    feat_ids=torch.stack(ids) if ids[0] is not None else None)
    for g, m in enumerate(members):
        model.init_member(g, m.seed)
        if m.queries is not None:
            with torch.no_grad():
                model.query_tokens[g].copy_(m.queries)
    return model


def _member_cfg(cfg: CfgNode, m: Member, save_ckpt: bool) -> CfgNode:
    c = cfg.clone()
    c.defrost()
    c.SOLVER.BASE_LR, c.SOLVER.WEIGHT_DECAY, c.SEED, c.OUTPUT_DIR = m.lr, m.wd, m.seed, m.run.path
    c.MODEL.SAVE_CKPT = save_ckpt
    return c


@torch.no_grad()
def _logits(model: Members, backbone: VisionTransformer, batches) -> tuple[np.ndarray, np.ndarray]:
    """All members' logits (N, G, C) and the targets over an iterator of frozen-path batches."""
    out, targets = [], []
    for feat, kvs, labels in batches:
        out.append(model(backbone, feat, kvs).float().cpu())
        targets.append(np.asarray(labels.cpu() if torch.is_tensor(labels) else labels))
    return torch.cat(out).numpy(), np.concatenate(targets).astype(np.int64)


def train_members(cfg: CfgNode, backbone: VisionTransformer, frozen: FrozenFeatures, members: list[Member],
                  train_rows: torch.Tensor, val_rows: torch.Tensor, *, freeze_queries: bool = False,
                  lrp_coef: float = 0.0, test: TestSet | None = None, save_ckpt: bool = False,
                  desc: str = "train") -> list[Member]:
    """Train `members` together; write each run's eval_results.pth, logs.txt, config.yaml, optional
    checkpoint and logits (`save_ckpt`), and DONE last. Returns the members with their results."""
    logger = get_logger()
    device, name = frozen.device, cfg.DATA.NAME
    members = sorted(members, key=lambda m: m.seed)
    model = build_members(cfg, backbone, members).to(device)
    params = [model.query_tokens, model.combine, model.head_weight, model.head_bias]
    decay = [True, True, True, False]
    if freeze_queries:
        params[0] = params[1] = None
    kept = [(p, d) for p, d in zip(params, decay) if p is not None]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q, _ in kept))
    opt = StackedOptimizer([p for p, _ in kept], [d for _, d in kept], cfg.SOLVER.OPTIMIZER, cfg.SOLVER.MOMENTUM)
    base_lr = torch.tensor([m.lr for m in members], device=device)
    wd = torch.tensor([m.wd for m in members], device=device)
    active = torch.ones(len(members), dtype=torch.bool, device=device)

    bs, epochs = cfg.DATA.BATCH_SIZE, cfg.SOLVER.TOTAL_EPOCH
    passes = _passes(members, device, max(1, frozen.max_batch_rows(cfg.ENGINE.FUSED_KV_GIB) // bs))
    if frozen.embed_dropout > 0 and not frozen.cached:
        torch.manual_seed(members[0].seed)

    logs = []
    for m in members:
        m.run.start()
        m.results = {}
        with open(m.run.file("config.yaml"), "w") as f:
            f.write(_member_cfg(cfg, m, save_ckpt).dump())
        logs.append(RunLog(m.run.file("logs.txt")))
    if cfg.SOLVER.DBG_TRAINABLE:
        for p, _ in kept:
            shape = tuple(p.shape[1:])
            for log in logs:
                log(f"Trainable: {shape}, {int(np.prod(shape))}")
    writers = _tensorboard(cfg, members)

    steps = math.ceil(len(train_rows) / bs)
    if cfg.DBG:
        steps = min(steps, 20)
    val_name, test_name = f"val_{name}", f"test_{name}"
    for epoch in tqdm(range(epochs), desc=f"{desc} ({len(members)} runs)", leave=False):
        factor = lr_factor(epoch, cfg.SOLVER.WARMUP_EPOCH, epochs, cfg.SOLVER.SCHEDULER)
        lr = base_lr * factor
        for m, log in zip(members, logs):
            log(f"Training {epoch + 1} / {epochs} epoch, with learning rate {m.lr * factor}")
        perms = [[torch.randperm(len(train_rows), generator=gen) for gen in p.shuffle_gens] for p in passes]
        loss_sum = torch.zeros(len(members), device=device)
        for step in range(steps):
            opt.zero_grad()
            losses = []
            for p, pass_perms in zip(passes, perms):  # backward per pass: its batch buffer is then free
                rows = torch.cat([train_rows[perm[step * bs:(step + 1) * bs]] for perm in pass_perms])
                ce = _pass_loss(model, backbone, frozen.batch(rows, train=True), p, lrp_coef)
                torch.where(active[p.members] & torch.isfinite(ce), ce, 0.0).sum().backward()
                losses.append(ce.detach())
            loss = torch.cat(losses)
            bad = active & ~torch.isfinite(loss)
            if bad.any():
                for g in bad.nonzero().flatten().tolist():
                    members[g].diverged = f"loss is {loss[g].item()} at epoch {epoch + 1}, step {step + 1}"
                    logs[g](f"Encountered infinite or NaN loss, stopping this run: {members[g].diverged}")
                    logger.warning(f"run {members[g].run.path} diverged: {members[g].diverged}")
                active &= ~bad
            if not active.any():
                break
            opt.step(lr, wd, active)
            loss_sum += loss.nan_to_num()
            if (step + 1) % cfg.SOLVER.LOG_EVERY_N == 0:
                for g, log in enumerate(logs):
                    log(f"\tTraining {step + 1}/{steps}. train loss: {loss[g].item():.4f}")
        if not active.any():
            break
        val = _logits(model, backbone, (frozen.batch(val_rows[i:i + cfg.ENGINE.EVAL_BATCH_SIZE], train=False)
                                        for i in range(0, len(val_rows), cfg.ENGINE.EVAL_BATCH_SIZE)))
        for g, (m, log) in enumerate(zip(members, logs)):
            if not active[g]:
                continue
            metrics = classification_metrics(val[0][:, g], val[1])
            m.results[f"epoch_{epoch}"] = {"classification": {val_name: metrics}}
            log(f"Epoch {epoch + 1} / {epochs}: avg train loss: {loss_sum[g].item() / steps:.4f}")
            log(f"Classification results with {val_name}: " + _fmt(metrics))
            if writers:
                writers[g].add_scalar("train/loss", loss_sum[g].item() / steps, epoch)
                writers[g].add_scalar("train/lr", m.lr * factor, epoch)
                writers[g].add_scalar("val/top1", metrics["top1"], epoch)

    last = f"epoch_{epochs - 1}"
    if test is not None and active.any():
        batches = frozen_batches(backbone, tqdm(test.batches, desc=f"test ({test.size} images)",
                                                total=math.ceil(test.size / cfg.ENGINE.EVAL_BATCH_SIZE),
                                                leave=False), cfg.DATA.CROPSIZE, device)
        test_logits, test_targets = _logits(model, backbone, batches)
        for g, (m, log) in enumerate(zip(members, logs)):
            if active[g]:
                metrics = classification_metrics(test_logits[:, g], test_targets)
                m.results[last]["classification"][test_name] = metrics
                log(f"Classification results with {test_name}: " + _fmt(metrics))
                if save_ckpt:
                    atomic_save({"targets": torch.from_numpy(test_targets),
                                 "joint_logits": torch.from_numpy(test_logits[:, g].copy())},
                                m.run.file(f"{test_name}_logits.pth"))

    for g, (m, log) in enumerate(zip(members, logs)):
        atomic_save(m.results, m.run.file("eval_results.pth"))
        if active[g] and save_ckpt:
            atomic_save({"targets": torch.from_numpy(val[1]), "joint_logits": torch.from_numpy(val[0][:, g].copy())},
                        m.run.file(f"{val_name}_logits.pth"))
            atomic_save(checkpoint(model, g), m.run.file("last_model.pth"))
        if writers:
            writers[g].close()
        log.close()
        m.run.finish("ok" if active[g] else "diverged", m.diverged, len(m.results))
    return members


def checkpoint(model: Members, g: int) -> dict:
    """Member g's trainable tensors under the original's parameter names (no frozen backbone)."""
    state = {HEAD_W: model.head_weight[g].detach().cpu(), HEAD_B: model.head_bias[g].detach().cpu()}
    if model.query_tokens is not None:
        state[QUERY_KEY] = model.query_tokens[g].detach().cpu()
    if model.combine is not None:
        state["enc.combine_params"] = model.combine[g].detach().cpu()
    out = {"model": state}
    if model.feat_ids is not None:
        out["feat_ids"] = model.feat_ids[g].cpu()
    return out


def _fmt(metrics: dict[str, float]) -> str:
    return "\t".join(f"{k}: {v * 100:.2f}" for k, v in metrics.items())


def _tensorboard(cfg: CfgNode, members: list[Member]) -> list:
    if not cfg.ENGINE.TENSORBOARD:
        return []
    from torch.utils.tensorboard import SummaryWriter
    return [SummaryWriter(m.run.file("tb")) for m in members]
