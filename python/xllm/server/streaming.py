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


GZIP_MIN = 10 * 1024
"""Bodies of at least this many bytes are gzipped when the client accepts it."""
_GZIP = web.ResponseKey("xllm_gzip", _core.GzipStream)


def accepts_gzip(request: web.Request) -> bool:
    for item in request.headers.get("Accept-Encoding", "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() == "gzip":
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


async def open_stream(
    request: web.Request, content_type: str, compress: bool = True
) -> web.StreamResponse:
    """Start a streamed response; gzipped (flushed per write) when the client accepts it and
    `compress` (compressed audio would only grow)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": content_type,
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    if compress and accepts_gzip(request):
        response.headers["Content-Encoding"] = "gzip"
        response.headers["Vary"] = "Accept-Encoding"
        response[_GZIP] = _core.GzipStream(1)
    await response.prepare(request)
    return response


async def open_sse(request: web.Request) -> web.StreamResponse:
    return await open_stream(request, "text/event-stream")


async def write(response: web.StreamResponse, data: bytes) -> bool:
    """Write to the client; False once it has gone away."""
    encoder = response.get(_GZIP)
    try:
        await response.write(encoder.write(data) if encoder is not None else data)
    except (ConnectionResetError, ConnectionError):
        return False
    return True


async def finish(response: web.StreamResponse, data: bytes = b"") -> None:
    """Write the last bytes (and the gzip trailer) and end the response."""
    encoder = response.get(_GZIP)
    if encoder is not None:
        data = encoder.write(data) + encoder.finish()
    try:
        await response.write(data)
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass


async def sse_error(response: web.StreamResponse, err: XllmError) -> None:
    """An OpenAI-style error event in an SSE stream, then the terminator."""
    log.warning("stream ended with an error: %s", err.message)
    await finish(response, b"data: " + orjson.dumps(err.openai_body()) + b"\n\n" + _core.SSE_DONE)
