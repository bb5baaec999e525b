"""`POST /api/chat`: Ollama's chat over the shared serving layer; `message.role` on every record."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from xllm import serving, tools
from xllm.server.http import parse_body, peer_gone, start_generation
from xllm.server.ollama import reply
from xllm.server.ollama.wire import ChatRequest


async def chat(request: web.Request) -> web.StreamResponse:
    timer = reply.Timer()
    body = await parse_body(request, ChatRequest)
    if not body.messages:
        empty = {"role": "assistant", "content": ""}
        return await reply.load_or_unload(request, body.model, body.keep_alive, "message", empty)
    model = await reply.model_for(request, body.model, body.keep_alive, timer, body.options)
    serving.require(model, body.model, "completion")
    has_images = any(m.images for m in body.messages)
    serving.check_images(model, body.model, has_images, "messages")
    reply.check_think(model, body.model, body.think)
    functions = body.functions()
    fields = reply.engine_fields(
        body.options, body.format, model.ctx_size, model.modelfile.parameters
    )
    prompt, params = await serving.prepare_chat(
        model,
        body.template_messages(),
        fields,
        functions,
        enable_thinking=reply.enable_thinking(body.think),
        template=body.template or None,
    )
    splitter = await reply.thinking_splitter(model, prompt.tokens, body.think)
    gen = await start_generation(request, model, prompt.tokens, params)

    def as_message(content: str, thinking: str) -> dict[str, Any]:
        out = {"role": "assistant", "content": content}
        if thinking and body.think:
            out["thinking"] = thinking
        return out

    if functions:
        # The whole answer is needed to tell a call from text (Ollama does the same).
        result = await serving.collect(gen, lambda: peer_gone(request))
        choice = result.choices[0]
        thinking, answer = splitter.whole(choice.text) if splitter else ("", choice.text)
        text, calls = tools.parse(answer, {f["name"] for f in functions})
        message = as_message(text, thinking)
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

    def chunk(part: reply.Answer) -> dict[str, Any]:
        return {
            "model": body.model,
            "created_at": reply.now_rfc3339(),
            "message": as_message(part.content, part.thinking),
            "done": False,
        }

    async def final_record(
        answer: reply.Answer, streamed: bool, usage: serving.Usage, finish: str | None
    ) -> Any:
        out = timer.final(body.model, usage, finish)
        out["message"] = (
            as_message("", "") if streamed else as_message(answer.content, answer.thinking)
        )
        return out

    return await reply.respond(request, gen, body.stream, chunk, final_record, splitter)
