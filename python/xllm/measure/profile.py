"""`xllm profile`: one model as a user of the running server meets it.

Load time is the wall time of an empty `/api/generate` after unloading the model (keep_alive 0),
so it includes everything the server does before the model can answer. Memory is shown twice:
what the planner reserved (`/v0/health`'s plan figures) and what was measured (the runner
process's resident memory, readable when the server runs on this machine; the change in GPU
memory in use across the load). Time to first token and generation rate come from a short
streamed prompt, prompt throughput from a long one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from xllm.cli import client
from xllm.config import load_settings
from xllm.measure import prompts
from xllm.measure.stream import Sample, complete

SHORT_PROMPT = 16
_LOCAL_HOSTS = {"", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost"}


def profile(model: str, prompt_tokens: int, gen_tokens: int) -> dict[str, Any]:
    """Unload, time a load, then measure; the figures as `--json` prints them."""
    client.call("POST", "/api/generate", {"model": model, "keep_alive": 0}, timeout=600)
    gpu_free = _gpu_free()
    start = time.perf_counter()
    client.call("POST", "/api/generate", {"model": model}, timeout=600)
    load_s = time.perf_counter() - start
    vram_measured = gpu_free - _gpu_free()
    loaded = _loaded(model)
    # A long prompt must leave room for the answer in one sequence's context.
    prompt_tokens = min(prompt_tokens, int(loaded["context_length"]) - gen_tokens - 8)
    pool = prompts.token_pool(model)
    short, long = asyncio.run(_measure(model, pool, prompt_tokens, gen_tokens))
    generating_s = short.e2e_s - short.ttft_s
    return {
        "model": model,
        "server": client.base_url(),
        "load_s": load_s,
        "ram_planned_bytes": loaded["ram_bytes"],
        "ram_measured_bytes": _rss(loaded["runner_pid"]),
        "vram_planned_bytes": loaded["vram_bytes"],
        "vram_measured_bytes": vram_measured,
        "gpu_layers": loaded["gpu_layers"],
        "context_length": loaded["context_length"],
        "ttft_ms": short.ttft_s * 1000,
        "ttft_prompt_tokens": short.prompt_tokens,
        "prompt_tokens": long.prompt_tokens,
        "prompt_s": long.ttft_s,
        "prompt_tokens_per_second": long.prompt_tokens / long.ttft_s,
        "generated_tokens": short.completion_tokens,
        "generation_s": generating_s,
        "generation_tokens_per_second": short.decode_tokens_per_second,
    }


async def _measure(
    model: str, pool: list[int], prompt_tokens: int, gen_tokens: int
) -> tuple[Sample, Sample]:
    base = client.base_url()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=600)) as session:
        # The first request after a load pays one-off costs a user pays once, not per request.
        await complete(session, base, model, prompts.prompt(pool, 8, "warm-up"), 2)
        seed = str(time.time_ns())  # a fresh prompt: no prefix cache from earlier runs
        short = await complete(
            session, base, model, prompts.prompt(pool, SHORT_PROMPT, seed + "s"), gen_tokens
        )
        long = await complete(session, base, model, prompts.prompt(pool, prompt_tokens, seed), 1)
    return short, long


def _loaded(model: str) -> dict[str, Any]:
    for m in client.call("GET", "/v0/health")["models"]:
        if m["name"] in (model, f"{model}:latest"):
            return dict(m)
    raise RuntimeError(f"{model} is not among the models the server has loaded")


def _gpu_free() -> int:
    return sum(int(g["free_bytes"]) for g in client.call("GET", "/v0/health")["gpus"])


def _rss(pid: int | None) -> int | None:
    """Resident memory of the runner process, when it runs on this machine."""
    if pid is None or load_settings().host not in _LOCAL_HOSTS:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None
