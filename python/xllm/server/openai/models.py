"""`GET /v1/models` and `GET /v1/models/{id}`, each entry with the model's capabilities."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from xllm.engine.registry import ModelRegistry
from xllm.errors import ModelNotFound, XllmError
from xllm.models.metadata import file_capabilities
from xllm.server.http import json_response
from xllm.server.state import REGISTRY, STARTED


def _capabilities(registry: ModelRegistry, name: str) -> list[str]:
    """A model's capabilities before it is loaded: a stored one's from its cached facts
    (whatever its format), a file's from its GGUF header."""
    found = registry.find(name)
    if found.stored is not None and registry.store is not None:
        return registry.store.summary_of(found.stored.manifest).capabilities
    return file_capabilities(found.path)


async def _entry(request: web.Request, name: str) -> dict[str, Any]:
    registry = request.app[REGISTRY]
    loaded = registry.loaded.get(name)
    if loaded is not None:
        caps = loaded.info.capabilities
    else:
        try:
            caps = await asyncio.to_thread(_capabilities, registry, name)
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
    except XllmError:
        raise ModelNotFound(f"model {name!r} not found", param="model") from None
    return json_response(await _entry(request, key))
