"""Ollama's runtime endpoints: `GET /api/ps`, `GET /api/version` and `GET /`."""

from __future__ import annotations

import os
import time
from typing import Any

from aiohttp import web

from xllm import __version__
from xllm.engine.protocol import Engine, Loras
from xllm.server.http import json_response
from xllm.server.ollama.models import details, file_digest, iso_time, name_digest
from xllm.server.state import REGISTRY

OLLAMA_API_VERSION = "0.12.6"
"""The Ollama release whose API this mirrors (clients gate features on it)."""
_FOREVER_S = 100 * 365 * 86400


def _ps_entry(name: str, model: Engine) -> dict[str, Any]:
    expires = model.expires_at()
    plan = model.plan
    remote = model.kind == "remote"
    facts = details(model.info)
    if remote:
        facts["format"] = "remote"
    draft = {"draft": {"name": model.info.draft, "size": model.info.draft_size}}
    entry: dict[str, Any] = {
        "name": name,
        "model": name,
        # what the model occupies (weights, KV cache, buffers), as Ollama reports it
        "size": plan.total if plan is not None else model.info.size,
        "digest": name_digest(str(model.info.path)) if remote else file_digest(model.info.path),
        "details": facts,
        # Ollama shows a model that never unloads as expiring far in the future
        "expires_at": iso_time(expires if expires is not None else time.time() + _FOREVER_S),
        "size_vram": plan.vram if plan is not None else 0,
        "context_length": model.ctx_size,
        # xllm's: the draft model loaded beside it (its memory is in `size`)
        **(draft if model.info.draft is not None else {}),
    }
    if isinstance(model, Loras):
        entry["adapters"] = model.adapters()  # the LoRA adapters loaded over it
    return entry


async def ps(request: web.Request) -> web.Response:
    loaded = request.app[REGISTRY].loaded
    # replicas of one model are listed once each, under the model's name
    return json_response({"models": [_ps_entry(m.name, m) for m in loaded.values()]})


async def version(request: web.Request) -> web.Response:
    return json_response({"version": OLLAMA_API_VERSION, "xllm": __version__})


ROOT_PAGE = (
    """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>xllm</title>
</head><body><p>Ollama is running (xllm """
    + __version__
    + """).</p>
<p><a href="/v0/ui/plan">Memory planner</a>: the largest context that fits your GPUs, per
quantization. <a href="/openapi.json">API</a></p></body></html>"""
)


async def root(request: web.Request) -> web.Response:
    headers = {"X-Xllm-Pid": str(os.getpid())}
    # a browser asks for HTML and gets a page with links; Ollama's clients get the plain text
    if "text/html" in request.headers.get("Accept", ""):
        return web.Response(text=ROOT_PAGE, content_type="text/html", headers=headers)
    return web.Response(text="Ollama is running", headers=headers)
