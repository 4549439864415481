"""src/utils/device.py with torch's CUDA queries monkeypatched."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from src.errors import VQTError
from src.utils import device as dev


def _machine(monkeypatch, *, built: bool, available: bool, gpus: int, visible: str | None) -> None:
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus if available else 0)
    monkeypatch.setattr(dev, "machine_gpu_count", lambda: gpus)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def test_auto_uses_a_visible_gpu(monkeypatch):
    _machine(monkeypatch, built=True, available=True, gpus=2, visible="1")
    assert dev.resolve_device("auto") == torch.device("cuda")


def test_auto_with_a_wrong_gpuidx_is_an_error(monkeypatch):
    _machine(monkeypatch, built=True, available=False, gpus=4, visible="7")
    with pytest.raises(VQTError, match=r"^CUDA_VISIBLE_DEVICES=7 is set but no GPU is visible: wrong GPUIDX\?.*"
                                       r"4 GPU\(s\).*use DEVICE cpu to run on the CPU"):
        dev.resolve_device("auto")


@pytest.mark.parametrize(("built", "gpus", "visible"), [
    (False, 0, "0"),    # CPU-only torch build: the launchers' CUDA_VISIBLE_DEVICES=0 is harmless
    (False, 2, "0"),    # CPU-only build on a GPU machine
    (True, 0, "0"),     # CUDA build on a machine without GPUs (the demo on a laptop)
    (True, 2, "-1"),    # GPUs hidden on purpose
    (True, 2, ""),
    (True, 2, None),
])
def test_auto_falls_back_to_the_cpu(monkeypatch, caplog, built, gpus, visible):
    _machine(monkeypatch, built=built, available=False, gpus=gpus, visible=visible)
    monkeypatch.setattr(logging.getLogger("vqt"), "propagate", True)  # setup_logging turns it off
    with caplog.at_level("INFO", logger="vqt"):
        assert dev.resolve_device("auto") == torch.device("cpu")
    assert "running on the CPU" in caplog.text


def test_explicit_devices(monkeypatch):
    _machine(monkeypatch, built=True, available=False, gpus=0, visible=None)
    assert dev.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(VQTError, match="CUDA is not available; use DEVICE cpu or auto"):
        dev.resolve_device("cuda")
    with pytest.raises(VQTError, match="'gpu' is not a device"):
        dev.resolve_device("gpu")
    _machine(monkeypatch, built=True, available=True, gpus=2, visible=None)
    assert dev.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(VQTError, match=r"only 2 GPU\(s\) visible; use DEVICE cuda:0 \.\. cuda:1"):
        dev.resolve_device("cuda:2")


def test_describe_device(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert dev.describe_device(torch.device("cpu")) == "cpu (2 threads)"
    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=int(79.1 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert dev.describe_device(torch.device("cuda")) == "cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB)"
    assert dev.describe_device(torch.device("cuda:3")) == "cuda:3 (NVIDIA H100 80GB HBM3, 79.1 GiB)"
