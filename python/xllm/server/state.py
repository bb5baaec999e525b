"""Typed application state shared by the handlers."""

from __future__ import annotations

from aiohttp import web

from xllm.config import Settings
from xllm.engine.registry import ModelRegistry
from xllm.metrics import Metrics
from xllm.server.response_cache import ResponseCache

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", ModelRegistry)
STARTED = web.AppKey("started", float)
METRICS = web.AppKey("metrics", Metrics)
RESPONSE_CACHE = web.AppKey("response_cache", ResponseCache)
