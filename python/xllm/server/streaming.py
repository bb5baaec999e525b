"""Streaming rules, fixed once for every endpoint.

An error before the first byte is a normal JSON error response (the handler simply raises).
After it, the error goes into the stream in the stream's own format, then the terminator. A
client that disconnects ends the request's generation (the generation's `events()` stops and
cancels).
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from xllm import _core
from xllm.errors import XllmError

log = logging.getLogger("xllm.server")


async def open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response


async def write(response: web.StreamResponse, data: bytes) -> bool:
    """Write to the client; False once it has gone away."""
    try:
        await response.write(data)
    except (ConnectionResetError, ConnectionError):
        return False
    return True


async def sse_error(response: web.StreamResponse, err: XllmError) -> None:
    """An OpenAI-style error event in an SSE stream, then the terminator."""
    log.warning("stream ended with an error: %s", err.message)
    await write(response, b"data: " + orjson.dumps(err.openai_body()) + b"\n\n" + _core.SSE_DONE)
