"""Per-epoch learning-rate factors (the schedule steps once per epoch, after the epoch's updates)."""
from __future__ import annotations

import math


def lr_factor(epoch: int, warmup: int, total: int, scheduler: str = "cosine") -> float:
    """Factor of BASE_LR used during 0-based `epoch`: linear warm-up from 0, then half-cosine.

    Epoch 0 trains with lr 0 (as the original's LambdaLR does); with `scheduler="constant"` 1.0."""
    if scheduler == "constant":
        return 1.0
    if epoch < warmup:
        return epoch / max(1, warmup)
    progress = (epoch - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
