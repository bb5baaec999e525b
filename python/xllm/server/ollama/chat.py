"""`POST /api/chat`: Ollama's chat over the engine seam; `message.role` on every record."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from xllm import grammar, tools
from xllm.engine.protocol import Request
from xllm.server import pump
from xllm.server.http import parse_body, peer_gone, read_images, start_generation
from xllm.server.ollama import reply
from xllm.server.ollama.wire import ChatRequest


async def chat(request: web.Request) -> web.StreamResponse:
    timer = reply.Timer()
    body = await parse_body(request, ChatRequest)
    if not body.messages:
        empty = {"role": "assistant", "content": ""}
        return await reply.load_or_unload(request, body.model, body.keep_alive, "message", empty)
    model = await reply.model_for(
        request, body.model, body.keep_alive, timer, body.options, body.engine
    )
    reply.check_think(model, body.model, body.think)
    sources = body.image_sources()
    images = await read_images(request, model, [x for m in sources for x in m])
    functions = body.functions()
    gen = await start_generation(
        request,
        model,
        Request(
            messages=body.template_messages(images),
            sampling=reply.sampling(body.options, grammar.for_format(body.format, "format")),
            defaults=reply.OLLAMA_DEFAULTS,
            tools=functions,
            template=body.template or None,
            enable_thinking=reply.enable_thinking(body.think),
            split_thinking=body.think is not None,
            param="messages",
        ),
        cache=body.cache,
    )
    splitter = reply.splitter(gen)

    def as_message(content: str, thinking: str) -> dict[str, Any]:
        out = {"role": "assistant", "content": content}
        if thinking and body.think:
            out["thinking"] = thinking
        return out

    if functions:
        # The whole answer is needed to tell a call from text (Ollama does the same).
        result = await pump.collect(gen, lambda: peer_gone(request))
        choice = result.choices[0]
        thinking, answer = splitter.whole(choice.text) if splitter else ("", choice.text)
        text, calls = tools.parse(answer, {f["name"] for f in functions})
        calls += tools.native(choice.tool_calls)  # an engine's own calls (a remote upstream's)
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
        answer: reply.Answer, streamed: bool, usage: pump.Usage, finish: str | None
    ) -> Any:
        out = timer.final(body.model, usage, finish)
        out["message"] = (
            as_message("", "") if streamed else as_message(answer.content, answer.thinking)
        )
        return out

    return await reply.respond(request, gen, body.stream, chunk, final_record, splitter)
