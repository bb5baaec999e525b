"""`GET /v1/models` and `GET /v1/models/{id}`, each entry with the model's capabilities."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from xllm.engine.protocol import Capability
from xllm.errors import InvalidRequest, ModelNotFound, XllmError
from xllm.server.http import json_response
from xllm.server.state import REGISTRY, STARTED


async def _entry(request: web.Request, name: str) -> dict[str, Any] | None:
    """The model's entry; None for a model no engine of this server serves."""
    registry = request.app[REGISTRY]
    loaded = registry.loaded.get(name)
    caps: list[str]
    context = 0
    if loaded is not None:
        caps = [c.value for c in Capability if c in loaded.capabilities]
        context = loaded.ctx_size
    else:
        caps = []
        try:
            facts = await asyncio.to_thread(registry.facts, registry.find(name))
        except (XllmError, OSError):
            facts = None  # an unreadable file still lists; loading it reports the defect
        if facts is not None:
            manifest = registry.engines.serving(facts.format, facts.architecture)
            if manifest is None:
                return None
            caps = [c for c in facts.capabilities if c in manifest.capabilities]
            context = facts.context_length
    entry: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": int(request.app[STARTED]),
        "owned_by": "xllm",
        "capabilities": caps,
    }
    if context:  # vLLM's field: what a server in front of this one reads the context from
        entry["max_model_len"] = context
    return entry


async def list_models(request: web.Request) -> web.Response:
    """Every model some engine of this server serves."""
    entries = [await _entry(request, n) for n in request.app[REGISTRY].available()]
    return json_response({"object": "list", "data": [e for e in entries if e is not None]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    try:
        key, _ = request.app[REGISTRY].resolve(name)
    except (InvalidRequest, ModelNotFound):  # a damaged store is not the client's: a 500
        raise ModelNotFound(f"model {name!r} not found", param="model") from None
    entry = await _entry(request, key)
    if entry is None:
        raise ModelNotFound(f"model {name!r} is not served by any engine here", param="model")
    return json_response(entry)
