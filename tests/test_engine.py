"""Engine parts: stacked optimizer vs torch.optim, schedule, the frozen path (cached, uncached, on disk) vs the
reference, metrics (training: tests/test_fit.py, grid vs reference: tests/test_grid.py)."""
from __future__ import annotations

import errno
import itertools
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from src.data.preprocess import preprocess
from src.engine import frozen as frozen_mod
from src.engine.frozen import FrozenFeatures
from src.engine.members import Members
from src.engine.metrics import classification_metrics
from src.errors import VQTError
from src.models.vqt import VQT, QuerySpec
from src.solver.optim import StackedOptimizer
from src.solver.schedule import lr_factor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_stacked_optimizer_matches_torch(kind):
    torch.manual_seed(0)
    lrs, wds = [0.1, 0.03], [0.01, 0.0]
    w = torch.randn(2, 3, 4, requires_grad=True)
    b = torch.randn(2, 3, requires_grad=True)
    ref = [(w[g].detach().clone().requires_grad_(), b[g].detach().clone().requires_grad_()) for g in range(2)]
    cls = torch.optim.Adam if kind == "adam" else lambda groups: torch.optim.SGD(groups, momentum=0.9)
    ref_opts = [cls([{"params": [rw], "lr": lrs[g], "weight_decay": wds[g]},
                     {"params": [rb], "lr": lrs[g], "weight_decay": 0.0}]) for g, (rw, rb) in enumerate(ref)]
    opt = StackedOptimizer([w, b], [True, False], kind)
    for step in range(6):
        factor = lr_factor(step, 2, 6)
        x = torch.randn(5, 4)
        opt.zero_grad()
        sum(((x @ w[g].T + b[g]) ** 2).mean() for g in range(2)).backward()
        opt.step(torch.tensor(lrs) * factor, torch.tensor(wds), torch.ones(2, dtype=torch.bool))
        for g, ((rw, rb), ro) in enumerate(zip(ref, ref_opts)):
            for group in ro.param_groups:
                group["lr"] = lrs[g] * factor
            ro.zero_grad()
            ((x @ rw.T + rb) ** 2).mean().backward()
            ro.step()
    for g, (rw, rb) in enumerate(ref):
        torch.testing.assert_close(w[g], rw, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(b[g], rb, atol=1e-6, rtol=1e-6)


def test_schedule_is_per_epoch_warmup_cosine():
    assert lr_factor(0, 10, 100) == 0.0
    assert lr_factor(1, 10, 100) == pytest.approx(0.1)
    assert lr_factor(10, 10, 100) == 1.0
    assert lr_factor(99, 10, 100) == pytest.approx(0.5 * (1 + np.cos(np.pi * 89 / 90)))


def test_cached_and_uncached_paths_agree_with_the_reference(tiny_vit, tiny_images):
    """Logits and gradients of the stack on cached and on uncached batches agree, and the logits are
    each member's own VQT's on the images."""
    idx = torch.tensor([5, 17, 3, 40, 41, 0, 59])
    outs = []
    for cache in (True, False):
        frozen = FrozenFeatures(tiny_vit, tiny_images, 32, torch.device("cpu"), cache=cache, batch_size=16)
        model = Members(tiny_vit, QuerySpec(3, 4), [7, 8])
        model.reset(torch.device("cpu"))
        feat, kvs, labels = frozen.batch(idx)
        logits = model(feat, kvs)
        torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), labels[:, None].expand(-1, 2)).backward()
        outs.append((logits.detach(), model.query_tokens.grad, model.head_weight.grad, model.head_bias.grad))
        # only query tokens and heads are trained: nothing reaches the frozen backbone
        assert all(p.grad is None and not p.requires_grad for p in tiny_vit.parameters())
        assert all(g is not None and g.abs().sum() > 0 for g in outs[-1][1:])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    x = preprocess([tiny_images.images[i] for i in idx.tolist()], 32, CPU)
    for g in range(2):
        one = VQT(tiny_vit, QuerySpec(3, 4))
        one.load_trained_state(model.trained_state(g)["model"])
        torch.testing.assert_close(outs[0][0][:, g], one(x).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_batches_hold_the_cache_rows(tiny_vit, tiny_images, dtype):
    """Batches of changing sizes (gathered into one reused buffer) hold exactly the requested rows of
    the fp32 frozen pass, rounded to the cache dtype; earlier batches are overwritten, not kept."""
    ref = FrozenFeatures(tiny_vit, tiny_images, 32, torch.device("cpu"), cache=True, batch_size=16)
    frozen = FrozenFeatures(tiny_vit, tiny_images, 32, torch.device("cpu"), cache=True, dtype=dtype, batch_size=16)
    for idx in (torch.arange(20), torch.tensor([5, 3, 59]), torch.arange(59, 30, -3)):
        feat, kvs, labels = frozen.batch(idx)
        assert torch.equal(feat, ref.feat[idx]) and torch.equal(labels, ref.labels[idx])
        for i, pair in enumerate(kvs):
            for j, x in enumerate(pair):
                assert x.dtype == torch.float32 and x.is_contiguous() and x.shape[0] == len(idx)
                assert torch.equal(x, ref.kv[i, j, idx].to(getattr(torch, dtype)).float())


def test_disk_cache_equals_memory_cache(tiny_vit, tiny_images, tmp_path):
    idx = torch.arange(0, 60, 7)
    mem = FrozenFeatures(tiny_vit, tiny_images, 32, torch.device("cpu"), cache=True, location="cpu")
    disk = FrozenFeatures(tiny_vit, tiny_images, 32, torch.device("cpu"), cache=True, location="disk",
                          scratch_dir=str(tmp_path / "cache"))
    (fa, ka, _), (fb, kb, _) = mem.batch(idx), disk.batch(idx)
    assert torch.equal(fa, fb) and all(torch.equal(x, y) for p, q in zip(ka, kb) for x, y in zip(p, q))
    disk.close()
    assert not list((tmp_path / "cache").iterdir())


def test_disk_cache_on_a_full_disk_is_one_clear_error(tiny_vit, tiny_images, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setattr(frozen_mod.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    with pytest.raises(VQTError) as info:
        FrozenFeatures(tiny_vit, tiny_images, 32, torch.device("cpu"), cache=True, location="disk",
                       scratch_dir=str(folder))
    msg = str(info.value)
    assert msg.startswith(f"the frozen-path disk cache needs 0.00 GiB in {folder} but 0.00 GiB are free")
    assert "ENGINE.CACHE_DTYPE bfloat16" in msg and "ENGINE.CACHE off" in msg and "OUTPUT_DIR" in msg
    assert list(folder.iterdir()) == []


def test_failed_allocation_is_one_clear_error(tiny_vit, tiny_images, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(frozen_mod.os, "posix_fallocate", full)
    with pytest.raises(VQTError, match=r"disk cache needs .* GiB are free \(No space left on device\): free space"):
        FrozenFeatures(tiny_vit, tiny_images, 32, torch.device("cpu"), cache=True, location="disk",
                       scratch_dir=str(tmp_path / "cache"), dtype="bfloat16")
    assert list((tmp_path / "cache").iterdir()) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_caches_of_dead_processes_are_removed(tmp_path):
    host = frozen_mod._host()
    stale = tmp_path / f"vqt_cache_{host}_{_dead_pid()}_abc_1234.bin"
    live = tmp_path / f"vqt_cache_{host}_{os.getpid()}_x1y2z3w4.bin"
    other_host = tmp_path / f"vqt_cache_{host}-elsewhere_{_dead_pid()}_abcd1234.bin"
    foreign = [tmp_path / "vqt_cache_abcd1234.bin", tmp_path / "notes.txt", tmp_path / f"{stale.name}.keep"]
    for path in [stale, live, other_host, *foreign]:
        path.write_bytes(b"x")
    assert frozen_mod.remove_stale_caches(str(tmp_path)) == [str(stale)]
    assert sorted(tmp_path.iterdir()) == sorted([live, other_host, *foreign])


_SLEEP_ON_A_DISK_CACHE = """
import sys, time
import numpy as np, torch
from src.configs.vit_configs import ViTArch
from src.data.loader import ImageSet
from src.engine import frozen as frozen_mod
from src.engine.frozen import FrozenFeatures
from src.errors import VQTError
from src.errors import run_cli
from src.models.vit import VisionTransformer

def main():
    model = VisionTransformer(ViTArch(patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_dim=64), img_size=32)
    images = ImageSet([np.zeros((32, 32, 3), np.uint8)] * 8, np.zeros(8, np.int64))
    FrozenFeatures(model.eval(), images, 32, torch.device("cpu"), cache=True, location="disk", scratch_dir=sys.argv[1])
    print("ready", flush=True)
    time.sleep(60)

sys.exit(run_cli(main))
"""


def test_sigterm_leaves_no_cache_file(tmp_path):
    folder = tmp_path / "cache"
    p = subprocess.Popen([sys.executable, "-c", _SLEEP_ON_A_DISK_CACHE, str(folder)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130 and err.splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert list(folder.iterdir()) == []


def test_max_batch_rows_follows_the_cap(tiny_vit, tiny_images):
    frozen = FrozenFeatures(tiny_vit, tiny_images, 32, torch.device("cpu"), cache=False)
    row_bytes = tiny_vit.depth * 2 * tiny_vit.num_tokens * tiny_vit.embed_dim * 4  # fp32 keys + values
    assert frozen.max_batch_rows(3.5 * row_bytes / 2 ** 30) == 3
    assert frozen.max_batch_rows(0.0) == 1


def test_metrics():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 2)).astype(np.float32)
    targets = rng.integers(0, 2, 50)
    m = classification_metrics(logits, targets)
    pairs = [(p, n) for p, n in itertools.product(np.flatnonzero(targets == 1), np.flatnonzero(targets == 0))]
    auc1 = np.mean([(logits[p, 1] > logits[n, 1]) + 0.5 * (logits[p, 1] == logits[n, 1]) for p, n in pairs])
    auc0 = np.mean([(logits[n, 0] > logits[p, 0]) + 0.5 * (logits[n, 0] == logits[p, 0]) for p, n in pairs])
    assert m["top1"] == pytest.approx(np.mean(logits.argmax(1) == targets))
    assert m["rocauc"] == pytest.approx((auc0 + auc1) / 2)
    assert classification_metrics(logits, np.zeros(50, dtype=int))["rocauc"] == -1.0
    m4 = classification_metrics(rng.standard_normal((30, 4)), rng.integers(0, 4, 30))
    assert set(m4) == {"top1", "top4"} and m4["top4"] == 1.0
