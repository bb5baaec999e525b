"""`GET /openapi.json`: the HTTP API described from the route table and its wire models."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from xllm import __version__
from xllm.server.http import json_response

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                    "required": ["message", "type", "param", "code"],
                },
                {"type": "string"},  # Ollama's dialect
            ]
        }
    },
    "required": ["error"],
}


@cache
def document() -> dict[str, Any]:
    from xllm.server.routes import ROUTES  # the table imports this module

    bodies = [r.body for r in ROUTES if r.body is not None]
    refs, defs = models_json_schema(
        [(b, "validation") for b in bodies], ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, Any] = {}
    for r in ROUTES:
        path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", r.path)
        slug = re.sub(r"[^a-z0-9]+", "_", path.lower()).strip("_")
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": f"{r.method.lower()}_{slug}",
            "responses": {
                "200": {"description": "OK"},
                "4XX": {
                    "description": "Client error",
                    "content": {"application/json": {"schema": _ERROR}},
                },
                "503": {"description": "Queue full or shutting down (Retry-After)"},
            },
        }
        params = re.findall(r"\{(\w+)\}", path)
        if params:
            op["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in params
            ]
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(r.body, "validation")]}},
            }
        paths.setdefault(path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "xllm", "version": __version__},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }


async def openapi(request: web.Request) -> web.Response:
    return json_response(document())
