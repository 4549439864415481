"""Frozen-path outputs (final feature + per-layer keys/values) of an image set for the stacked engine,
either cached once or recomputed by the backbone for every batch (the only exact way when the
embedding dropout is on during training)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from src.data.loader import ImageSet
from src.data.preprocess import preprocess
from src.engine.members import dropout_mask
from src.errors import VQTError
from src.models.vit import KV, VisionTransformer
from src.utils.layout import pid_alive
from src.utils.logging import get_logger

_CACHE_FILE = re.compile(r"vqt_cache_([A-Za-z0-9-]+)_(\d+)_[a-z0-9_]+\.bin")  # vqt_cache_<host>_<pid>_<random>.bin
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _available_ram() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def remove_stale_caches(folder: str) -> list[str]:
    """Delete the cache files in `folder` that this host's dead processes left (SIGKILL); returns
    their paths. Files of other hosts, of live processes, or not named by us are kept."""
    removed = []
    for name in os.listdir(folder):
        m = _CACHE_FILE.fullmatch(name)
        if m and m.group(1) == _host() and not pid_alive(int(m.group(2))):
            path = os.path.join(folder, name)
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


class CacheDoesNotFit(VQTError):
    """The disk cache needs more space than its folder has; the message says what to do."""

    def __init__(self, folder: str, nbytes: int, free: int, dtype: torch.dtype, reason: str = ""):
        self.folder, self.nbytes, self.free = folder, nbytes, free
        half = ", set ENGINE.CACHE_DTYPE bfloat16 (half the size)" if dtype == torch.float32 else ""
        super().__init__(f"the frozen-path disk cache needs {nbytes / 2**30:.2f} GiB in {folder} but "
                         f"{free / 2**30:.2f} GiB are free{f' ({reason})' if reason else ''}: free space there{half}, "
                         "set ENGINE.CACHE off, or point OUTPUT_DIR at a larger disk (the cache goes to "
                         "OUTPUT_DIR_cache)")


def disk_cache(shape: tuple[int, ...], dtype: torch.dtype, folder: str) -> torch.Tensor:
    """A zero-filled tensor memory-mapped from a file in `folder`. The file is allocated in full
    first (a full disk is `CacheDoesNotFit` now, not a SIGBUS later) and unlinked once mapped, so
    the space returns to the file system when the process ends, however it ends."""
    os.makedirs(folder, exist_ok=True)
    for path in remove_stale_caches(folder):
        get_logger().info(f"removed a stale frozen-path cache of a dead process: {path}")
    numel = int(np.prod(shape))
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise CacheDoesNotFit(folder, nbytes, free, dtype)
    fd, path = tempfile.mkstemp(prefix=f"vqt_cache_{_host()}_{os.getpid()}_", suffix=".bin", dir=folder)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            raise CacheDoesNotFit(folder, nbytes, shutil.disk_usage(folder).free, dtype, e.strerror) from None
        return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
    finally:
        os.close(fd)
        os.remove(path)


def _split_kv(kv: torch.Tensor) -> list[KV]:
    """(L, 2, B, H, T, hd) -> L pairs of contiguous (B, H, T, hd)."""
    return [(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])]


@torch.no_grad()
def frozen_batches(backbone: VisionTransformer, batches: Iterator[tuple[list[np.ndarray], np.ndarray]],
                   size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, list[KV], np.ndarray]]:
    """Stream uint8 image batches through the frozen backbone: (feature, keys/values, labels)."""
    for images, labels in batches:
        feat, kvs = backbone.frozen_pass(preprocess(images, size, device))
        yield feat, kvs, labels


class FrozenFeatures:
    """Frozen-path outputs of `images`, indexed by row. `cache=True` runs the backbone once and keeps
    the results (on the device, in RAM, or in a disk memmap); otherwise every `batch` call runs it.
    The cache is laid out (layer, key|value, row, head, token, head_dim), so that a gathered batch
    holds every layer's keys and values as contiguous blocks."""

    def __init__(self, backbone: VisionTransformer, images: ImageSet, size: int, device: torch.device, *,
                 cache: bool, dtype: str = "float32", location: str = "auto", batch_size: int = 128,
                 scratch_dir: str | None = None, pin_memory: bool = False):
        self.backbone, self.images, self.size, self.device = backbone, images, size, device
        self.embed_dropout = backbone.pos_drop.p
        if cache and self.embed_dropout > 0:
            raise VQTError("the frozen path is random in training (embedding dropout on): it cannot be cached; "
                           "use ENGINE.CACHE auto or off, or MODEL.H2T.EMBED_DROPOUT_IN_TRAIN False")
        self.pin = pin_memory and device.type == "cuda"
        self._copy_done = None
        self.labels = torch.as_tensor(images.labels, dtype=torch.long)
        self.cached = cache
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        if cache:
            self._build(DTYPES[dtype], location, batch_size, scratch_dir)

    def __len__(self) -> int:
        return len(self.images)

    def max_batch_rows(self, cap_gib: float) -> int:
        """Most rows one `batch` call should ask for: their fp32 keys/values within `cap_gib` GiB and
        40 % of the memory now free on the device."""
        bb = self.backbone
        row_bytes = bb.depth * 2 * bb.num_tokens * bb.embed_dim * 4
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else _available_ram()
        return max(1, int(min(cap_gib * 2 ** 30, 0.4 * free) // row_bytes))

    def _storage(self, shape: tuple[int, ...], dtype: torch.dtype, location: str, scratch_dir: str | None):
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        if location == "auto":
            if self.device.type == "cuda" and nbytes < 0.7 * torch.cuda.mem_get_info(self.device)[0]:
                location = "device"
            else:
                location = "cpu" if nbytes < 0.5 * _available_ram() else "disk"
        get_logger().info(f"frozen-path cache: {nbytes / 2**30:.2f} GiB of {dtype} on {location}")
        if location in ("device", "cpu"):
            return torch.empty(shape, dtype=dtype, device=self.device if location == "device" else "cpu")
        return disk_cache(shape, dtype, scratch_dir or tempfile.gettempdir())

    @torch.no_grad()
    def _build(self, dtype: torch.dtype, location: str, batch_size: int, scratch_dir: str | None) -> None:
        n, bb = len(self.images), self.backbone
        d, heads = bb.embed_dim, bb.arch.num_heads
        self.feat = torch.empty((n, d), dtype=torch.float32, device=self.device)
        self.kv = self._storage((bb.depth, 2, n, heads, bb.num_tokens, d // heads), dtype, location, scratch_dir)
        batches = ((self.images.images[i:i + batch_size], None) for i in range(0, n, batch_size))
        start = 0
        for feat, kvs, _ in tqdm(frozen_batches(bb, batches, self.size, self.device),
                                 desc=f"frozen pass of {n} images (cache): batch",
                                 total=-(-n // batch_size), leave=False):
            end = start + feat.shape[0]
            self.feat[start:end] = feat
            for i, pair in enumerate(kvs):
                for j, x in enumerate(pair):
                    self.kv[i, j, start:end] = x.to(self.kv.device, dtype)
            start = end

    def _buffer(self, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reused (L, 2, rows, H, T, hd) buffer: fresh allocations of this size cost more in page
        faults (CPU) than the gather itself. It is zero-filled when allocated, so that gathers write into
        touched pages (benchmarks/README.md). CPU buffers feeding a GPU are pinned with DATA.PIN_MEMORY."""
        shape = (*self.kv.shape[:2], rows, *self.kv.shape[3:])
        numel = int(np.prod(shape))
        buf = self._buffers.get((dtype, device))
        if buf is None or buf.numel() < numel:
            pin = self.pin and device.type == "cpu"
            self._buffers[(dtype, device)] = buf = torch.zeros(numel, dtype=dtype, device=device, pin_memory=pin)
        return buf[:numel].view(shape)

    @torch.no_grad()
    def batch(self, idx: torch.Tensor, rngs: list[torch.Generator] | None = None
              ) -> tuple[torch.Tensor, list[KV], torch.Tensor]:
        """Rows `idx` -> (feature (B, D), per-layer keys/values, labels), all on the device, fp32.
        Cached keys/values are gathered into a buffer that the next call overwrites: use them first.
        `rngs` (training): the embedding dropout of row block j is drawn from `rngs[j]` (uncached only)."""
        labels = self.labels[idx].to(self.device)
        if self.cached:
            if self._copy_done is not None:  # the pinned buffer is still being copied to the GPU
                self._copy_done.synchronize()
                self._copy_done = None
            kv = self._buffer(len(idx), self.kv.dtype, self.kv.device)
            # rows of a (L * 2, N, H * T * hd) view: one contiguous block each (index_select along dim 2 of
            # the 6-d cache copies element by element: benchmarks/README.md)
            flat = self.kv.view(-1, self.kv.shape[2], kv[0, 0, 0].numel())
            torch.index_select(flat, 1, idx.to(self.kv.device), out=kv.view(flat.shape[0], len(idx), -1))
            if (kv.dtype, kv.device) != (torch.float32, self.device):
                kv = self._buffer(len(idx), torch.float32, self.device).copy_(kv, non_blocking=self.pin)
                if self.pin:
                    self._copy_done = torch.cuda.Event()
                    self._copy_done.record()
            return self.feat[idx.to(self.device)], _split_kv(kv), labels
        x = preprocess([self.images.images[i] for i in idx.tolist()], self.size, self.device)
        mask = None
        if rngs and self.embed_dropout > 0:
            shape = (len(idx) // len(rngs), self.backbone.num_tokens, self.backbone.embed_dim)
            mask = torch.cat([dropout_mask(shape, self.embed_dropout, rng) for rng in rngs])
        feat, kvs = self.backbone.frozen_pass(x, mask)
        return feat, kvs, labels

    def close(self) -> None:
        """Release the cache (a disk cache's space is freed once its mapping is gone)."""
        self.kv = self.feat = None
        self._buffers.clear()
