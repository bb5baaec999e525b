"""THE route table: every endpoint xllm serves, in one place, with its request model.

The request models also feed `/openapi.json`, so the document cannot drift from the validation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from pydantic import BaseModel

from xllm.memory.advice import PlanRequest
from xllm.server import image_files
from xllm.server.ollama import create as ollama_create
from xllm.server.ollama import models as ollama_models
from xllm.server.ollama import runtime as ollama_runtime
from xllm.server.ollama.chat import chat as ollama_chat
from xllm.server.ollama.embed import embed as ollama_embed
from xllm.server.ollama.embed import embeddings as ollama_embeddings
from xllm.server.ollama.generate import generate as ollama_generate
from xllm.server.ollama.models_wire import (
    CopyRequest,
    CreateRequest,
    DeleteRequest,
    PullRequest,
    PushRequest,
)
from xllm.server.ollama.wire import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ShowRequest,
)
from xllm.server.openai.audio import transcriptions, translations
from xllm.server.openai.chat import chat_completions
from xllm.server.openai.completions import completions
from xllm.server.openai.embeddings import embeddings
from xllm.server.openai.images import ImageRequest, generations
from xllm.server.openai.models import get_model, list_models
from xllm.server.openai.responses import ResponsesRequest, responses
from xllm.server.openai.speech import SpeechRequest, speech
from xllm.server.openai.wire import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from xllm.server.v0.health import health
from xllm.server.v0.metrics import metrics
from xllm.server.v0.openapi import openapi
from xllm.server.v0.plan import plan, ui
from xllm.server.v0.system import system

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Dialect = Literal["openai", "ollama"]
"""Whose error shape a route answers with: OpenAI's `{"error": {...}}` (xllm's own /v0
endpoints use it too) or Ollama's `{"error": "..."}`."""
DIALECTS = web.AppKey("dialects", dict[str, Dialect])
"""Each route's dialect by its path, for the error middleware."""


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    dialect: Dialect = "openai"


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/chat/completions", chat_completions, "Chat completion (OpenAI)",
          ChatCompletionRequest),
    Route("POST", "/v1/completions", completions, "Text completion (OpenAI)", CompletionRequest),
    Route("POST", "/v1/embeddings", embeddings, "Embeddings (OpenAI)", EmbeddingRequest),
    Route("POST", "/v1/responses", responses, "Responses (OpenAI)", ResponsesRequest),
    Route("POST", "/v1/audio/transcriptions", transcriptions,
          "Speech to text (OpenAI; multipart/form-data: file, model, ...)"),
    Route("POST", "/v1/audio/translations", translations,
          "Speech to English text (OpenAI; multipart/form-data: file, model, ...)"),
    Route("POST", "/v1/audio/speech", speech, "Text to speech, streamed (OpenAI)", SpeechRequest),
    Route("POST", "/v1/images/generations", generations, "Text to image (OpenAI)",
          ImageRequest),
    Route("GET", "/images/{name}", image_files.serve,
          "A generated image, until images.ttl_hours have passed"),
    Route("GET", "/v1/models", list_models, "List models (OpenAI)"),
    Route("GET", "/v1/models/{model:.+}", get_model, "One model (OpenAI)"),
    Route("POST", "/api/generate", ollama_generate, "Generate (Ollama)", GenerateRequest,
          dialect="ollama"),
    Route("POST", "/api/chat", ollama_chat, "Chat (Ollama)", ChatRequest, dialect="ollama"),
    Route("POST", "/api/embed", ollama_embed, "Embeddings (Ollama)", EmbedRequest,
          dialect="ollama"),
    Route("POST", "/api/embeddings", ollama_embeddings, "Legacy embeddings (Ollama)",
          EmbeddingsRequest, dialect="ollama"),
    Route("GET", "/api/tags", ollama_models.tags, "Local models (Ollama)", dialect="ollama"),
    Route("POST", "/api/show", ollama_models.show, "Model details (Ollama)", ShowRequest,
          dialect="ollama"),
    Route("POST", "/api/pull", ollama_models.pull_model, "Download a model (Ollama)", PullRequest,
          dialect="ollama"),
    Route("POST", "/api/push", ollama_models.push_model, "Upload a model (Ollama)", PushRequest,
          dialect="ollama"),
    Route("POST", "/api/create", ollama_create.create, "Create a model (Ollama)", CreateRequest,
          dialect="ollama"),
    Route("POST", "/api/copy", ollama_create.copy, "Copy a model (Ollama)", CopyRequest,
          dialect="ollama"),
    Route("DELETE", "/api/delete", ollama_models.delete, "Delete a model (Ollama)",
          DeleteRequest, dialect="ollama"),
    Route("HEAD", "/api/blobs/{digest}", ollama_models.blob_exists, "Is a blob present (Ollama)",
          dialect="ollama"),
    Route("POST", "/api/blobs/{digest}", ollama_models.upload_blob,
          "Upload a blob, verified against its digest (Ollama)", dialect="ollama"),
    Route("GET", "/api/ps", ollama_runtime.ps, "Loaded models (Ollama)", dialect="ollama"),
    Route("GET", "/api/version", ollama_runtime.version, "Version (Ollama)", dialect="ollama"),
    Route("GET", "/", ollama_runtime.root, "Ollama is running", dialect="ollama"),
    Route("GET", "/v0/health", health, "Liveness, loading progress, loaded models"),
    Route("GET", "/v0/metrics", metrics, "Prometheus metrics"),
    Route("GET", "/v0/system", system, "Versions, CPU, RAM, GPUs"),
    Route("POST", "/v0/plan", plan,
          "Memory plan: weights, KV cache, largest context per quantization, recommendation",
          PlanRequest),
    Route("GET", "/v0/ui/{asset}", ui, "The memory planner page (/v0/ui/plan) and its files"),
    Route("GET", "/openapi.json", openapi, "This document"),
)  # fmt: skip


def add_routes(app: web.Application, table: Iterable[Route] = ROUTES) -> None:
    """Serve `table`'s routes (a test's own, or THE table), each with its dialect recorded."""
    dialects: dict[str, Dialect] = {}
    for r in table:
        if r.method == "GET":
            added = app.router.add_get(r.path, r.handler)  # answers HEAD too, as Ollama's does
        else:
            added = app.router.add_route(r.method, r.path, r.handler)
        dialects[added.resource.canonical if added.resource else r.path] = r.dialect
    app[DIALECTS] = dialects


def dialect(request: web.Request) -> Dialect:
    """The dialect of the route a request matched; for a path no route matches, that of the
    routes under its first segment (a mistyped `/api/...` gets Ollama's shape), else OpenAI's."""
    dialects = request.app.get(DIALECTS, {})
    resource = request.match_info.route.resource
    if resource is not None and resource.canonical in dialects:
        return dialects[resource.canonical]
    if request.path in dialects:  # a route of another method (a 405)
        return dialects[request.path]
    head = "/" + request.path.lstrip("/").split("/", 1)[0] + "/"
    return next((d for path, d in dialects.items() if path.startswith(head)), "openai")
