"""Which torch device a run uses (config key DEVICE), and a one-line description of it."""
from __future__ import annotations

import glob
import os

import torch

from src.errors import VQTError
from src.utils.logging import get_logger


def machine_gpu_count() -> int:
    """NVIDIA GPUs the driver reports on this machine, whatever CUDA_VISIBLE_DEVICES says (0 without a driver)."""
    return len(glob.glob("/proc/driver/nvidia/gpus/*"))


def resolve_device(name: str) -> torch.device:
    """The device for DEVICE `name`: "auto" (the first visible GPU, else the CPU), "cpu", "cuda", "cuda:N".

    "auto" stops with a VQTError when CUDA_VISIBLE_DEVICES selects GPUs that torch cannot see on a
    machine that has GPUs (a wrong GPUIDX), rather than silently training on the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if torch.backends.cuda.is_built() and visible not in ("", "-1") and machine_gpu_count():
            raise VQTError(f"CUDA_VISIBLE_DEVICES={visible} is set but no GPU is visible: wrong GPUIDX? This "
                           f"machine has {machine_gpu_count()} GPU(s) (see nvidia-smi); or use DEVICE cpu to run "
                           "on the CPU")
        why = "no GPU on this machine" if torch.backends.cuda.is_built() else "torch is a CPU-only build"
        get_logger().info(f"DEVICE auto: running on the CPU ({why})")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VQTError(f"DEVICE {name} requested but CUDA is not available; use DEVICE cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise VQTError(f"DEVICE {name}: only {torch.cuda.device_count()} GPU(s) visible; use DEVICE cuda:0 .. "
                           f"cuda:{torch.cuda.device_count() - 1} or auto")
        return device
    try:
        return torch.device(name)
    except RuntimeError:
        raise VQTError(f"DEVICE {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None


def describe_device(device: torch.device) -> str:
    """One line, e.g. "cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB)" or "cpu (2 threads)"."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
