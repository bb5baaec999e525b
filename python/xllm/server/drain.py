"""Graceful shutdown: refuse new work, let running requests finish, then cut what is left.

aiohttp's `AppRunner.cleanup()` closes the listening socket first, so clients would get
"connection refused" during a drain instead of a 503. The drain therefore happens before
cleanup, while the server still listens and the guard answers new requests with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from aiohttp import web

from xllm.server.state import REGISTRY

log = logging.getLogger("xllm.server")

SHUTTING_DOWN = "the server is shutting down"
CUT_S = 2.0
"""How long requests whose generation was cut get to write their error and end."""


class Drain:
    """Whether the server is shutting down, and how many requests it is still handling."""

    def __init__(self) -> None:
        self.draining = False
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def running(self) -> int:
        return self._running

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a request as running for as long as its handler runs."""
        self._running += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def idle_within(self, seconds: float) -> bool:
        """Whether every running request has ended within `seconds`."""
        try:
            async with asyncio.timeout(max(seconds, 0.0)):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


DRAIN = web.AppKey("drain", Drain)


async def drain(app: web.Application, seconds: float) -> None:
    """Let running requests finish for up to `seconds` (new ones get 503 meanwhile), end the
    generations still going with a "shutting down" error in their stream, and stop the
    models' runners, all while the port still answers."""
    log.info("shutting down: draining requests for up to %.0f s", seconds)
    state = app[DRAIN]
    state.draining = True
    registry = app[REGISTRY]
    if not await state.idle_within(seconds):
        log.warning(
            "%d requests still running after %.0f s: ending their generations",
            state.running,
            seconds,
        )
        registry.abort(SHUTTING_DOWN)
        await state.idle_within(CUT_S)
    await registry.close()
