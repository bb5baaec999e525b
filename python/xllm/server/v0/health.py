"""`GET /v0/health`: liveness, loading progress, loaded models, and what a load balancer needs
to route (queue depth and free slots per model and for the node, memory headroom, the remote
endpoints' upstreams). Always HTTP 200; the JSON schema is documented in the README and kept
stable (fields are only ever added)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from xllm.engine.protocol import Engine
from xllm.engine.registry import ModelRegistry
from xllm.memory import probe
from xllm.metrics import Routing
from xllm.server.drain import DRAIN
from xllm.server.http import json_response
from xllm.server.state import REGISTRY

SCHEMA_VERSION = 1
"""Of the balancer fields (`node`, each model's `queue_depth`, `slots`...)."""


def _slots(m: Engine, parallel: int) -> int | None:
    """A model instance's sequences; None for a remote model, whose slots are its upstream's
    (it never queues here)."""
    return None if getattr(m, "target", None) is not None else parallel


def _free(slots: int, running: int) -> int:
    return max(slots - running, 0)


def _headroom(registry: ModelRegistry, free_ram: int) -> tuple[int, int]:
    """RAM loaded models planned to use with what their requests hold beyond it (a large
    image's buffers), and the room left for another model: the budget minus that, or free RAM
    minus what is held (as the scheduler counts it when it loads one)."""
    held = registry.scheduler.reserved
    planned = sum(m.plan.ram for m in registry.loaded.values() if m.plan) + held
    budget = registry.scheduler.budget
    return planned, max(budget - planned if budget is not None else free_ram - held, 0)


def routing(registry: ModelRegistry) -> Routing:
    """The balancer's gauges for /v0/metrics, computed as /v0/health computes them."""
    free: dict[str, int] = {}
    for key, m in registry.loaded.items():
        slots = _slots(m, registry.options.parallel)
        if slots is not None:
            free[key] = _free(slots, int(m.stats().get("running", 0)))
    return Routing(free_slots=free, headroom_bytes=_headroom(registry, probe.ram()[1])[1])


def _model(key: str, m: Engine, parallel: int) -> dict[str, Any]:
    stats = m.stats()
    running = int(stats.get("running", 0))
    remote = getattr(m, "target", None)
    slots = _slots(m, parallel)
    return {
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
        "queue_depth": int(stats.get("queue_depth", 0)),
        "running": running,
        "slots": slots,
        "free_slots": _free(slots, running) if slots is not None else None,
        "remote": {"endpoint": remote.pool.name, "model": remote.model} if remote else None,
        "stats": stats,
    }


async def health(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    loading = registry.loading()
    now = time.time()
    models = [_model(k, m, registry.options.parallel) for k, m in registry.loaded.items()]
    total, free = probe.ram()
    gpus = probe.gpus()
    planned, headroom = _headroom(registry, free)
    draining = request.app[DRAIN].draining
    return json_response(
        {
            "status": "loading" if loading else "ok",
            "schema_version": SCHEMA_VERSION,
            "draining": draining,
            "node": {
                "models_loaded": len(models),
                "queue_depth": sum(m["queue_depth"] for m in models),
                "running": sum(m["running"] for m in models),
                "free_slots": sum(m["free_slots"] or 0 for m in models),
                "requests_in_flight": request.app[DRAIN].running,
                "memory": {
                    "ram_total_bytes": total,
                    "ram_free_bytes": free,
                    "models_ram_bytes": planned,
                    "budget_bytes": registry.scheduler.budget,
                    "headroom_bytes": headroom,
                    "vram_free_bytes": sum(g.free_bytes for g in gpus),
                },
            },
            "loading": [{"model": s.name, "elapsed_s": round(now - s.started, 3)} for s in loading],
            "models": models,
            "remote": [p.state() for p in registry.remotes.pools.values()],
            "engines": registry.engines.states(
                [m.kind for m in registry.loaded.values()], registry.loading_kinds()
            ),
            "gpus": [g.as_dict() for g in gpus],
        }
    )
