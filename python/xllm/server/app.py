"""The aiohttp application and running it: `create_app` and `serve`."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import ssl
import time
from collections.abc import AsyncIterator

from aiohttp import web

from xllm.config import ConfigError, Settings
from xllm.engine.options import EngineOptions
from xllm.engine.plugins import Engines
from xllm.engine.registry import ModelRegistry
from xllm.engine.upstream import Remotes
from xllm.errors import XllmError
from xllm.memory import probe
from xllm.metrics import Metrics
from xllm.models.store import Store
from xllm.server import guard, image_files, middleware
from xllm.server.drain import DRAIN, Drain, drain
from xllm.server.http import add_cache_header
from xllm.server.response_cache import ResponseCache
from xllm.server.routes import add_routes
from xllm.server.state import METRICS, REGISTRY, RESPONSE_CACHE, SETTINGS, STARTED
from xllm.server.v0.health import routing

log = logging.getLogger("xllm.server")

CLOSE_S = 1.0
"""After the drain: how long aiohttp waits for connections and handlers before closing them."""


def engine_options(settings: Settings) -> EngineOptions:
    return EngineOptions(
        ctx_size=settings.ctx_size,
        parallel=settings.parallel,
        threads=settings.threads,
        batch_size=settings.batch_size,
        gpu_layers=settings.gpu_layers,
        max_queue=settings.max_queue,
        max_tokens=settings.max_tokens,
        keep_alive_s=settings.keep_alive,
        speculative=settings.speculative,
        draft_model=settings.draft_model,
        kv_dir=str(settings.cache_dir) if settings.cache_persist else None,
        kv_max_bytes=settings.cache_max_bytes,
        loras_dir=str(settings.loras_dir),
    )


def make_registry(settings: Settings, engines: Engines | None = None) -> ModelRegistry:
    """The registry of models; `engines` (tests') in place of the installed engine plugins."""
    return ModelRegistry(
        engine_options(settings),
        budget=settings.memory_budget,
        priorities=dict(settings.priorities),
        store=Store(settings.models_dir),
        replicas=dict(settings.replicas),
        speculative=dict(settings.speculative_models),
        drafts=dict(settings.draft_models),
        high_watermark=settings.memory_high_watermark,
        engines=engines,
        remotes=Remotes.of(settings.remote),
    )


def create_app(settings: Settings, registry: ModelRegistry | None = None) -> web.Application:
    app = web.Application(
        middlewares=[
            middleware.disconnects,
            middleware.request_id,
            middleware.observe_requests,
            guard.guard(settings),
            middleware.errors,
            middleware.compress,
        ],
    )
    app[DRAIN] = Drain()
    app.on_response_prepare.append(middleware.echo_request_id)
    app.on_response_prepare.append(guard.add_cors_headers)
    app.on_response_prepare.append(add_cache_header)
    app[SETTINGS] = settings
    registry = registry or make_registry(settings)
    cache = ResponseCache(int(probe.ram()[0] * settings.cache_ram_fraction))
    app[RESPONSE_CACHE] = cache
    metrics = Metrics(
        lambda: registry.loaded, lambda: registry.remotes.pools, lambda: routing(registry), cache
    )
    registry.observer = metrics
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app[STARTED] = time.time()
    add_routes(app)
    app.cleanup_ctx.append(_models)
    app.cleanup_ctx.append(image_files.sweeper)
    return app


async def _models(app: web.Application) -> AsyncIterator[None]:
    registry = app[REGISTRY]
    if registry.store is not None:  # downloads a previous run left unfinished never show up
        await asyncio.to_thread(registry.store.prune)
    registry.remotes.start()  # health checks of the remote endpoints' upstreams
    yield
    await registry.close()


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM; the first drains for up to `shutdown_timeout` seconds (new
    requests get 503 meanwhile), then cuts what is still running; a second exits at once."""
    settings = app[SETTINGS]
    tls = _tls_context(settings)
    _raise_open_files_limit()
    runner = web.AppRunner(
        app,
        shutdown_timeout=CLOSE_S,
        # handler_cancellation: see middleware.disconnects
        handler_cancellation=True,
        access_log=None,
        # aiohttp (>= 3.14.5) arms this timer when a connection opens and again when a response
        # ends, and bytes arriving do not re-arm it: a request head that is not whole by then
        # (slowloris, even trickling) gets the connection closed, as does an idle keep-alive one.
        keepalive_timeout=settings.header_timeout,
        # bodies are read as sent: the guard refuses compressed ones (415) before inflating
        auto_decompress=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    scheme = "https" if tls else "http"
    log.info("xllm listening on %s://%s:%d", scheme, host if ":" not in host else f"[{host}]", port)
    if not guard.is_loopback(host) and not settings.api_keys:
        log.warning(
            "listening on %s without an API key: anyone who can reach this port can use and "
            "manage models; set XLLM_API_KEY (or server.api_keys)",
            host,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(1)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    preload = asyncio.create_task(_preload(app[REGISTRY], settings.preload))
    try:
        await stop.wait()
        preload.cancel()
        await drain(app, settings.shutdown_timeout)
    finally:
        await runner.cleanup()


def _raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, as Go programs (Ollama) do at start: a shell's
    soft 1024 would let a thousand idle connections lock everyone else out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:  # macOS refuses an unlimited hard limit as the soft one
        log.warning("cannot raise the open-files limit above %d: %s", soft, e)


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert and not settings.tls_key:
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS certificate or key: {e}") from None
    return ctx


async def _preload(registry: ModelRegistry, names: tuple[str, ...]) -> None:
    """Load the preload list; a model that fails is logged and the server keeps serving."""
    for name in names:
        try:
            await registry.preload(name)
        except XllmError as e:
            log.error("preloading %s failed: %s", name, e.message)
