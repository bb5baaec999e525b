"""`POST /v0/plan`: the memory plan of a stored model, a Hub repo or typed-in numbers; and the
planner page (`GET /v0/ui/...`), served from the package."""

from __future__ import annotations

import asyncio
from importlib import resources

from aiohttp import web

from xllm.memory import advice
from xllm.server.http import json_response, parse_body
from xllm.server.state import SETTINGS

UI_PREFIX = "/v0/ui/"
ASSETS = {
    "plan": ("plan.html", "text/html"),
    "plan.js": ("plan.js", "text/javascript"),
    "plan.css": ("plan.css", "text/css"),
}
"""The page's files (package data in xllm/server/ui): nothing comes from elsewhere."""


async def plan(request: web.Request) -> web.Response:
    body = await parse_body(request, advice.PlanRequest)
    # reading model headers and the Hub are blocking calls
    report = await asyncio.to_thread(advice.plan, request.app[SETTINGS], body)
    return json_response(report)


async def ui(request: web.Request) -> web.Response:
    asset = ASSETS.get(request.match_info["asset"])
    if asset is None:
        raise web.HTTPNotFound()
    data = resources.files("xllm.server.ui").joinpath(asset[0]).read_bytes()
    return web.Response(
        body=data,
        content_type=asset[1],
        charset="utf-8",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP},
    )


CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"
"""The page loads nothing from elsewhere (offline machines), and the policy says so."""
