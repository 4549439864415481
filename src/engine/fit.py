"""The reference training loop: one `VQT` run with torch.optim, plainly written (the original algorithm).

Per epoch: shuffle the training rows with the run's seed, step through batches (cross-entropy, plus the
group lasso on the head's columns in the compress stage), then step the per-epoch warm-up + cosine
schedule and evaluate val; after the last epoch, the test split. Dropout masks come from the default
generator: `src.engine.train.train_phase` seeds it with the run's seed in a forked RNG state.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from src.data.preprocess import preprocess
from src.engine.record import RunRecord, divergence
from src.engine.runs import Recipe, Run, TaskData
from src.models.vqt import VQT


def fit(model: VQT, run: Run, recipe: Recipe, data: TaskData, record: RunRecord,
        on_epoch: Callable[[int], None] | None = None) -> None:
    """Initialise `model` from the run's seed (query tokens from `run.start` if given), train it and
    record every epoch; stops early only if the loss stops being finite. `on_epoch(epoch)` is called
    as each epoch starts."""
    with recipe.numerics(data.device):
        _fit(model, run, recipe, data, record, on_epoch)


def _fit(model: VQT, run: Run, recipe: Recipe, data: TaskData, record: RunRecord,
         on_epoch: Callable[[int], None] | None) -> None:
    model.reset_parameters(torch.Generator().manual_seed(run.seed))
    if run.start is not None:
        model.load_trained_state(run.start)
    model.to(data.device)
    for p in (model.query_tokens, model.combine):
        if p is not None:
            p.requires_grad_(not recipe.freeze_queries)
    bias = model.head.last_layer.bias
    decayed = [p for p in model.parameters() if p.requires_grad and p is not bias]
    groups = [{"params": decayed, "weight_decay": run.wd}, {"params": [bias], "weight_decay": 0.0}]
    if recipe.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=run.lr)
    else:
        opt = torch.optim.SGD(groups, lr=run.lr, momentum=recipe.momentum)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, recipe.lr_factor)
    record.trainable({n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad})

    shuffle = torch.Generator().manual_seed(run.seed)
    steps, bs = recipe.steps(len(data.train_rows)), recipe.batch_size
    for epoch in tqdm(range(recipe.epochs), desc=f"{record.label}: epoch", unit="epoch", leave=False):
        if on_epoch is not None:
            on_epoch(epoch)
        lr = opt.param_groups[0]["lr"]
        record.epoch_start(epoch, recipe.epochs, lr)
        model.train()
        order = data.train_rows[torch.randperm(len(data.train_rows), generator=shuffle)]
        total = 0.0
        for step in range(steps):
            x, y = data.tensors(order[step * bs:(step + 1) * bs])
            loss = F.cross_entropy(model(x).float(), y)
            if recipe.lrp_coef > 0:
                loss = loss + recipe.lrp_coef * model.head.last_layer.weight.norm(dim=0).sum()
            if why := divergence(loss.item(), epoch, step):
                record.diverge(why)
                return
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            if (step + 1) % recipe.log_every == 0:
                record.step(step, steps, loss.item())
        schedule.step()
        e = recipe.eval_batch_size
        val = (data.tensors(data.val_rows[i:i + e]) for i in range(0, len(data.val_rows), e))
        record.epoch_end(epoch, recipe.epochs, total / steps, lr, *evaluate(model, val))
    if data.test is not None:
        test = data.test()
        batches = ((preprocess(images, data.size, data.device), labels) for images, labels in
                   tqdm(test.batches, desc=f"{record.label}: test batch", total=-(-test.size // recipe.eval_batch_size),
                        leave=False))
        record.test(*evaluate(model, batches))


@torch.no_grad()
def evaluate(model: VQT, batches) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and targets (N,) over (images, labels) batches, in eval mode."""
    model.eval()
    logits, targets = [], []
    for x, y in batches:
        logits.append(model(x).float().cpu())
        targets.append(np.asarray(y.cpu() if torch.is_tensor(y) else y))
    return torch.cat(logits).numpy(), np.concatenate(targets).astype(np.int64)
