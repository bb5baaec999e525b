"""What memory this machine has: RAM from /proc/meminfo, GPUs through NVML when present."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("xllm.memory")


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    driver: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ram() -> tuple[int, int]:
    """(total, available) bytes of RAM."""
    try:
        info: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


_no_library = False
"""NVML's library was not found once: not looked for again (the search cost ~5 ms, every
second, in the scheduler's memory watch)."""


def gpus() -> list[GPU]:
    """NVIDIA GPUs through NVML; an empty list when there is no driver or no GPU."""
    global _no_library
    if _no_library:
        return []
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        _no_library = True
        return []
    except pynvml.NVMLError:
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            out.append(
                GPU(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total_bytes=int(mem.total),
                    free_bytes=int(mem.free),
                    driver=driver.decode() if isinstance(driver, bytes) else str(driver),
                )
            )
        return out
    except pynvml.NVMLError as e:
        log.warning("NVML failed: %s", e)
        return []
    finally:
        pynvml.nvmlShutdown()
