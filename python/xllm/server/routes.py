"""THE route table: every endpoint xllm serves, in one place, with its request model.

The request models also feed `/openapi.json`, so the document cannot drift from the validation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel

from xllm.server.openai.chat import chat_completions
from xllm.server.openai.completions import completions
from xllm.server.openai.embeddings import embeddings
from xllm.server.openai.models import get_model, list_models
from xllm.server.openai.wire import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from xllm.server.v0.health import health
from xllm.server.v0.metrics import metrics
from xllm.server.v0.openapi import openapi
from xllm.server.v0.system import system

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/chat/completions", chat_completions, "Chat completion (OpenAI)",
          ChatCompletionRequest),
    Route("POST", "/v1/completions", completions, "Text completion (OpenAI)", CompletionRequest),
    Route("POST", "/v1/embeddings", embeddings, "Embeddings (OpenAI)", EmbeddingRequest),
    Route("GET", "/v1/models", list_models, "List models (OpenAI)"),
    Route("GET", "/v1/models/{model:.+}", get_model, "One model (OpenAI)"),
    Route("GET", "/v0/health", health, "Liveness, loading progress, loaded models"),
    Route("GET", "/v0/metrics", metrics, "Prometheus metrics"),
    Route("GET", "/v0/system", system, "Versions, CPU, RAM, GPUs"),
    Route("GET", "/openapi.json", openapi, "This document"),
)  # fmt: skip


def add_routes(app: web.Application) -> None:
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
