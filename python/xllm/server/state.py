"""Typed application state shared by the handlers."""

from __future__ import annotations

from aiohttp import web

from xllm.config import Settings
from xllm.engine.registry import ModelRegistry

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", ModelRegistry)
STARTED = web.AppKey("started", float)
