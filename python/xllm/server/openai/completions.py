"""`POST /v1/completions` (text completion, also with token-id prompts and prompt batches)."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from aiohttp import web

from xllm.engine.protocol import Part, Relay, Request, Tokenizer
from xllm.errors import InvalidRequest
from xllm.server import pump
from xllm.server.http import json_response, load_model, parse_body, peer_gone, start_generation
from xllm.server.openai.logprobs import completion_logprobs
from xllm.server.openai.stream import Entries, FramedSink, sse_chunk
from xllm.server.openai.wire import CompletionRequest
from xllm.server.relay import relay


def _prompts(body: CompletionRequest) -> list[list[Part]]:
    """Each prompt of the request (one, or a batch of texts) as parts."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [[Part("text", prompt)]]
    if prompt and isinstance(prompt[0], int):
        return [[Part("tokens", tokens=tuple(int(t) for t in prompt))]]
    return [[Part("text", str(p))] for p in prompt]


async def completions(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, CompletionRequest)
    model = await load_model(request, body.model, engine=body.engine)
    if isinstance(model, Relay):  # a remote upstream takes OpenAI's request as it is
        return await relay(request, model, "/v1/completions")
    prompts = _prompts(body)
    if body.stream and len(prompts) > 1:
        raise InvalidRequest("streaming takes a single prompt per request", param="prompt")
    if body.echo and not isinstance(model, Tokenizer):
        raise InvalidRequest(f"echo: model {body.model!r} cannot echo its prompt", param="echo")
    sampling = body.sampling(logprobs=body.logprobs)
    gens = [
        await start_generation(
            request,
            model,
            Request(prompt=p, suffix=body.suffix or None, sampling=sampling),
            cache=body.cache,
        )
        for p in prompts
    ]
    head = {
        "id": f"cmpl-{secrets.token_hex(12)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": "xllm",
    }
    echo = [""] * len(gens)
    if body.echo and isinstance(model, Tokenizer):
        echo = [await model.detokenize(g.prompt_tokens) for g in gens]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sink = _TextChunks(head, echo[0], body.n, include_usage, body.logprobs is not None)
        return await pump.stream(request, gens[0], sink)

    results = await asyncio.gather(*(pump.collect(g, lambda: peer_gone(request)) for g in gens))
    usage = pump.Usage()
    choices = []
    for i, result in enumerate(results):
        usage.merge(result.usage)
        for c in result.choices:
            choices.append(
                {
                    "text": echo[i] + c.text,
                    "index": i * body.n + c.index,
                    "logprobs": completion_logprobs(c.logprobs, len(echo[i]))
                    if body.logprobs is not None
                    else None,
                    "finish_reason": c.finish_reason,
                }
            )
    return json_response({**head, "choices": choices, "usage": usage.openai()})


class _TextChunks(FramedSink):
    def __init__(
        self, head: dict[str, Any], echo: str, n: int, include_usage: bool, logprobs: bool
    ) -> None:
        super().__init__(head, n, include_usage, logprobs)
        self.echo = echo
        self.offsets = [len(echo)] * n  # text_offset of the next token, per choice

    def chunk(
        self, index: int, text: str, finish: str | None, logprobs: Entries, **top: Any
    ) -> bytes:
        lp = None
        if logprobs is not None:
            lp = completion_logprobs(logprobs, self.offsets[index])
        self.offsets[index] += len(text)
        choice = {"text": text, "index": index, "logprobs": lp, "finish_reason": finish}
        return sse_chunk(self.head, choice, **top)

    def opening(self) -> bytes:
        if not self.echo:
            return b""
        return b"".join(
            sse_chunk(
                self.head,
                {"text": self.echo, "index": i, "logprobs": None, "finish_reason": None},
            )
            for i in range(self.n)
        )
