"""THE route table: every endpoint xllm serves, in one place."""

from __future__ import annotations

from aiohttp import web

from xllm.server.openai.chat import chat_completions
from xllm.server.openai.completions import completions
from xllm.server.openai.embeddings import embeddings
from xllm.server.openai.models import get_model, list_models
from xllm.server.v0.health import health
from xllm.server.v0.metrics import metrics
from xllm.server.v0.system import system


def add_routes(app: web.Application) -> None:
    app.router.add_routes(
        [
            web.post("/v1/chat/completions", chat_completions),
            web.post("/v1/completions", completions),
            web.post("/v1/embeddings", embeddings),
            web.get("/v1/models", list_models),
            web.get("/v1/models/{model:.+}", get_model),
            web.get("/v0/health", health),
            web.get("/v0/metrics", metrics),
            web.get("/v0/system", system),
        ]
    )
