"""`POST /v1/chat/completions`."""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiohttp import web

from xllm import grammar, reasoning, tools
from xllm.engine.protocol import Image, Relay, Request
from xllm.server import pump
from xllm.server.http import (
    json_response,
    load_model,
    parse_body,
    peer_gone,
    read_images,
    start_generation,
)
from xllm.server.openai.logprobs import chat_logprobs
from xllm.server.openai.stream import ChunkSink, Entries, FramedSink, sse_chunk
from xllm.server.openai.wire import ChatCompletionRequest, ChatMessage
from xllm.server.relay import relay

FINGERPRINT = "xllm"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, ChatCompletionRequest)
    model = await load_model(request, body.model, engine=body.engine)
    if isinstance(model, Relay):  # a remote upstream takes OpenAI's request as it is
        return await relay(request, model, "/v1/chat/completions")
    sources = [m.image_sources(i) for i, m in enumerate(body.messages)]
    decoded = iter(await read_images(request, model, [s for m in sources for s in m]))
    messages = [
        _template_message(m, [next(decoded) for _ in sources[i]])
        for i, m in enumerate(body.messages)
    ]
    functions = body.functions()
    forced = body.forced_function()
    constraint = None
    if body.response_format is not None:
        constraint = grammar.for_format(body.response_format.grammar_format(), "response_format")
    gen = await start_generation(
        request,
        model,
        Request(
            messages=messages,
            sampling=body.sampling(
                max_tokens=body.max_completion_tokens or body.max_tokens,
                logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                grammar=constraint,
            ),
            tools=functions,
            forced_tool=forced,
            parallel_tools=body.parallel_tool_calls,
            template=body.chat_template or None,
            enable_thinking=body.enable_thinking(),
            split_thinking=body.reasoning_format != "none" and forced is None,
            param="messages",
        ),
        cache=body.cache,
    )
    splitters = None
    if gen.opens_thinking is not None:
        splitters = [reasoning.ThinkSplitter(inside=gen.opens_thinking) for _ in range(gen.n)]
    head = {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": FINGERPRINT,
    }
    names = {f["name"] for f in functions}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sink: ChunkSink
        if forced is not None:
            sink = _CallChunks(head, body.n, include_usage)
        elif splitters or names:
            sink = _SplitChunks(head, body.n, include_usage, body.logprobs, splitters, names)
        else:
            sink = _ChatChunks(head, body.n, include_usage, body.logprobs)
        return await pump.stream(request, gen, sink)

    result = await pump.collect(gen, lambda: peer_gone(request))
    choices = []
    for c in result.choices:
        thinking, answer = splitters[c.index].whole(c.text) if splitters else ("", c.text)
        message: dict[str, Any] = {"role": "assistant", "content": answer}
        finish = c.finish_reason
        if functions:
            text, calls = tools.parse(answer, names)
            if calls:
                message = {
                    "role": "assistant",
                    "content": text or None,
                    "tool_calls": [call.openai() for call in calls],
                }
                finish = "tool_calls"
        if thinking:
            message["reasoning_content"] = thinking
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": chat_logprobs(c.logprobs) if body.logprobs else None,
                "finish_reason": finish,
            }
        )
    return json_response(
        {**head, "object": "chat.completion", "choices": choices, "usage": result.usage.openai()}
    )


def _template_message(m: ChatMessage, images: list[Image]) -> dict[str, Any]:
    """A message as chat templates expect it: content as plain text, its images apart."""
    dumped = m.model_dump(exclude_none=True)
    dumped["content"] = m.text()
    if images:
        dumped["images"] = images
    return dumped


class _ChatChunks(FramedSink):
    """Each token's chunk is its text in a fixed frame."""

    def __init__(self, head: dict[str, Any], n: int, include_usage: bool, logprobs: bool) -> None:
        super().__init__({**head, "object": "chat.completion.chunk"}, n, include_usage, logprobs)

    def chunk(
        self, index: int, text: str, finish: str | None, logprobs: Entries, **top: Any
    ) -> bytes:
        delta = {"content": text} if finish is None else {}
        lp = chat_logprobs(logprobs) if logprobs is not None else None
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return sse_chunk(self.head, choice, **top)

    def opening(self) -> bytes:
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
            for i in range(self.n)
        )


class _SplitChunks(_ChatChunks):
    """A stream whose text is split before it goes out (so never framed as it comes).

    A thinking model's reasoning goes as `reasoning_content` deltas (llama-server's and vLLM's
    field), the answer as `content`. With tools the model may call (`names`), the answer
    streams too, but from where a call may begin it is held back; at the end the calls go as
    `tool_calls` deltas (and anything held that was no call after all, as content).
    """

    framed = False

    def __init__(
        self,
        head: dict[str, Any],
        n: int,
        include_usage: bool,
        logprobs: bool,
        splitters: list[reasoning.ThinkSplitter] | None,
        names: set[str],
    ) -> None:
        super().__init__(head, n, include_usage, logprobs)
        self.splitters = splitters
        self.watches = [tools.CallWatch(names) for _ in range(n)] if names else None

    def chunk(
        self, index: int, text: str, finish: str | None, logprobs: Entries, **top: Any
    ) -> bytes:
        splitter = self.splitters[index] if self.splitters else None
        watch = self.watches[index] if self.watches else None
        if finish is None:
            thinking, content = splitter.feed(text) if splitter is not None else ("", text)
            content = watch.feed(content) if watch is not None else content
            return self._delta(index, thinking, content, logprobs)
        thinking, content = splitter.flush() if splitter is not None else ("", "")
        calls: list[tools.ToolCall] = []
        if watch is not None:
            content = watch.feed(content)
            rest, calls = watch.end()
            content += rest
        out = self._delta(index, thinking, content, None, calls)
        reason = "tool_calls" if calls else finish
        return out + super().chunk(index, "", reason, logprobs, **top)

    def _delta(
        self,
        index: int,
        thinking: str,
        content: str,
        logprobs: Entries,
        calls: list[tools.ToolCall] | None = None,
    ) -> bytes:
        delta: dict[str, Any] = {"reasoning_content": thinking} if thinking else {}
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [call.openai(i) for i, call in enumerate(calls)]
        if not delta and logprobs is None:
            return b""  # held back: a tag or a call may be cut across pieces
        lp = chat_logprobs(logprobs) if logprobs is not None else None
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": None}
        return sse_chunk(self.head, choice)


class _CallChunks(_ChatChunks):
    """A forced call streamed as OpenAI streams calls: its id and name, then argument pieces."""

    framed = False

    def __init__(self, head: dict[str, Any], n: int, include_usage: bool) -> None:
        super().__init__(head, n, include_usage, False)
        self.parsers = [tools.CallStream() for _ in range(n)]
        self.calls = [0] * n

    def chunk(
        self, index: int, text: str, finish: str | None, logprobs: Entries, **top: Any
    ) -> bytes:
        out = b""
        for kind, value in self.parsers[index].feed(text):
            call: dict[str, Any]
            if kind == "call":
                call = {
                    "index": self.calls[index],
                    "id": f"call_{secrets.token_hex(12)}",
                    "type": "function",
                    "function": {"name": value, "arguments": ""},
                }
                self.calls[index] += 1
            else:
                call = {"index": self.calls[index] - 1, "function": {"arguments": value}}
            delta = {"tool_calls": [call]}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            out += sse_chunk(self.head, choice)
        if finish is not None:
            reason = "tool_calls" if finish == "stop" and self.calls[index] else finish
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
            out += sse_chunk(self.head, choice, **top)
        return out
