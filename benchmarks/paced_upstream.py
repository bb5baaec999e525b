"""A stand-in for an upstream on machines of its own (vLLM on GPUs), for `remote.py --upstream
paced`: an OpenAI-compatible server whose streamed chat completions take a fixed time to the
first token and between tokens however many run at once, and that spends almost no CPU doing
so. Through it, what `remote.py` measures is the proxy alone: on a 2-core machine a real
upstream's decode threads share the cores with the proxy, and every millisecond the proxy
computes is a millisecond their step takes longer.

    python benchmarks/paced_upstream.py PORT [--first-ms 100] [--token-ms 80]
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web

MODEL = "paced"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--first-ms", type=float, default=100.0)
    p.add_argument("--token-ms", type=float, default=80.0)
    a = p.parse_args()

    async def models(request: web.Request) -> web.Response:
        data = [{"id": MODEL, "object": "model", "max_model_len": 4096}]
        return web.json_response({"object": "list", "data": data})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        n = int(body.get("max_tokens") or 16)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk({"role": "assistant", "content": ""}))
        await asyncio.sleep(a.first_ms / 1000)
        for i in range(n):
            if i:
                await asyncio.sleep(a.token_ms / 1000)
            await response.write(_chunk({"content": " word"}))
        await response.write(_chunk({}, "length"))
        usage = {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": 9 + n}
        await response.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=a.port, print=None)


def _chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    data = {"id": "p1", "object": "chat.completion.chunk", "model": MODEL, "choices": [choice]}
    return b"data: " + orjson.dumps(data) + b"\n\n"


if __name__ == "__main__":
    main()
