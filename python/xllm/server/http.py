"""Request and response helpers every handler uses: parse bodies, write JSON, watch the peer."""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from xllm import images, remote_images
from xllm.engine.protocol import Capability, Engine, Generation, Image, Loras, Request
from xllm.errors import InvalidRequest, PayloadTooLarge
from xllm.server import response_cache
from xllm.server.openai.wire import error_param
from xllm.server.state import REGISTRY, RESPONSE_CACHE, SETTINGS

M = TypeVar("M", bound=BaseModel)
MAX_BODY = 50 * 1024 * 1024
"""Request bodies over 50 MB (images included) get 413: unread when Content-Length says so,
else as soon as the body passes it."""
SMALL_BODY = 256 * 1024
"""A body of at most this declared length is read as it is (most requests)."""
TOO_LARGE = "request body too large: the limit is 50 MB"
MODEL_NAME = web.RequestKey("model_name", str)
"""The model a request asked for, for logs and metrics."""
RAW_BODY = web.RequestKey("raw_body", bytes)
"""The body as the client sent it (parsed and validated), for engines that relay it."""


class Running(Protocol):
    """Work a request started in an engine (a `Generation`, an `Utterance`...)."""

    def cancel(self) -> None: ...


GENERATIONS = web.RequestKey("generations", list[Running])
"""The work a request started: it ends with it (see `middleware.disconnects`)."""
CACHE_HEADER = "x-xllm-cache"
CACHE_STATUS = web.RequestKey("cache_status", str)
"""`hit` or `miss` where the response cache was looked up (the `x-xllm-cache` header)."""


async def load_model(
    request: web.Request,
    name: str,
    keep_alive: float | None = None,
    ctx_size: int | None = None,
    engine: str | None = None,
) -> Engine:
    """The loaded model `name` (loading it on demand, by the `engine` a request names if it
    does); remembers it on the request."""
    request[MODEL_NAME] = name
    return await request.app[REGISTRY].get(name, keep_alive, ctx_size, engine)


async def load_capable(
    request: web.Request, name: str, engine: str | None, capability: Capability, refusal: str
) -> Engine:
    """The model `name`, loaded, when the engine that serves it declares `capability`; before
    loading one that does not, a 400 naming `model`: `refusal` (what it cannot do, and what to
    use instead) with the model's architecture and engine."""
    registry = request.app[REGISTRY]
    found = registry.find(name)
    manifest, architecture = await asyncio.to_thread(registry.engine_for, found, engine)
    if capability not in manifest.capabilities:
        what, _, instead = refusal.partition("; ")
        raise InvalidRequest(
            f"model: {name!r} {what} (a {architecture} model, served by {manifest.name}); "
            f"{instead}",
            param="model",
        )
    return await load_model(request, name, engine=engine)


async def start_generation(
    request: web.Request, engine: Engine, req: Request, *, cache: bool = True
) -> Generation:
    """Queue a generation for `request`; it is cancelled the moment its client disconnects.

    A greedy request is answered from the response cache when it holds the answer, and a live
    answer is recorded into it (`cache=False`: neither; see `server/response_cache.py`)."""
    if req.sampling.lora is not None and not isinstance(engine, Loras):
        raise InvalidRequest(
            f"lora: model {engine.name!r} ({engine.kind}) takes no LoRA adapters", param="lora"
        )
    store = request.app[RESPONSE_CACHE]
    key = response_cache.key(engine, req) if cache and store.max_bytes > 0 else None
    answer = store.get(key) if key is not None else None
    if key is not None and request.get(CACHE_STATUS) != "miss":  # a batch hits if all do
        request[CACHE_STATUS] = "miss" if answer is None else "hit"
    gen: Generation
    if answer is not None:
        gen = response_cache.Replay(answer)
    else:
        gen = await engine.generate(req)
        if key is not None:
            gen = response_cache.Recording(gen, store, key)
    request.setdefault(GENERATIONS, []).append(gen)
    return gen


async def add_cache_header(request: web.Request, response: web.StreamResponse) -> None:
    """Say whether the response cache answered (only where it was looked up)."""
    status = request.get(CACHE_STATUS)
    if status is not None:
        response.headers[CACHE_HEADER] = status


async def read_images(
    request: web.Request, engine: Engine, sources: Sequence[images.Source]
) -> list[Image]:
    """A request's images, decoded and checked (xllm/images.py); a 400 naming the first one
    when the model takes none (its engine lacks the `vision` capability)."""
    if not sources:
        return []
    if Capability.VISION not in engine.capabilities:
        first = sources[0].param
        raise InvalidRequest(f"{first}: model {engine.name!r} does not support images", param=first)
    allowed = request.app[SETTINGS].remote_images
    return await images.read(sources, remote_images.fetch if allowed else None)


async def parse_body(request: web.Request, model: type[M]) -> M:
    """The body validated as `model`; 400 naming the first bad field."""
    raw = await _read_body(request)
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        parsed = model.model_validate_json(raw)
        request[RAW_BODY] = raw
        return parsed
    except ValidationError as e:
        err = _most_telling(e)
        if err["type"] == "json_invalid":
            raise InvalidRequest(f"the body is not valid JSON: {err['msg']}") from None
        param = error_param(tuple(err["loc"]))
        if not param and err["type"] == "model_type":
            raise InvalidRequest("the body must be a JSON object") from None
        message = err["msg"].removeprefix("Value error, ")
        raise InvalidRequest(
            f"{param}: {message}" if param else message, param=param or None
        ) from None


async def _read_body(request: web.Request) -> bytes:
    """The whole body; 413 the moment it passes MAX_BODY, letting go of what was read."""
    limit = min(request.content_length or MAX_BODY, MAX_BODY)
    if limit <= SMALL_BODY and request.content_length is not None:
        return await request.read()  # framed by its length: no map needed
    # An anonymous map takes memory page by page as the body arrives and hands every page back
    # to the OS when closed, so a refused body leaves nothing resident. A growing bytearray
    # (aiohttp's `read`) reallocates and copies, and can leave tens of MB in malloc's heap.
    with mmap.mmap(-1, limit) as buffer:
        async for chunk in request.content.iter_any():
            if len(chunk) > limit - buffer.tell():
                raise PayloadTooLarge(TOO_LARGE)
            buffer.write(chunk)
        return buffer[: buffer.tell()]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def peer_gone(request: web.Request) -> bool:
    """True once the client has closed its connection."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _most_telling(e: ValidationError) -> Any:
    """With union fields pydantic reports every branch; a type mismatch on one branch is noise
    next to a real complaint (too long, out of range) on the branch whose type matched, and
    among type mismatches the deepest is inside the branch whose shape matched."""
    errs = e.errors(include_url=False)
    for err in errs:
        if not err["type"].endswith("_type") and err["type"] != "union_tag_invalid":
            return err
    return max(errs, key=lambda err: len(err["loc"]))
