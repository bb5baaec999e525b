"""The OpenAI SSE stream shared by chat and text completions; each supplies its chunk format."""

from __future__ import annotations

from typing import Any, Protocol

import orjson
from aiohttp import web

from xllm import _core, serving
from xllm.engine.llama import Generation, LlamaModel
from xllm.errors import XllmError
from xllm.server import streaming
from xllm.server.http import peer_gone, start_generation

Entries = list[Any] | None


class ChunkFormat(Protocol):
    """How one endpoint writes its chunks."""

    def chunk(
        self, index: int, text: str, finish: str | None, logprobs: Entries, **top: Any
    ) -> bytes: ...

    def preamble(self, n: int) -> bytes: ...


def frames_for(fmt: ChunkFormat, n: int) -> list[tuple[bytes, bytes]]:
    """The JSON around a token's text, prepared once per choice; Rust fills in the text."""
    frames = []
    for i in range(n):
        prefix, suffix = fmt.chunk(i, "\x00", None, None)[6:-2].split(b'"\\u0000"')
        frames.append((prefix, suffix))
    return frames


def sse_chunk(head: dict[str, Any], choice: dict[str, Any], **top: Any) -> bytes:
    return b"data: " + orjson.dumps({**head, "choices": [choice], **top}) + b"\n\n"


async def stream(
    request: web.Request,
    model: LlamaModel,
    prompt: list[int],
    params: dict[str, Any],
    fmt: ChunkFormat,
    head: dict[str, Any],
    include_usage: bool,
    *,
    in_frames: bool = True,
) -> web.StreamResponse:
    """Run a generation as an SSE stream, with its usage: on a chunk of its own after the last
    choice's when the client asks for that (`include_usage`, OpenAI's contract: then no other
    chunk has usage, and clients that sum it over chunks count it once), else on the last.

    `in_frames`: the engine may write each token's chunk itself from the format's frame (false
    when a chunk is not simply the token's text in a fixed frame).
    """
    want_logprobs = params.get("logprobs") is not None
    n = int(params.get("n", 1))
    frames = frames_for(fmt, n) if in_frames and not want_logprobs else None
    gen = await start_generation(request, model, prompt, params, frames)
    response = await streaming.open_sse(request)
    out = bytearray(fmt.preamble(n))
    usage = serving.Usage()
    running = n
    try:
        async for batch in gen.events(lambda: peer_gone(request)):
            for _, index, text, framed, finish, extra in batch:
                if framed is not None:
                    out += framed
                elif text or isinstance(extra, list):
                    out += fmt.chunk(index, text, None, extra if isinstance(extra, list) else None)
                if finish is not None:
                    serving.raise_if_failed(finish, extra)
                    usage.add(extra)
                    running -= 1
                    top = {"usage": usage.openai()} if running == 0 and not include_usage else {}
                    lp = extra.get("logprobs") or [] if want_logprobs else None
                    out += fmt.chunk(index, "", finish, lp, **top)
            if not await _flush(response, out, gen):
                return response
    except XllmError as e:
        gen.cancel()
        await streaming.sse_error(response, e)
        return response
    if include_usage:
        out += b"data: " + orjson.dumps({**head, "choices": [], "usage": usage.openai()})
        out += b"\n\n"
    out += _core.SSE_DONE
    await streaming.finish(response, bytes(out))
    return response


async def _flush(response: web.StreamResponse, out: bytearray, gen: Generation) -> bool:
    ok = await streaming.write(response, bytes(out))
    out.clear()
    if not ok:
        gen.cancel()
    return ok
