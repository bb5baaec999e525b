"""A generation's mailbox: deltas put by the engine's reader, taken in batches by the stream.

An `asyncio.Queue` per request with an `asyncio.timeout` around each wait (to notice a client
that left) costs a timer and several Python calls per token; this costs an append and, when the
stream is waiting, one future. A client that leaves is noticed by one repeating timer per
generation instead.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from xllm.engine.protocol import Delta


class Inbox:
    __slots__ = ("_items", "_timer", "_waiter", "gone")

    def __init__(self) -> None:
        self._items: collections.deque[Delta] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.gone = False
        """The client went away (`watch` saw it): the stream stops."""

    def put(self, delta: Delta) -> None:
        self._items.append(delta)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Delta]:
        """Every delta that is ready, once there is one (or [] once the client is gone)."""
        while not self._items and not self.gone:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.gone:
            return []
        batch = list(self._items)
        self._items.clear()
        return batch

    def watch(self, is_gone: Callable[[], bool], every: float) -> None:
        """Check `is_gone()` every `every` seconds (until `unwatch`): once it is true, `take`
        returns [] and `gone` is set."""
        loop = asyncio.get_running_loop()

        def check() -> None:
            if is_gone():
                self.gone = True
                self._wake()
            else:
                self._timer = loop.call_later(every, check)

        self._timer = loop.call_later(every, check)

    def unwatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
