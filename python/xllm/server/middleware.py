"""Middlewares: request ids and the one place errors become HTTP responses."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from xllm import _core
from xllm import log as log_context
from xllm.errors import NotFound, Overloaded, XllmError
from xllm.server import routes, streaming
from xllm.server.http import GENERATIONS, MODEL_NAME, json_response
from xllm.server.state import METRICS

log = logging.getLogger("xllm.server")
access = logging.getLogger("xllm.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _body(request: web.Request, err: XllmError) -> dict[str, object]:
    """The error in the shape of the route's dialect (the route table says which)."""
    if routes.dialect(request) == "ollama":
        return err.ollama_body()
    return err.openai_body()


def error_response(request: web.Request, err: XllmError) -> web.Response:
    response = json_response(_body(request, err), status=err.status)
    if isinstance(err, Overloaded):
        response.headers["Retry-After"] = str(err.retry_after)
    return response


@web.middleware
async def disconnects(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request's generations end with it, and at once when its client disconnects.

    The app runs with aiohttp's `handler_cancellation`, which cancels the handler of a client
    that went away. The handler itself is shielded and runs on as before (it notices the gone
    peer when it next writes or checks), but its generations are cancelled right then: a
    queued one leaves the queue and frees its place immediately.
    """
    try:
        return await asyncio.shield(handler(request))
    finally:
        for gen in request.get(GENERATIONS, ()):
            gen.cancel()


@web.middleware
async def request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take the client's X-Request-ID (if sane) or make one."""
    rid = request.headers.get("X-Request-ID", "")
    if not _SAFE_ID.match(rid):  # CR/LF or junk must not reach logs or headers
        rid = secrets.token_hex(8)
    request[REQUEST_ID] = rid
    token = log_context.request_id.set(rid)
    try:
        return await handler(request)
    finally:
        log_context.request_id.reset(token)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook, so streamed responses carry the id too."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers["X-Request-ID"] = rid


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """XllmError (and aiohttp's own 404/405) in the dialect's error shape."""
    try:
        return await handler(request)
    except XllmError as e:
        if e.status >= 500:
            log.error("%s %s -> %d: %s", request.method, request.path, e.status, e.message)
        return error_response(request, e)
    except web.HTTPNotFound:
        return error_response(
            request, NotFound(f"no such endpoint: {request.method} {request.path}")
        )
    except web.HTTPMethodNotAllowed as e:
        err = XllmError(f"method {request.method} not allowed on {request.path}")
        err.status, err.type = 405, "invalid_request_error"
        resp = error_response(request, err)
        resp.headers["Allow"] = ",".join(sorted(e.allowed_methods))
        return resp
    except web.HTTPException:
        raise
    except Exception as e:  # a bug: logged with its traceback, the client gets the error shape
        log.exception("%s %s -> 500: unexpected %s", request.method, request.path, type(e).__name__)
        return error_response(request, XllmError(f"internal error ({type(e).__name__})"))


@web.middleware
async def observe_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An access-log line and xllm_requests_total{endpoint, model, status} per request."""
    status = 500
    start = time.perf_counter()
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        model = request.get(MODEL_NAME, "")
        request.app[METRICS].requests.labels(endpoint, model, str(status)).inc()
        access.info(
            "%s %s %d %.1f ms%s",
            request.method,
            request.path,
            status,
            (time.perf_counter() - start) * 1000,
            f" model={model}" if model else "",
        )


@web.middleware
async def compress(request: web.Request, handler: Handler) -> web.StreamResponse:
    """gzip (by the Rust encoder, off the GIL) for whole bodies of 10 KB or more."""
    response = await handler(request)
    if (
        isinstance(response, web.Response)
        and not response.prepared
        and isinstance(response.body, bytes)
        and len(response.body) >= streaming.GZIP_MIN
        and "Content-Encoding" not in response.headers
        and streaming.accepts_gzip(request)
    ):
        response.body = await asyncio.to_thread(_core.gzip_compress, response.body)
        response.headers["Content-Encoding"] = "gzip"
        response.headers["Vary"] = "Accept-Encoding"
    return response
