"""What `/api/generate` and `/api/chat` share: options, timings, the final record, NDJSON streams.

Both are translations over the serving layer; only the per-chunk shape differs between them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from xllm import reasoning, serving
from xllm.engine.llama import Generation, LlamaModel
from xllm.errors import XllmError
from xllm.server import streaming
from xllm.server.http import json_response, load_model, peer_gone
from xllm.server.ollama.models import iso_time
from xllm.server.ollama.wire import KeepAlive, Options, keep_alive_seconds
from xllm.server.state import REGISTRY

NDJSON = "application/x-ndjson"

# Ollama's own defaults where a request leaves a knob out.
OLLAMA_DEFAULTS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "repeat_penalty": 1.1,
    "repeat_last_n": 64,
}


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
Final = Callable[[Answer, bool, serving.Usage, str | None], Awaitable[dict[str, Any]]]
"""The last record: (whole answer, whether it was streamed, usage, finish reason) -> record."""


def now_rfc3339() -> str:
    return iso_time(time.time())


def engine_fields(
    options: Options | None, fmt: Any, ctx_size: int, defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Ollama options -> the serving layer's fields; `defaults` (a stored model's Modelfile
    PARAMETERs) fill in what the request leaves out, before Ollama's own defaults."""
    o = {**(defaults or {}), **(options.engine_options() if options else {})}
    fields = {**OLLAMA_DEFAULTS, **o}
    predict = o.get("num_predict")
    fields["max_tokens"] = predict if predict and predict > 0 else None
    if o.get("seed") == -1:
        fields.pop("seed")
    if o.get("repeat_last_n") == -1:
        fields["repeat_last_n"] = ctx_size
    fields["grammar"] = serving.grammar_for(fmt, "format")
    return fields


def check_think(model: LlamaModel, name: str, think: bool | str | None) -> None:
    """Ollama refuses `think` on models that cannot think (false is always fine)."""
    if think not in (None, False):
        serving.require(model, name, "thinking", "think")


async def thinking_splitter(
    model: LlamaModel, prompt: list[int], think: bool | str | None
) -> reasoning.ThinkSplitter | None:
    """For a thinking model whose client said whether it wants the reasoning (`think`)."""
    splitters = None if think is None else await serving.thinking_splitters(model, prompt)
    return splitters[0] if splitters else None


def enable_thinking(think: bool | str | None) -> bool | None:
    """`think` as templates take it: false turns reasoning off (Qwen3's `enable_thinking`);
    a level (`"high"`, for gpt-oss) or true turns it on; unset leaves the template's default."""
    return None if think is None else think is not False


class Timer:
    """Ollama's durations: total, and how much of it went to loading the model."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.loaded = self.start

    def final(self, name: str, usage: serving.Usage, finish: str | None) -> dict[str, Any]:
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
) -> LlamaModel:
    """The model, loaded with the request's `num_ctx` if it gives one."""
    ctx_size = options.num_ctx if options is not None else None
    model = await load_model(request, name, keep_alive_seconds(keep_alive), ctx_size)
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

    def piece(text: str) -> Answer:
        if splitter is None:
            return Answer(text, text)
        thinking, content = splitter.feed(text)
        return Answer(text, content, thinking)

    def rest() -> Answer:
        if splitter is None:
            return Answer()
        thinking, content = splitter.flush()
        return Answer("", content, thinking)

    if not stream:
        result = await serving.collect(gen, lambda: peer_gone(request))
        c = result.choices[0]
        thinking, content = splitter.whole(c.text) if splitter else ("", c.text)
        whole = Answer(c.text, content, thinking)
        return json_response(await final(whole, False, result.usage, c.finish_reason))
    response = await streaming.open_stream(request, NDJSON)
    usage = serving.Usage()
    whole = Answer()
    try:
        async for batch in gen.events(lambda: peer_gone(request)):
            out = bytearray()
            for _, _, text, _, finish, extra in batch:
                parts = [piece(text)] if text else []
                if finish is not None:
                    parts.append(rest())
                for part in parts:
                    whole.add(part.text, part.content, part.thinking)
                    if part.content or part.thinking:
                        out += orjson.dumps(chunk(part)) + b"\n"
                if finish is not None:
                    serving.raise_if_failed(finish, extra)
                    usage.add(extra)
                    out += orjson.dumps(await final(whole, True, usage, finish)) + b"\n"
            if out and not await streaming.write(response, bytes(out)):
                gen.cancel()
                return response
    except XllmError as e:
        gen.cancel()
        await streaming.finish(response, orjson.dumps(e.ollama_body()) + b"\n")
        return response
    await streaming.finish(response)
    return response


async def send_records(
    request: web.Request, records: list[dict[str, Any]], stream: bool
) -> web.StreamResponse:
    """Records already complete: the last one alone, or all of them as NDJSON."""
    if not stream:
        return json_response(records[-1])
    response = await streaming.open_stream(request, NDJSON)
    await streaming.finish(response, b"".join(orjson.dumps(r) + b"\n" for r in records))
    return response
