"""`POST /v1/completions` (text completion, also with token-id prompts and prompt batches)."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from aiohttp import web

from xllm import serving
from xllm.engine.llama import LlamaModel
from xllm.errors import InvalidRequest
from xllm.server.http import json_response, load_model, parse_body, peer_gone, start_generation
from xllm.server.openai.logprobs import completion_logprobs
from xllm.server.openai.stream import Entries, sse_chunk, stream
from xllm.server.openai.wire import CompletionRequest


async def _prompts(model: LlamaModel, body: CompletionRequest) -> list[list[int]]:
    prompt = body.prompt
    if body.suffix:
        if prompt and not isinstance(prompt, str) and isinstance(prompt[0], int):
            raise InvalidRequest("suffix needs a text prompt, not token ids", param="suffix")
        texts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
        return [
            (await serving.infill_prompt(model, body.model, t, body.suffix)).tokens for t in texts
        ]
    if isinstance(prompt, str):
        return [await model.tokenize(prompt, special=True)]
    if prompt and isinstance(prompt[0], int):
        tokens = [int(t) for t in prompt]
        serving.check_token_ids(model, tokens, "prompt")
        return [tokens]
    return [await model.tokenize(str(p), special=True) for p in prompt]


async def completions(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, CompletionRequest)
    model = await load_model(request, body.model)
    prompts = await _prompts(model, body)
    if body.stream and len(prompts) > 1:
        raise InvalidRequest("streaming takes a single prompt per request", param="prompt")
    fields: dict[str, Any] = body.model_dump(exclude_none=True)
    fields["stop"] = body.stop_list()
    params = [serving.sampling_params(model, fields, prompt_len=len(p)) for p in prompts]
    head = {
        "id": f"cmpl-{secrets.token_hex(12)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": "xllm",
    }
    echo = [await model.detokenize(p) if body.echo else "" for p in prompts]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        fmt = _TextChunks(head, echo[0], body.n)
        return await stream(request, model, prompts[0], params[0], fmt, head, include_usage)

    gens = [
        await start_generation(request, model, p, pp) for p, pp in zip(prompts, params, strict=True)
    ]
    results = await asyncio.gather(*(serving.collect(g, lambda: peer_gone(request)) for g in gens))
    usage = serving.Usage()
    choices = []
    for i, result in enumerate(results):
        usage.prompt_tokens += result.usage.prompt_tokens
        usage.completion_tokens += result.usage.completion_tokens
        usage.cached_tokens += result.usage.cached_tokens
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


class _TextChunks:
    def __init__(self, head: dict[str, Any], echo: str, n: int) -> None:
        self.head = head
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

    def preamble(self, n: int) -> bytes:
        if not self.echo:
            return b""
        return b"".join(
            sse_chunk(
                self.head,
                {"text": self.echo, "index": i, "logprobs": None, "finish_reason": None},
            )
            for i in range(n)
        )
