"""Continuous batching through HTTP with a real model (issue: the Rust batching loop)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server, start_server, stop_server

MODEL = "smollm2:135m"


@pytest.fixture(scope="module")
def batched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("batch"),
        ["--model", MODEL, "--ctx-size", "512", "--parallel", "16"],
    )
    yield s
    stop_server(s)


async def _completion(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> tuple[str, int]:
    stream = await client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage = "", 0
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return text, usage


def test_16_concurrent_streams_and_batch_invariance(batched: Server) -> None:
    prompts = [f"Story number {i}: Once upon a time" for i in range(16)]

    async def main() -> tuple[str, list[tuple[str, int]]]:
        client = openai.AsyncOpenAI(base_url=f"{batched.url}/v1", api_key="x", max_retries=0)
        alone = await _completion(client, prompts[0], 24)
        together = await asyncio.gather(*(_completion(client, p, 24) for p in prompts))
        return alone[0], together

    alone, together = asyncio.run(main())
    assert all(usage == 24 for _, usage in together)
    assert all(text for text, _ in together)
    # greedy output does not depend on what else shares the batch
    assert together[0][0] == alone
    # the engine's counters reach the server every 0.25 s
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        stats = httpx.get(f"{batched.url}/v0/health").json()["models"][0]["stats"]
        if stats["running"] == 0:
            break
        time.sleep(0.1)
    assert stats["running"] == 0 and stats["tokens_generated_total"] >= 17 * 24


def test_second_chat_turn_reuses_the_prefix(batched: Server) -> None:
    client = openai.OpenAI(base_url=f"{batched.url}/v1", api_key="x", max_retries=0)
    turn1 = [{"role": "user", "content": "Name three colours of the rainbow, please."}]
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=16, temperature=0)
    turn2 = [
        *turn1,
        {"role": "assistant", "content": r1.choices[0].message.content or ""},
        {"role": "user", "content": "And two more?"},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=8, temperature=0)
    assert r1.usage is not None and r2.usage is not None
    details = r2.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    # everything up to the first answer was in a slot's cache already
    assert details.cached_tokens >= r1.usage.prompt_tokens
    assert details.cached_tokens < r2.usage.prompt_tokens


def test_queue_overflow_gets_503_at_once(tmp_path: Path) -> None:
    parallel, queue = 2, 3
    s = start_server(
        tmp_path,
        [
            "--model",
            MODEL,
            "--ctx-size",
            "512",
            "--parallel",
            str(parallel),
            "--max-queue",
            str(queue),
        ],
    )
    try:
        body = {"model": MODEL, "prompt": "Count:", "max_tokens": 60, "ignore_eos": True}

        async def one(client: httpx.AsyncClient) -> tuple[int, float, str | None]:
            t0 = time.monotonic()
            r = await client.post(f"{s.url}/v1/completions", json=body, timeout=120)
            return r.status_code, time.monotonic() - t0, r.headers.get("Retry-After")

        async def main() -> list[tuple[int, float, str | None]]:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(limits=limits) as client:
                return await asyncio.gather(*(one(client) for _ in range(parallel + queue + 10)))

        results = asyncio.run(main())
        rejected = [r for r in results if r[0] == 503]
        served = [r for r in results if r[0] == 200]
        # every request arrives before any finishes: P run, Q wait, the rest are turned away
        assert len(served) == parallel + queue
        assert len(rejected) == 10
        assert all(r[2] is not None for r in rejected)
        assert max(r[1] for r in rejected) < 1.0, "a rejected request waited"
    finally:
        stop_server(s)
