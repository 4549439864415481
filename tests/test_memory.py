"""The memory estimate of a phase (src/engine/memory.py) against what autograd really saves."""
from __future__ import annotations

import torch

from src.configs.vit_configs import VIT_DEMO
from src.engine.members import Members
from src.engine.memory import training_bytes
from src.engine.runs import Recipe
from src.models.vit import VisionTransformer
from src.models.vqt import QuerySpec


def _saved_bytes(model: Members, feat: torch.Tensor, kvs, y: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for one training step (each storage once, parameters and the
    frozen path's inputs excluded: they exist anyway)."""
    seen = {t.untyped_storage().data_ptr() for t in [feat, *[x for kv in kvs for x in kv], *model.parameters()]}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(feat, kvs, slice(None), 1, train=True)
        torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(-1, logits.shape[1])).backward()
    return total


def test_query_path_estimate_is_a_close_lower_bound():
    torch.manual_seed(0)
    backbone = VisionTransformer(VIT_DEMO, 64).requires_grad_(False).eval()
    spec = QuerySpec(12, 10, 0.0, True, False, False, False)
    seeds = [100] * 3  # one seed group: one pass of 3 members
    model = Members(backbone, spec, seeds)
    model.reset(torch.device("cpu"))
    batch = 16
    feat, kvs = backbone.frozen_pass(torch.rand(batch, 3, 64, 64))
    saved = _saved_bytes(model, feat, kvs, torch.randint(0, 10, (batch,)))
    recipe = Recipe("adam", 0.9, 10, 1, "cosine", batch, 32, 100)
    estimate = training_bytes(spec, backbone, seeds, recipe)["query path"]
    assert 0.5 * saved <= estimate <= saved, (estimate, saved)
