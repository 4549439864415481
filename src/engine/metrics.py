"""Single-label classification metrics, as fractions in [0, 1] (the eval_results.pth values)."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC by the rank-sum (Mann-Whitney) formula, ties averaged."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both classes")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """{"top1", "rocauc"} for 2 classes (macro AUC of one-hot targets vs logits, -1 if undefined),
    else {"top1", "top{k}"} with k = min(5, C)."""
    num_classes = logits.shape[1]
    out = {"top1": float(np.mean(logits.argmax(axis=1) == targets))}
    if num_classes == 2:
        try:
            out["rocauc"] = float(np.mean([_auc(logits[:, c], targets == c) for c in range(2)]))
        except ValueError:
            out["rocauc"] = -1.0
    else:
        k = min(5, num_classes)
        topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        out[f"top{k}"] = float(np.mean((topk == targets[:, None]).any(axis=1)))
    return out
