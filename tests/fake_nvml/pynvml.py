"""A stand-in for NVML's Python binding with two GPUs: put this folder first on PYTHONPATH
of an `xllm serve` and its probe (xllm.memory.probe.gpus) sees them."""

from __future__ import annotations

from types import SimpleNamespace

GPUS = [("NVIDIA GeForce RTX 4090", 24564, 2048), ("NVIDIA RTX A4000", 16376, 1024)]
"""(name, total MiB, used MiB)."""
MiB = 1024 * 1024


class NVMLError(Exception):
    pass


def nvmlInit() -> None:
    pass


def nvmlShutdown() -> None:
    pass


def nvmlSystemGetDriverVersion() -> str:
    return "550.54.14"


def nvmlDeviceGetCount() -> int:
    return len(GPUS)


def nvmlDeviceGetHandleByIndex(i: int) -> int:
    return i


def nvmlDeviceGetName(handle: int) -> str:
    return GPUS[handle][0]


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    _, total, used = GPUS[handle]
    return SimpleNamespace(total=total * MiB, used=used * MiB, free=(total - used) * MiB)
