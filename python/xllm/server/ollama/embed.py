"""`POST /api/embed` and the legacy `POST /api/embeddings`."""

from __future__ import annotations

import time

from aiohttp import web

from xllm import embedding
from xllm.errors import InvalidRequest
from xllm.server.http import json_response, load_model, parse_body
from xllm.server.ollama.wire import EmbeddingsRequest, EmbedRequest, keep_alive_seconds


async def embed(request: web.Request) -> web.Response:
    start = time.perf_counter()
    body = await parse_body(request, EmbedRequest)
    embedding.refuse_lora(
        body.options is not None and body.options.lora is not None, "options.lora"
    )
    model = await load_model(request, body.model, keep_alive_seconds(body.keep_alive))
    loaded = time.perf_counter()
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or any(not t for t in texts):
        raise InvalidRequest("input: empty text cannot be embedded", param="input")
    result = await embedding.embed(model, texts, truncate=body.truncate)
    vectors = result.vectors
    if body.dimensions:
        vectors = [v[: body.dimensions] for v in vectors]
    return json_response(
        {
            "model": body.model,
            "embeddings": vectors,
            "total_duration": int((time.perf_counter() - start) * 1e9),
            "load_duration": int((loaded - start) * 1e9),
            "prompt_eval_count": result.prompt_tokens,
        }
    )


async def embeddings(request: web.Request) -> web.Response:
    """The legacy endpoint: one prompt, `{"embedding": [...]}`, not normalized."""
    body = await parse_body(request, EmbeddingsRequest)
    embedding.refuse_lora(
        body.options is not None and body.options.lora is not None, "options.lora"
    )
    model = await load_model(request, body.model, keep_alive_seconds(body.keep_alive))
    if not body.prompt:
        return json_response({"embedding": []})
    result = await embedding.embed(
        model, [body.prompt], truncate=True, normalize=False, param="prompt"
    )
    return json_response({"embedding": result.vectors[0]})
