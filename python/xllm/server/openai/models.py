"""`GET /v1/models` and `GET /v1/models/{id}`, each entry with the model's capabilities."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from xllm.errors import InvalidRequest, ModelNotFound, XllmError
from xllm.server.http import json_response
from xllm.server.state import REGISTRY, STARTED


async def _entry(request: web.Request, name: str) -> dict[str, Any]:
    registry = request.app[REGISTRY]
    loaded = registry.loaded.get(name)
    if loaded is not None:
        caps = loaded.info.capabilities
    else:
        try:
            facts = await asyncio.to_thread(registry.facts, registry.find(name))
            caps = facts.capabilities
        except (XllmError, OSError):
            caps = []  # an unreadable file still lists; loading it reports the defect
    return {
        "id": name,
        "object": "model",
        "created": int(request.app[STARTED]),
        "owned_by": "xllm",
        "capabilities": caps,
    }


async def list_models(request: web.Request) -> web.Response:
    names = request.app[REGISTRY].available()
    return json_response({"object": "list", "data": [await _entry(request, n) for n in names]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    try:
        key, _ = request.app[REGISTRY].resolve(name)
    except (InvalidRequest, ModelNotFound):  # a damaged store is not the client's: a 500
        raise ModelNotFound(f"model {name!r} not found", param="model") from None
    return json_response(await _entry(request, key))
