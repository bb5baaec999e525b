"""`POST /api/generate`: Ollama's completion over the shared serving layer."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from xllm import serving
from xllm.server.http import parse_body, start_generation
from xllm.server.ollama import reply
from xllm.server.ollama.wire import GenerateRequest


async def generate(request: web.Request) -> web.StreamResponse:
    timer = reply.Timer()
    body = await parse_body(request, GenerateRequest)
    if not body.prompt and not body.images and not body.suffix:
        return await reply.load_or_unload(request, body.model, body.keep_alive, "response", "")
    model = await reply.model_for(request, body.model, body.keep_alive, timer, body.options)
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
        prompt = await serving.chat_prompt(
            model,
            messages,
            template=body.template or None,
            enable_thinking=reply.enable_thinking(body.think),
        )
    tokens = list(body.context or []) + prompt.tokens
    fields = reply.engine_fields(
        body.options, body.format, model.ctx_size, model.modelfile.parameters
    )
    params = serving.sampling_params(
        model, fields, prompt_len=len(tokens), extra_stops=prompt.stops
    )
    splitter = await reply.thinking_splitter(model, tokens, body.think)
    gen = await start_generation(request, model, tokens, params)

    def chunk(part: reply.Answer) -> dict[str, Any]:
        out = {"model": body.model, "created_at": reply.now_rfc3339(), "response": part.content}
        if part.thinking and body.think:
            out["thinking"] = part.thinking
        return {**out, "done": False}

    async def final(
        answer: reply.Answer, streamed: bool, usage: serving.Usage, finish: str | None
    ) -> Any:
        out = timer.final(body.model, usage, finish)
        out["response"] = "" if streamed else answer.content
        if answer.thinking and body.think and not streamed:
            out["thinking"] = answer.thinking
        generated = await model.tokenize(answer.text, special=False) if answer.text else []
        out["context"] = tokens + generated
        return out

    return await reply.respond(request, gen, body.stream, chunk, final, splitter)
