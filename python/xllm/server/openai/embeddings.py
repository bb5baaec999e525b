"""`POST /v1/embeddings` (a string, a batch of strings, or token ids)."""

from __future__ import annotations

import base64
from array import array

from aiohttp import web

from xllm import serving
from xllm.errors import InvalidRequest
from xllm.server.http import json_response, load_model, parse_body
from xllm.server.openai.wire import EmbeddingRequest


async def embeddings(request: web.Request) -> web.Response:
    body = await parse_body(request, EmbeddingRequest)
    model = await load_model(request, body.model)
    if body.dimensions is not None and body.dimensions != model.info.embedding_length:
        raise InvalidRequest(
            f"dimensions: this model's embeddings have {model.info.embedding_length} dimensions",
            param="dimensions",
        )
    raw = body.input
    if isinstance(raw, str):
        inputs = [await model.tokenize(raw, special=True)]
    elif raw and isinstance(raw[0], int):
        inputs = [[int(t) for t in raw]]
        serving.check_token_ids(model, inputs[0], "input")
    else:
        inputs = [await model.tokenize(str(text), special=True) for text in raw]
    for i, tokens in enumerate(inputs):
        if not tokens:
            raise InvalidRequest(f"input[{i}] is empty", param="input")
        if len(tokens) > model.ctx_size:
            raise InvalidRequest(
                f"input[{i}] is {len(tokens)} tokens, more than the context length "
                f"{model.ctx_size}",
                param="input",
            )
    vectors = await model.embed(inputs)
    data = [
        {
            "object": "embedding",
            "index": i,
            # base64 is what the openai SDK asks for by default: little-endian float32
            "embedding": base64.b64encode(array("f", v).tobytes()).decode()
            if body.encoding_format == "base64"
            else v,
        }
        for i, v in enumerate(vectors)
    ]
    n_tokens = sum(len(t) for t in inputs)
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }
    )
