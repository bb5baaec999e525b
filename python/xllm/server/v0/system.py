"""`GET /v0/system`: versions, CPU, RAM and GPUs of this machine."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from aiohttp import web

from xllm import __version__
from xllm.memory.probe import gpus, ram
from xllm.server.http import json_response


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


async def system(request: web.Request) -> web.Response:
    total, available = ram()
    body: dict[str, Any] = {
        "versions": {
            "xllm": __version__,
            "llama_cpp_python": _version("llama_cpp_python"),
            "python": platform.python_version(),
        },
        "os": {"system": platform.system(), "release": platform.release()},
        "cpu": {"model": _cpu_model(), "cores": os.cpu_count()},
        "ram": {"total_bytes": total, "available_bytes": available},
        "gpus": [g.as_dict() for g in gpus()],
    }
    return json_response(body)
