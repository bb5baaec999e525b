"""What `/api/generate` and `/api/chat` share: options, timings, the final record, NDJSON streams.

Both are translations over the engine seam and the stream pump; only the per-chunk shape differs.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson
from aiohttp import web

from xllm import grammar, reasoning
from xllm.engine.protocol import Capability, Delta, Engine, Generation, Sampling
from xllm.errors import InvalidRequest, XllmError
from xllm.server import pump, streaming
from xllm.server.http import json_response, load_model, peer_gone
from xllm.server.ollama.models import iso_time
from xllm.server.ollama.wire import KeepAlive, Options, keep_alive_seconds
from xllm.server.state import REGISTRY

NDJSON = "application/x-ndjson"

OLLAMA_DEFAULTS = Sampling(
    temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, repeat_penalty=1.1, repeat_last_n=64
)
"""Ollama's own defaults where neither a request nor the model's Modelfile sets a knob."""


@dataclass
class Answer:
    """Generated text: all of it, and the answer and the reasoning apart."""

    text: str = ""
    content: str = ""
    thinking: str = ""

    def add(self, text: str, content: str, thinking: str) -> None:
        self.text += text
        self.content += content
        self.thinking += thinking


Chunk = Callable[[Answer], dict[str, Any]]
"""The record for one streamed piece of the answer."""
Final = Callable[[Answer, bool, pump.Usage, str | None], Awaitable[dict[str, Any]]]
"""The last record: (whole answer, whether it was streamed, usage, finish reason) -> record."""


def now_rfc3339() -> str:
    return iso_time(time.time())


def check_think(model: Engine, name: str, think: bool | str | None) -> None:
    """Ollama refuses `think` on models that cannot think (false is always fine)."""
    if think not in (None, False) and Capability.THINKING not in model.capabilities:
        raise InvalidRequest(f"think: model {name!r} does not support thinking", param="think")


def sampling(options: Options | None, constraint: grammar.Grammar | None) -> Sampling:
    """A request's `options` and `format` as sampling parameters."""
    s = options.sampling() if options is not None else Sampling()
    return replace(s, grammar=constraint) if constraint is not None else s


def splitter(gen: Generation) -> reasoning.ThinkSplitter | None:
    """For a thinking model whose client said whether it wants the reasoning (`think`)."""
    if gen.opens_thinking is None:
        return None
    return reasoning.ThinkSplitter(inside=gen.opens_thinking)


def enable_thinking(think: bool | str | None) -> bool | None:
    """`think` as templates take it: false turns reasoning off (Qwen3's `enable_thinking`);
    a level (`"high"`, for gpt-oss) or true turns it on; unset leaves the template's default."""
    return None if think is None else think is not False


class Timer:
    """Ollama's durations: total, and how much of it went to loading the model."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.loaded = self.start

    def final(self, name: str, usage: pump.Usage, finish: str | None) -> dict[str, Any]:
        """The fields of the last record, durations in integer nanoseconds."""
        now = time.perf_counter()
        return {
            "model": name,
            "created_at": now_rfc3339(),
            "done": True,
            "done_reason": finish or "stop",
            "total_duration": int((now - self.start) * 1e9),
            "load_duration": int((self.loaded - self.start) * 1e9),
            "prompt_eval_count": usage.prompt_tokens,
            "prompt_eval_duration": int(usage.ttft_ms * 1e6),
            "eval_count": usage.completion_tokens,
            "eval_duration": int(usage.gen_ms * 1e6),
        }


async def model_for(
    request: web.Request,
    name: str,
    keep_alive: KeepAlive | None,
    timer: Timer,
    options: Options | None = None,
    engine: str | None = None,
) -> Engine:
    """The model, loaded with the request's `num_ctx` if it gives one."""
    ctx_size = options.num_ctx if options is not None else None
    model = await load_model(request, name, keep_alive_seconds(keep_alive), ctx_size, engine)
    timer.loaded = time.perf_counter()
    return model


async def load_or_unload(
    request: web.Request, name: str, keep_alive: KeepAlive | None, key: str, empty: Any
) -> web.Response:
    """Ollama: an empty prompt loads the model, and with keep_alive 0 unloads it."""
    if keep_alive_seconds(keep_alive) == 0:
        request.app[REGISTRY].resolve(name)  # unknown model: 404 as for any request
        await request.app[REGISTRY].unload(name)
        reason = "unload"
    else:
        await model_for(request, name, keep_alive, Timer())
        reason = "load"
    return json_response(
        {
            "model": name,
            "created_at": now_rfc3339(),
            key: empty,
            "done": True,
            "done_reason": reason,
        }
    )


async def respond(
    request: web.Request,
    gen: Generation,
    stream: bool,
    chunk: Chunk,
    final: Final,
    splitter: reasoning.ThinkSplitter | None = None,
) -> web.StreamResponse:
    """The whole answer as one record, or NDJSON: a record per batch of text, then the last.

    With a splitter the reasoning goes apart from the answer (Ollama's `thinking`).
    """
    if stream:
        return await pump.stream(request, gen, _Records(chunk, final, splitter))
    result = await pump.collect(gen, lambda: peer_gone(request))
    c = result.choices[0]
    thinking, content = splitter.whole(c.text) if splitter else ("", c.text)
    whole = Answer(c.text, content, thinking)
    return json_response(await final(whole, False, result.usage, c.finish_reason))


class _Records:
    """Ollama's NDJSON stream (a `pump.Sink`)."""

    content_type = NDJSON

    def __init__(
        self, chunk: Chunk, final: Final, splitter: reasoning.ThinkSplitter | None
    ) -> None:
        self.chunk = chunk
        self.final = final
        self.splitter = splitter
        self.whole = Answer()

    def opening(self) -> bytes:
        return b""

    def _record(self, part: Answer) -> bytes:
        self.whole.add(part.text, part.content, part.thinking)
        if not (part.content or part.thinking):
            return b""
        return orjson.dumps(self.chunk(part)) + b"\n"

    def delta(self, d: Delta) -> bytes:
        if self.splitter is None:
            return self._record(Answer(d.text, d.text))
        thinking, content = self.splitter.feed(d.text)
        return self._record(Answer(d.text, content, thinking))

    async def finished(self, d: Delta, usage: pump.Usage, running: int) -> bytes:
        out = b""
        if self.splitter is not None:
            thinking, content = self.splitter.flush()
            out = self._record(Answer("", content, thinking))
        return out + orjson.dumps(await self.final(self.whole, True, usage, d.finish)) + b"\n"

    async def closing(self, usage: pump.Usage) -> bytes:
        return b""

    def error(self, e: XllmError) -> bytes:
        return orjson.dumps(e.ollama_body()) + b"\n"


async def send_records(
    request: web.Request, records: list[dict[str, Any]], stream: bool
) -> web.StreamResponse:
    """Records already complete: the last one alone, or all of them as NDJSON."""
    if not stream:
        return json_response(records[-1])
    response = await streaming.open_stream(request, NDJSON)
    await streaming.finish(response, b"".join(orjson.dumps(r) + b"\n" for r in records))
    return response
