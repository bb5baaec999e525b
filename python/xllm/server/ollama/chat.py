"""`POST /api/chat`: Ollama's chat over the shared serving layer; `message.role` on every record."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from xllm import serving, tools
from xllm.server.http import parse_body, peer_gone
from xllm.server.ollama import reply
from xllm.server.ollama.wire import ChatRequest


async def chat(request: web.Request) -> web.StreamResponse:
    timer = reply.Timer()
    body = await parse_body(request, ChatRequest)
    if not body.messages:
        empty = {"role": "assistant", "content": ""}
        return await reply.load_or_unload(request, body.model, body.keep_alive, "message", empty)
    model = await reply.model_for(request, body.model, body.keep_alive, timer)
    serving.require(model, body.model, "completion")
    has_images = any(m.images for m in body.messages)
    serving.check_images(model, body.model, has_images, "messages")
    reply.check_think(model, body.model, body.think)
    functions = body.functions()
    fields = reply.engine_fields(body.options, body.format, model.ctx_size)
    prompt, params = await serving.prepare_chat(model, body.template_messages(), fields, functions)
    gen = await model.start(prompt.tokens, params)
    if functions:
        # The whole answer is needed to tell a call from text (Ollama does the same).
        result = await serving.collect(gen, lambda: peer_gone(request))
        choice = result.choices[0]
        text, calls = tools.parse(choice.text, {f["name"] for f in functions})
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [
                {"function": {"name": c.name, "arguments": c.arguments}} for c in calls
            ]
        final = timer.final(body.model, result.usage, choice.finish_reason)
        if not body.stream:
            return await reply.send_records(request, [{**final, "message": message}], False)
        first = {
            "model": body.model,
            "created_at": reply.now_rfc3339(),
            "message": message,
            "done": False,
        }
        last = {**final, "message": {"role": "assistant", "content": ""}}
        return await reply.send_records(request, [first, last], True)

    def chunk(text: str) -> dict[str, Any]:
        return {
            "model": body.model,
            "created_at": reply.now_rfc3339(),
            "message": {"role": "assistant", "content": text},
            "done": False,
        }

    async def final_record(
        text: str, streamed: bool, usage: serving.Usage, finish: str | None
    ) -> Any:
        out = timer.final(body.model, usage, finish)
        out["message"] = {"role": "assistant", "content": "" if streamed else text}
        return out

    return await reply.respond(request, gen, body.stream, chunk, final_record)
