"""`GET /v0/metrics`: Prometheus text format."""

from __future__ import annotations

from aiohttp import web

from xllm.metrics import CONTENT_TYPE
from xllm.server.state import METRICS


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})
