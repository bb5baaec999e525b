"""`POST /api/generate`: Ollama's completion over the shared serving layer."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from xllm import serving
from xllm.errors import InvalidRequest
from xllm.server.http import parse_body
from xllm.server.ollama import reply
from xllm.server.ollama.wire import GenerateRequest


async def generate(request: web.Request) -> web.StreamResponse:
    timer = reply.Timer()
    body = await parse_body(request, GenerateRequest)
    if not body.prompt and not body.images and not body.suffix:
        return await reply.load_or_unload(request, body.model, body.keep_alive, "response", "")
    if body.template:
        raise InvalidRequest(
            "template: per-request template overrides are not supported; use a Modelfile",
            param="template",
        )
    model = await reply.model_for(request, body.model, body.keep_alive, timer)
    serving.require(model, body.model, "completion")
    serving.check_images(model, body.model, bool(body.images), "images")
    reply.check_think(model, body.model, body.think)
    if body.suffix:
        prompt = await serving.infill_prompt(model, body.model, body.prompt, body.suffix)
    elif body.raw:
        prompt = serving.Prompt(await model.tokenize(body.prompt, special=True), [])
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        prompt = await serving.chat_prompt(model, messages)
    tokens = list(body.context or []) + prompt.tokens
    fields = reply.engine_fields(body.options, body.format, model.ctx_size)
    params = serving.sampling_params(
        model, fields, prompt_len=len(tokens), extra_stops=prompt.stops
    )
    gen = await model.start(tokens, params)

    def chunk(text: str) -> dict[str, Any]:
        return {
            "model": body.model,
            "created_at": reply.now_rfc3339(),
            "response": text,
            "done": False,
        }

    async def final(text: str, streamed: bool, usage: serving.Usage, finish: str | None) -> Any:
        out = timer.final(body.model, usage, finish)
        out["response"] = "" if streamed else text
        out["context"] = tokens + (await model.tokenize(text, special=False) if text else [])
        return out

    return await reply.respond(request, gen, body.stream, chunk, final)
