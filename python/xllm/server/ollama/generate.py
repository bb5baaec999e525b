"""`POST /api/generate` and `POST /api/chat`: Ollama's shapes over the shared serving layer."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from xllm import serving, tools
from xllm.engine.llama import Generation, LlamaModel
from xllm.errors import InvalidRequest, XllmError
from xllm.server import streaming
from xllm.server.http import json_response, load_model, parse_body, peer_gone
from xllm.server.ollama.wire import (
    ChatRequest,
    GenerateRequest,
    Options,
    keep_alive_seconds,
)
from xllm.server.state import REGISTRY

# Ollama's own defaults where a request leaves a knob out.
OLLAMA_DEFAULTS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "repeat_penalty": 1.1,
    "repeat_last_n": 64,
}


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def engine_fields(options: Options | None, fmt: Any, ctx_size: int) -> dict[str, Any]:
    """Ollama options -> the serving layer's fields."""
    o = options.model_dump(exclude_none=True) if options else {}
    fields = {**OLLAMA_DEFAULTS, **o}
    predict = o.get("num_predict")
    fields["max_tokens"] = predict if predict and predict > 0 else None
    if o.get("seed") == -1:
        fields.pop("seed")
    if o.get("repeat_last_n") == -1:
        fields["repeat_last_n"] = ctx_size
    fields["grammar"] = serving.grammar_for(fmt, "format")
    return fields


class _Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.loaded = self.start

    def ns(self, seconds: float) -> int:
        return int(seconds * 1e9)


async def _model(request: web.Request, name: str, keep_alive: Any, timer: _Timer) -> LlamaModel:
    model = await load_model(request, name, keep_alive_seconds(keep_alive))
    timer.loaded = time.perf_counter()
    return model


async def _load_or_unload(
    request: web.Request, name: str, keep_alive: Any, key: str, empty: Any
) -> web.Response:
    """Ollama: an empty prompt loads the model, and with keep_alive 0 unloads it."""
    if keep_alive_seconds(keep_alive) == 0:
        request.app[REGISTRY].resolve(name)  # unknown model: 404 as for any request
        await request.app[REGISTRY].unload(name)
        reason = "unload"
    else:
        await _model(request, name, keep_alive, _Timer())
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


def _no_images(images: list[str] | None, name: str) -> None:
    if images:
        raise InvalidRequest(f"model {name!r} does not support images")


async def generate(request: web.Request) -> web.StreamResponse:
    timer = _Timer()
    body = await parse_body(request, GenerateRequest)
    if not body.prompt and not body.images:
        return await _load_or_unload(request, body.model, body.keep_alive, "response", "")
    if body.template:
        raise InvalidRequest("template overrides in a request are not supported; use a Modelfile")
    model = await _model(request, body.model, body.keep_alive, timer)
    _no_images(body.images, body.model)
    if body.raw:
        prompt = serving.Prompt(await model.tokenize(body.prompt, special=True), [])
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        prompt = await serving.chat_prompt(model, messages)
    tokens = list(body.context or []) + prompt.tokens
    fields = engine_fields(body.options, body.format, model.ctx_size)
    params = serving.sampling_params(
        model, fields, prompt_len=len(tokens), extra_stops=prompt.stops
    )
    gen = await model.start(tokens, params)

    def chunk(text: str) -> dict[str, Any]:
        return {"model": body.model, "created_at": now_rfc3339(), "response": text, "done": False}

    async def final(text: str, streamed: bool, usage: serving.Usage, finish: str | None) -> Any:
        out = _final(body.model, timer, usage, finish)
        out["response"] = "" if streamed else text
        out["context"] = tokens + (await model.tokenize(text, special=False) if text else [])
        return out

    return await _respond(request, gen, body.stream, chunk, final)


async def chat(request: web.Request) -> web.StreamResponse:
    timer = _Timer()
    body = await parse_body(request, ChatRequest)
    empty = {"role": "assistant", "content": ""}
    if not body.messages:
        return await _load_or_unload(request, body.model, body.keep_alive, "message", empty)
    model = await _model(request, body.model, body.keep_alive, timer)
    for m in body.messages:
        _no_images(m.images, body.model)
    messages = [m.model_dump(exclude_none=True, exclude={"images"}) for m in body.messages]
    functions = [t["function"] for t in body.tools or [] if isinstance(t.get("function"), dict)]
    fields = engine_fields(body.options, body.format, model.ctx_size)
    prompt, params = await serving.prepare_chat(model, messages, fields, functions)
    gen = await model.start(prompt.tokens, params)
    if functions:
        return await _tool_chat(request, gen, body, timer, {f["name"] for f in functions})

    def chunk(text: str) -> dict[str, Any]:
        return {
            "model": body.model,
            "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": text},
            "done": False,
        }

    async def final(text: str, streamed: bool, usage: serving.Usage, finish: str | None) -> Any:
        out = _final(body.model, timer, usage, finish)
        out["message"] = {"role": "assistant", "content": "" if streamed else text}
        return out

    return await _respond(request, gen, body.stream, chunk, final)


async def _tool_chat(
    request: web.Request, gen: Generation, body: ChatRequest, timer: _Timer, names: set[str]
) -> web.StreamResponse:
    """With tools the whole answer is needed to tell a call from text (as Ollama does)."""
    result = await serving.collect(gen, lambda: peer_gone(request))
    choice = result.choices[0]
    text, calls = tools.parse(choice.text, names)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {"function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
    final = _final(body.model, timer, result.usage, choice.finish_reason)
    if not body.stream:
        return json_response({**final, "message": message})
    response = await streaming.open_stream(request, "application/x-ndjson")
    first = {"model": body.model, "created_at": now_rfc3339(), "message": message, "done": False}
    last = {**final, "message": {"role": "assistant", "content": ""}}
    await streaming.finish(response, orjson.dumps(first) + b"\n" + orjson.dumps(last) + b"\n")
    return response


def _final(name: str, timer: _Timer, usage: serving.Usage, finish: str | None) -> dict[str, Any]:
    now = time.perf_counter()
    return {
        "model": name,
        "created_at": now_rfc3339(),
        "done": True,
        "done_reason": finish or "stop",
        "total_duration": timer.ns(now - timer.start),
        "load_duration": timer.ns(timer.loaded - timer.start),
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": int(usage.ttft_ms * 1e6),
        "eval_count": usage.completion_tokens,
        "eval_duration": int(usage.gen_ms * 1e6),
    }


async def _respond(
    request: web.Request,
    gen: Generation,
    stream: bool,
    chunk: Callable[[str], dict[str, Any]],
    final: Callable[[str, bool, serving.Usage, str | None], Awaitable[dict[str, Any]]],
) -> web.StreamResponse:
    if not stream:
        result = await serving.collect(gen, lambda: peer_gone(request))
        c = result.choices[0]
        return json_response(await final(c.text, False, result.usage, c.finish_reason))
    response = await streaming.open_stream(request, "application/x-ndjson")
    usage = serving.Usage()
    full = ""
    try:
        async for batch in gen.events(lambda: peer_gone(request)):
            out = bytearray()
            for _, _, text, _, finish, extra in batch:
                if text:
                    full += text
                    out += orjson.dumps(chunk(text)) + b"\n"
                if finish is not None:
                    serving.raise_if_failed(finish, extra)
                    usage.add(extra)
                    out += orjson.dumps(await final(full, True, usage, finish)) + b"\n"
            if out and not await streaming.write(response, bytes(out)):
                gen.cancel()
                return response
    except XllmError as e:
        gen.cancel()
        await streaming.finish(response, orjson.dumps(e.ollama_body()) + b"\n")
        return response
    await streaming.finish(response)
    return response
