"""`POST /v1/images/generations` (OpenAI): text to image on a model with the
`image_generation` capability.

`size` is any `WxH` up to `images.max_pixels` (the image comes back at exactly that size); a
diffusion model's memory plan holds a 512x512 image, and a larger one's extra memory is made
room for (idle models unloaded) and held while it is made, or refused with a 507 naming `size`;
`n` images come from seeds `seed`, `seed + 1`... (a random seed when none is given), so the
same seed and prompt give the same bytes. `response_format` `url` (the default, as OpenAI's)
writes the files under `images.directory` for `images.ttl_hours`; `b64_json` writes nothing.
Beside OpenAI's fields, those users of LocalAI and stable-diffusion.cpp expect: `seed`,
`negative_prompt`, `steps`, `cfg_scale`, `sampler`. `quality`, `style`, `moderation` and
`user` are accepted and change nothing (steps and cfg_scale are the knobs that do); `background`
`transparent` and `stream` are refused (a diffusion model paints every pixel, and the image
is answered whole).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from aiohttp import web
from pydantic import Field, field_validator

from xllm.engine.protocol import Capability, ImageGeneration, Painter
from xllm.errors import InsufficientMemory, InvalidRequest
from xllm.server import image_files
from xllm.server.http import GENERATIONS, json_response, load_capable, parse_body, peer_gone
from xllm.server.openai.wire import EngineName, Wire
from xllm.server.state import REGISTRY, SETTINGS

MAX_N = 10
"""OpenAI's limit on images per request."""
MAX_PROMPT = 32_000
MAX_SEED = 2**32 - 1
DEFAULT_SIZE = (512, 512)
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


class ImageRequest(Wire):
    prompt: str
    model: Annotated[str, Field(min_length=1, max_length=400)]
    engine: EngineName | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    size: str | None = None
    """`WxH` (any sizes), or `auto` (512x512)."""
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: Annotated[int, Field(ge=0, le=100)] | None = None
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["auto", "low"] | None = None
    user: Annotated[str, Field(max_length=400)] | None = None
    stream: Literal[False] = False
    seed: Annotated[int, Field(ge=-1, le=MAX_SEED)] | None = None
    """-1 or absent: a random seed."""
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT)] = ""
    steps: Annotated[int, Field(ge=1, le=150)] | None = None
    cfg_scale: Annotated[float, Field(ge=0, le=30)] | None = None
    sampler: Annotated[str, Field(min_length=1, max_length=40)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the prompt is empty")
        if len(v) > MAX_PROMPT:
            raise ValueError(f"the prompt is {len(v)} characters; the limit is {MAX_PROMPT}")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None and v != "auto" and _SIZE.fullmatch(v) is None:
            raise ValueError(f"expected WIDTHxHEIGHT in pixels (like 512x512) or auto, got {v!r}")
        return v

    def dimensions(self) -> tuple[int, int]:
        m = _SIZE.fullmatch(self.size or "")
        return (int(m.group(1)), int(m.group(2))) if m else DEFAULT_SIZE


async def _painter(request: web.Request, body: ImageRequest) -> tuple[str, Painter]:
    """The model, loaded, if its engine paints (its instance's key and it)."""
    refusal = "does not generate images; use a diffusion model"
    engine = await load_capable(
        request, body.model, body.engine, Capability.IMAGE_GENERATION, refusal
    )
    if not isinstance(engine, Painter):
        raise InvalidRequest(
            f"model: the {engine.kind} engine serving {body.model!r} cannot generate images",
            param="model",
        )
    return engine.key, engine


@contextlib.asynccontextmanager
async def _room(
    request: web.Request, key: str, painter: Painter, width: int, height: int
) -> AsyncIterator[None]:
    """The memory an image of that size takes beyond the model's plan, held while it is made;
    a 507 naming `size` when it is not there."""
    extra = painter.extra_memory(width, height)
    room = request.app[REGISTRY].scheduler.room(key, extra, f"a {width}x{height} image")
    async with contextlib.AsyncExitStack() as held:
        try:
            await held.enter_async_context(room)
        except InsufficientMemory as e:
            raise InsufficientMemory(f"size: {e.message}", param="size") from None
        yield


async def generations(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, ImageRequest)
    width, height = body.dimensions()
    limit = request.app[SETTINGS].images_max_pixels
    if width * height > limit:
        raise InvalidRequest(
            f"size: {width}x{height} is {width * height} pixels; this server's limit is {limit} "
            "(images.max_pixels)",
            param="size",
        )
    key, painter = await _painter(request, body)
    seed = body.seed if body.seed is not None and body.seed >= 0 else secrets.randbelow(2**31)
    job = ImageGeneration(
        prompt=body.prompt, width=width, height=height, n=body.n, seed=seed,
        negative_prompt=body.negative_prompt, steps=body.steps, cfg_scale=body.cfg_scale,
        sampler=body.sampler, output_format=body.output_format, quality=body.output_compression,
    )  # fmt: skip
    async with _room(request, key, painter, width, height):
        painting = await painter.paint(job)
        request.setdefault(GENERATIONS, []).append(painting)
        images = await painting.images(lambda: peer_gone(request))
    if len(images) != body.n:  # the client left: nobody reads an answer
        return web.Response(status=499)
    data: list[dict[str, str]] = []
    for image in images:
        if body.response_format == "b64_json":
            data.append({"b64_json": base64.b64encode(image).decode()})
        else:
            files = request.app[image_files.IMAGE_FILES]
            name = await asyncio.to_thread(files.save, image, body.output_format)
            data.append({"url": image_files.url(request, name)})
    return json_response({
        "created": int(time.time()), "data": data, "size": f"{width}x{height}",
        "output_format": body.output_format, "quality": body.quality or "auto",
        "background": body.background or "opaque",
    })  # fmt: skip
