"""`POST /v1/chat/completions`."""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiohttp import web

from xllm import serving
from xllm.errors import InvalidRequest
from xllm.server.http import json_response, load_model, parse_body, peer_gone
from xllm.server.openai.logprobs import chat_logprobs
from xllm.server.openai.stream import Entries, sse_chunk, stream
from xllm.server.openai.wire import ChatCompletionRequest

FINGERPRINT = "xllm"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, ChatCompletionRequest)
    model = await load_model(request, body.model)
    if any(m.has_images() for m in body.messages):
        raise InvalidRequest(
            f"messages: model {body.model!r} does not support images", param="messages"
        )
    messages = [_template_message(m.model_dump(exclude_none=True), m.text()) for m in body.messages]
    prompt = await serving.chat_prompt(model, messages)
    fields: dict[str, Any] = body.model_dump(exclude_none=True)
    fields["stop"] = body.stop_list()
    fields["max_tokens"] = body.max_completion_tokens or body.max_tokens
    fields["logprobs"] = (body.top_logprobs or 0) if body.logprobs else None
    if body.response_format is not None:
        fields["grammar"] = serving.grammar_for(
            body.response_format.grammar_format(), "response_format"
        )
    params = serving.sampling_params(
        model, fields, prompt_len=len(prompt.tokens), extra_stops=prompt.stops
    )
    head = {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": FINGERPRINT,
    }
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        fmt = _ChatChunks(head)
        return await stream(request, model, prompt.tokens, params, fmt, fmt.head, include_usage)

    gen = await model.start(prompt.tokens, params)
    result = await serving.collect(gen, lambda: peer_gone(request))
    return json_response(
        {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c.logprobs) if body.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in result.choices
            ],
            "usage": result.usage.openai(),
        }
    )


def _template_message(dumped: dict[str, Any], text: str) -> dict[str, Any]:
    """A message as chat templates expect it: content as plain text."""
    dumped["content"] = text
    return dumped


class _ChatChunks:
    def __init__(self, head: dict[str, Any]) -> None:
        self.head = {**head, "object": "chat.completion.chunk"}

    def chunk(
        self, index: int, text: str, finish: str | None, logprobs: Entries, **top: Any
    ) -> bytes:
        delta = {"content": text} if finish is None else {}
        lp = chat_logprobs(logprobs) if logprobs is not None else None
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return sse_chunk(self.head, choice, **top)

    def preamble(self, n: int) -> bytes:
        return b"".join(
            sse_chunk(
                self.head,
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                },
            )
            for i in range(n)
        )
