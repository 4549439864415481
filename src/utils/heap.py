"""The glibc allocator settings (`mallopt`), all in one place: training keeps freed CPU memory in the
process's heap, so that large tensors reuse it; the memory benchmark makes the resident set follow the
live tensors instead.

glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it when freed: each
training step's large activations are then page-faulted (and zeroed by the kernel) again (measured
in benchmarks/README.md). Serving them from the heap and never trimming it removes that cost; the
peak resident memory stays what it was, but it is not returned to the OS until the process ends.
`src.engine.train.train_phase` sets it for CPU training.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply (parameter, value) pairs; False where glibc is not the allocator or one was refused."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(bool(mallopt(param, value)) for param, value in settings)


@functools.cache
def retain_freed_memory() -> bool:
    """Training: serve every allocation from the heap and never trim it."""
    return _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))


def follow_live_memory() -> bool:
    """Measuring peak memory (benchmarks, a fresh process): every allocation above 1 MiB gets its own mmap,
    unmapped when freed, so that the resident set follows the live tensors (glibc's adaptive threshold
    would keep freed blocks resident; the heap kept by `retain_freed_memory` adds its fragmentation:
    ViT-Ti shapes, batch 128, VQT step 0.96 GiB vs 0.74 GiB, VPT-deep 3.42 vs 3.00)."""
    return _mallopt((M_MMAP_THRESHOLD, 2 ** 20))
