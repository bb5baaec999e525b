"""The OpenAI dialect's fast path to a `Relay` engine (a remote OpenAI-compatible upstream):
the client's request goes as it is, and the answer comes back as it arrives.

The body was validated by the handler's wire model first (a mistake is xllm's 400 naming the
field, whatever the upstream would say). The streaming rules are those of every stream: an
error before the first byte is a normal error response; after it, an error event and
`[DONE]`; a client that disconnects closes the upstream request.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web

from xllm import _core
from xllm.engine.protocol import Relay
from xllm.errors import XllmError
from xllm.server import streaming
from xllm.server.http import GENERATIONS, RAW_BODY, peer_gone

log = logging.getLogger("xllm.server")


async def relay(request: web.Request, model: Relay, path: str) -> web.StreamResponse:
    """Send the request's body to `model` and its answer back to the client; a client that
    goes away cancels it wherever it is (waiting for the upstream's first byte included), and
    with it the upstream request."""
    # The handler's own task (the one `middleware.disconnects` shields) is what a hang-up
    # cancels: relaying is the handler's last step. A task of its own would put every request
    # of a burst behind all the others once more before its upstream request goes out.
    work = asyncio.current_task()
    assert work is not None
    request.setdefault(GENERATIONS, []).append(work)
    return await _relay(request, model, path)


async def _relay(request: web.Request, model: Relay, path: str) -> web.StreamResponse:
    body = orjson.loads(request[RAW_BODY])
    answer = await model.relay(path, body)
    try:
        if not body.get("stream"):
            data = b"".join([piece async for piece in answer.chunks()])
            return web.Response(body=data, headers={"Content-Type": answer.content_type})
        response = await streaming.open_stream(request, answer.content_type)
        try:
            async for piece in answer.chunks():
                if not await streaming.write(response, piece):
                    return response
        except XllmError as e:
            log.warning("relayed stream ended with an error: %s", e.message)
            error = b"data: " + orjson.dumps(e.openai_body()) + b"\n\n" + _core.SSE_DONE
            await streaming.finish(response, error)
            return response
        if not peer_gone(request):
            await streaming.finish(response)
        return response
    finally:
        answer.close()
