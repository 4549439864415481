"""Memory of training: what a phase holds on its device, estimated before it starts (a lower bound, so a
phase is refused only when it cannot fit: MODEL.H2T.NUM_QUERY_TOKENS 10000 would otherwise die minutes later
of an out-of-memory traceback), and the peak a run reached, measured as it trains (`reset_peak`, `peak`)."""
from __future__ import annotations

import contextlib
import os
from collections import Counter

import torch

from src.engine.frozen import FrozenFeatures
from src.engine.runs import Recipe
from src.errors import VQTError
from src.models.vit import VisionTransformer
from src.models.vqt import QuerySpec

GIB = 2 ** 30
OPTIMIZER_STATE = {"adam": 2, "sgd": 1}  # tensors the optimizer keeps per trained tensor


def training_bytes(spec: QuerySpec, backbone: VisionTransformer, seeds: list[int], recipe: Recipe) -> dict[str, int]:
    """Lower bounds (bytes, fp32) of the trained tensors of runs `seeds` (values, gradients, optimizer
    state) and of the query path's activations saved for the backward pass of one step of the smallest
    pass the stacked engine can make (the runs that share a seed train on one batch, in one pass)."""
    d, depth, q = backbone.embed_dim, backbone.depth, spec.num_queries
    copies = 2 + OPTIMIZER_STATE.get(recipe.optimizer, 1)
    head = len(seeds) * spec.num_classes * spec.feature_dim(d, depth)
    queries = 0 if recipe.freeze_queries else len(seeds) * depth * q * d
    # what autograd saves per query token and layer (the backbone's weights frozen): the softmax's attention
    # probabilities over the frozen tokens, the GELU's input, both LayerNorms' inputs and the head's input
    per_token = depth * (backbone.arch.num_heads * backbone.num_tokens + backbone.arch.mlp_dim + 3 * d)
    members = max(Counter(seeds).values())
    path = 0 if recipe.freeze_queries else recipe.batch_size * members * q * per_token
    return {"trained tensors": 4 * copies * (head + queries), "query path": 4 * path}


def _room(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): free device memory on a GPU (with what the allocator holds unused), else
    the machine's RAM."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused, f"are free on {device}"
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "is all the RAM of this machine"


def check_training_memory(spec: QuerySpec, backbone: VisionTransformer, seeds: list[int], recipe: Recipe,
                          device: torch.device, frozen: FrozenFeatures | None = None) -> None:
    """VQTError with the figures and the knobs that lower them when training runs `seeds` cannot fit."""
    need = training_bytes(spec, backbone, seeds, recipe)
    room, what = _room(device)
    if sum(need.values()) <= room:
        return
    parts = ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in need.items())
    cache = 0
    if frozen is not None and frozen.cached and frozen.kv.device == device and device.type == "cuda":
        cache = frozen.kv.numel() * frozen.kv.element_size()
    knobs = f"lower MODEL.H2T.NUM_QUERY_TOKENS (now {spec.num_queries}) or DATA.BATCH_SIZE (now {recipe.batch_size})"
    if cache:
        knobs += f", or set ENGINE.CACHE_LOCATION cpu (the frozen-path cache holds {cache / GIB:.1f} GiB there)"
    raise VQTError(f"training {len(seeds)} run(s) at once needs at least {sum(need.values()) / GIB:.1f} GiB ({parts}) "
                   f"but {room / GIB:.1f} GiB {what}: {knobs}")


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def reset_peak() -> None:
    """Start measuring a new peak: CUDA's allocator statistics when CUDA is in use, else the process's
    resident-set high-water mark (Linux, /proc/self/clear_refs)."""
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak() -> tuple[int, str]:
    """Peak bytes since `reset_peak` and what they measure (0 where this platform cannot tell)."""
    if _cuda():
        return torch.cuda.max_memory_allocated(), "CUDA max_memory_allocated"
    return proc_status("VmHWM"), "peak resident set of the process (VmHWM)"


def proc_status(key: str) -> int:
    """A memory figure of this process from /proc/self/status (`VmRSS`, `VmHWM`) in bytes; 0 if unavailable."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) * 1024
