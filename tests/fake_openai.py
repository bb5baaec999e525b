"""A scripted OpenAI-compatible upstream (vLLM's extra routes included), for the error paths
of the remote engine that a real server cannot be made to take on demand.

It runs on a thread of its own (so an `xllm serve` subprocess and sync tests can both use it)
and records every request. `/v1/chat/completions` does what the last user message says:

- `status 500` / `status 401`: that status, with an OpenAI error body naming it;
- `malformed`: one good chunk, then an event that is not JSON;
- `drip`: five words, one every 0.3 s;
- `hang`: nothing at all for 60 s;
- `slow`: a word every 0.1 s for 30 s, or unstreamed, the answer after 30 s (for
  disconnects: `cancelled` counts the requests whose handler was cancelled because the client
  went away; an embedding input `slow` takes 30 s too);
- `redirect`: a 307 to `redirect_to` (another host);
- `echo`: the request body it received, as the answer's text;
- anything else: `hello from NAME`, streamed or not as asked, with usage.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.conftest import free_port

MODEL = "fake-model"
CONTEXT = 2048


@dataclass
class FakeOpenAI:
    name: str = "fake"
    redirect_to: str = ""
    port: int = field(default_factory=free_port)
    requests: list[dict[str, Any]] = field(default_factory=list)
    """Each request: path, headers, body (parsed)."""
    cancelled: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeOpenAI:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._start())
            ready.set()
            loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        """Close the listening socket and every connection (as a killed server would)."""
        assert self._loop is not None and self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)

    def restart(self) -> None:
        """Listen again on the same port (a server that came back after `stop`)."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def _record(self, request: web.Request, body: Any = None) -> None:
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})

    async def _health(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        self._record(request)
        data = [{"id": MODEL, "object": "model", "max_model_len": CONTEXT}]
        return web.json_response({"object": "list", "data": data})

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self._record(request, body)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if "slow" in inputs:
            await self._cancellable(30)
        rows = [{"index": i, "embedding": [3.0, 4.0]} for i in range(len(inputs))]
        return web.json_response({"data": rows, "usage": {"prompt_tokens": 2 * len(inputs)}})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self._record(request, body)
        users = [m for m in body["messages"] if m["role"] == "user"]
        say = str(users[-1]["content"]) if users else ""
        if say.startswith("status "):
            code = int(say.split()[1])
            error = {"message": f"the fake says {code}", "type": "x", "param": None, "code": None}
            return web.json_response({"error": error}, status=code)
        if say == "redirect":
            raise web.HTTPTemporaryRedirect(self.redirect_to + "/v1/chat/completions")
        if say == "hang":
            await asyncio.sleep(60)
        if say == "slow" and not body.get("stream"):  # an answer that takes 30 s to come
            await self._cancellable(30)
        words = [f"hello from {self.name}"]
        if say == "echo":
            words = [orjson.dumps(body).decode()]
        elif say == "drip":
            words = ["one", " two", " three", " four", " five"]
        elif say == "slow":
            words = [" word"] * 300
        if not body.get("stream"):
            return web.json_response(_completion(words))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            async for event in _events(words, say):
                await response.write(event)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        await response.write_eof()
        return response

    async def _cancellable(self, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def _chunk(delta: dict[str, Any], finish: str | None = None, **top: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    data = {"id": "c1", "object": "chat.completion.chunk", "model": MODEL, "choices": [choice]}
    return b"data: " + orjson.dumps({**data, **top}) + b"\n\n"


async def _events(words: list[str], say: str) -> AsyncIterator[bytes]:
    yield _chunk({"role": "assistant", "content": ""})
    for word in words:
        yield _chunk({"content": word})
        if say == "malformed":
            yield b"data: {this is not json\n\n"
            return
        if say in ("drip", "slow"):
            await asyncio.sleep(0.3 if say == "drip" else 0.1)
    yield _chunk({}, "stop")
    usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
    yield b"data: " + orjson.dumps({"id": "c1", "choices": [], "usage": usage}) + b"\n\n"
    yield b"data: [DONE]\n\n"


def _completion(words: list[str]) -> dict[str, Any]:
    message = {"role": "assistant", "content": "".join(words)}
    return {
        "id": "c1",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7},
    }
