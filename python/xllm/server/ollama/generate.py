"""`POST /api/generate`: Ollama's completion over the engine seam."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from xllm import grammar
from xllm.engine.protocol import Part, Request, Tokenizer
from xllm.server import pump
from xllm.server.http import parse_body, read_images, start_generation
from xllm.server.ollama import reply
from xllm.server.ollama.wire import GenerateRequest


async def generate(request: web.Request) -> web.StreamResponse:
    timer = reply.Timer()
    body = await parse_body(request, GenerateRequest)
    if not body.prompt and not body.images and not body.suffix:
        return await reply.load_or_unload(request, body.model, body.keep_alive, "response", "")
    model = await reply.model_for(
        request, body.model, body.keep_alive, timer, body.options, body.engine
    )
    reply.check_think(model, body.model, body.think)
    images = await read_images(request, model, body.image_sources())
    messages: list[dict[str, Any]] | None = None
    if not body.raw and not body.suffix:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        user: dict[str, Any] = {"role": "user", "content": body.prompt}
        messages.append({**user, "images": images} if images else user)
    # a raw prompt's images go before its text, as they would in a chat message
    parts = [*(Part("image", image=x) for x in images), Part("text", body.prompt)]
    gen = await start_generation(
        request,
        model,
        Request(
            messages=messages,
            prompt=parts if messages is None else (),
            suffix=body.suffix or None,
            context=body.context or (),
            sampling=reply.sampling(body.options, grammar.for_format(body.format, "format")),
            defaults=reply.OLLAMA_DEFAULTS,
            template=body.template or None,
            enable_thinking=reply.enable_thinking(body.think),
            split_thinking=body.think is not None,
        ),
        cache=body.cache,
    )
    splitter = reply.splitter(gen)
    tokens = list(gen.prompt_tokens)

    def chunk(part: reply.Answer) -> dict[str, Any]:
        out = {"model": body.model, "created_at": reply.now_rfc3339(), "response": part.content}
        if part.thinking and body.think:
            out["thinking"] = part.thinking
        return {**out, "done": False}

    async def final(
        answer: reply.Answer, streamed: bool, usage: pump.Usage, finish: str | None
    ) -> Any:
        out = timer.final(body.model, usage, finish)
        out["response"] = "" if streamed else answer.content
        if answer.thinking and body.think and not streamed:
            out["thinking"] = answer.thinking
        if isinstance(model, Tokenizer):
            generated = await model.tokenize(answer.text, special=False) if answer.text else []
            out["context"] = tokens + generated
        return out

    return await reply.respond(request, gen, body.stream, chunk, final, splitter)
