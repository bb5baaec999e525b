"""The render worker: chat templates in a child process, stopped at their limits and replaced."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import pytest

from xllm.engine.render import RenderWorker
from xllm.models.template import TemplateError, render_chat

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def test_output_is_capped_while_rendering() -> None:
    # 100 MB of output: refused once past 1 MiB, without building the rest first
    source = "{% set s = 'a' * 100000 %}{% for i in range(1000) %}{{ s }}{% endfor %}"
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match="exceeds 1 MiB"):
            render_chat(source, MESSAGES)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


async def _prompt(worker: RenderWorker, template: str) -> str:
    text, _ = await worker.prompt(
        template, MESSAGES, bos_token="", eos_token="", tools=None, enable_thinking=None
    )
    return text


def test_worker_renders_and_survives_runaway_templates() -> None:
    async def scenario() -> None:
        worker = RenderWorker()
        await worker.start()
        try:
            assert await _prompt(worker, CHAT) == "<user>hi"
            loop = (
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
            )
            t0 = time.monotonic()
            # the normal render queued behind the runaway one still gets its answer
            runaway, normal = await asyncio.gather(
                _prompt(worker, loop), _prompt(worker, CHAT), return_exceptions=True
            )
            assert time.monotonic() - t0 < 3.5
            assert isinstance(runaway, TemplateError) and "longer than 2 s" in runaway.message
            assert normal == "<user>hi"
            doubling = (
                "{% set ns = namespace(s='a' * 1000000) %}{% for i in range(40) %}"
                "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"
            )
            with pytest.raises(TemplateError, match="MemoryError"):
                await _prompt(worker, doubling)
            with pytest.raises(TemplateError, match="boom"):
                await _prompt(worker, "{{ raise_exception('boom') }}")
            assert await _prompt(worker, CHAT) == "<user>hi"
        finally:
            await worker.close()

    asyncio.run(scenario())
