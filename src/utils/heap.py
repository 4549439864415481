"""Keep freed CPU memory in the process's heap (glibc), so that large tensors reuse it.

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

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters


@functools.cache
def retain_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it; False where glibc is not the allocator."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
