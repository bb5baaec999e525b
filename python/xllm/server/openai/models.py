"""`GET /v1/models` and `GET /v1/models/{id}`."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from xllm.errors import ModelNotFound, XllmError
from xllm.server.http import json_response
from xllm.server.state import REGISTRY, STARTED


def _entry(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "xllm"}


async def list_models(request: web.Request) -> web.Response:
    created = int(request.app[STARTED])
    names = request.app[REGISTRY].available()
    return json_response({"object": "list", "data": [_entry(n, created) for n in names]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    try:
        key, _ = request.app[REGISTRY].resolve(name)
    except XllmError:
        raise ModelNotFound(f"model {name!r} not found", param="model") from None
    return json_response(_entry(key, int(request.app[STARTED])))
