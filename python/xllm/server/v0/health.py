"""`GET /v0/health`: liveness, loading progress and loaded models (HTTP 200 while loading)."""

from __future__ import annotations

import time

from aiohttp import web

from xllm.memory.probe import gpus
from xllm.server.http import json_response
from xllm.server.state import REGISTRY


async def health(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    loading = registry.loading()
    now = time.time()
    return json_response(
        {
            "status": "loading" if loading else "ok",
            "loading": [{"model": s.name, "elapsed_s": round(now - s.started, 3)} for s in loading],
            "models": [
                {
                    "name": m.name,
                    "instance": key,
                    "engine": m.kind,
                    "path": str(m.info.path),
                    "size": m.info.size,
                    "context_length": m.ctx_size,
                    "runner_pid": m.pid,
                    "ram_bytes": m.plan.ram if m.plan else None,
                    "vram_bytes": m.plan.vram if m.plan else 0,
                    "gpu_layers": m.plan.gpu_layers if m.plan else 0,
                    "busy": m.busy,
                    "expires_at": m.expires_at(),
                    "stats": m.stats(),
                }
                for key, m in registry.loaded.items()
            ],
            "engines": registry.engines.states(
                [m.kind for m in registry.loaded.values()], registry.loading_kinds()
            ),
            "gpus": [g.as_dict() for g in gpus()],
        }
    )
