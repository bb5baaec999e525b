"""`POST /v1/embeddings` (a string, a batch of strings, or token ids)."""

from __future__ import annotations

import base64
from array import array

from aiohttp import web

from xllm import embedding
from xllm.engine.protocol import Relay
from xllm.errors import InvalidRequest
from xllm.server.http import json_response, load_model, parse_body
from xllm.server.openai.wire import EmbeddingRequest
from xllm.server.relay import relay


async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, EmbeddingRequest)
    embedding.refuse_lora(body.lora is not None, "lora")
    model = await load_model(request, body.model)
    if isinstance(model, Relay):
        return await relay(request, model, "/v1/embeddings")
    if body.dimensions is not None and body.dimensions != model.info.embedding_length:
        raise InvalidRequest(
            f"dimensions: this model's embeddings have {model.info.embedding_length} dimensions",
            param="dimensions",
        )
    raw = body.input
    inputs: list[str | list[int]]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw[0], int):
        inputs = [[int(t) for t in raw]]
    else:
        inputs = [str(text) for text in raw]
    result = await embedding.embed(model, inputs, truncate=False)
    data = [
        {
            "object": "embedding",
            "index": i,
            # base64 is what the openai SDK asks for by default: little-endian float32
            "embedding": base64.b64encode(array("f", v).tobytes()).decode()
            if body.encoding_format == "base64"
            else v,
        }
        for i, v in enumerate(result.vectors)
    ]
    n = result.prompt_tokens
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }
    )
