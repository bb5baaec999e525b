"""`xllm benchmark`: throughput and latency percentiles at several concurrencies and lengths.

For every (prompt length, generation length, concurrency) cell, `concurrency` clients each send
`requests` streamed completions one after another, so a cell holds concurrency * requests
samples. Aggregate rates divide the tokens of the cell by its wall time; TTFT, inter-token and
end-to-end latencies are percentiles over its requests.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from xllm.cli import client
from xllm.measure import prompts
from xllm.measure.stream import Sample, complete, percentile

QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class Plan:
    """What to measure."""

    model: str
    concurrency: tuple[int, ...]
    prompt_tokens: tuple[int, ...]
    gen_tokens: tuple[int, ...]
    requests: int
    """Requests each concurrent client sends in a row."""

    def cells(self) -> list[tuple[int, int, int]]:
        """(prompt tokens, generated tokens, concurrency), lengths outermost."""
        return list(itertools.product(self.prompt_tokens, self.gen_tokens, self.concurrency))

    @property
    def total_requests(self) -> int:
        return sum(c * self.requests for _, _, c in self.cells())


@dataclass(frozen=True)
class Cell:
    concurrency: int
    prompt_tokens: int
    gen_tokens: int
    samples: list[Sample]
    duration_s: float

    def summary(self) -> dict[str, Any]:
        """The cell's figures, as `--json` prints them."""
        s = self.samples
        prompt = sum(x.prompt_tokens for x in s)
        generated = sum(x.completion_tokens for x in s)
        rate = _per_second(self.duration_s)
        return {
            "concurrency": self.concurrency,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "requests": len(s),
            "duration_s": self.duration_s,
            "prompt_tokens_total": prompt,
            "cached_tokens_total": sum(x.cached_tokens for x in s),
            "generated_tokens_total": generated,
            "requests_per_second": len(s) * rate,
            "generation_tokens_per_second": generated * rate,
            "tokens_per_second": (prompt + generated) * rate,
            "prompt_tokens_per_second": percentile(
                [x.prompt_tokens / x.ttft_s for x in s if x.ttft_s > 0], 50
            ),
            "stream_tokens_per_second": percentile([x.decode_tokens_per_second for x in s], 50),
            "ttft_ms": _quantiles([x.ttft_s for x in s]),
            "itl_ms": _quantiles([g for x in s for g in x.gaps_s]),
            "e2e_ms": _quantiles([x.e2e_s for x in s]),
        }


def _per_second(seconds: float) -> float:
    return 1 / seconds if seconds > 0 else 0.0


def _quantiles(seconds: list[float]) -> dict[str, float]:
    return {f"p{q}": percentile(seconds, q) * 1000 for q in QUANTILES}


def prepare(model: str) -> list[int]:
    """Load the model (its load time stays out of the figures) and tokenize the prompt pool."""
    client.call("POST", "/api/generate", {"model": model}, timeout=600)
    return prompts.token_pool(model)


async def run(plan: Plan, pool: list[int], on_cell: Callable[[str, int, int], None]) -> list[Cell]:
    """Measure every cell in turn; `on_cell(label, done, total)` follows the requests."""
    salt = secrets.token_hex(4)  # a fresh run never meets the prefix cache of an earlier one
    seeds = (f"{salt}-{i}" for i in itertools.count())
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    cells = []
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        # A first request warms the engine up (allocations, caches) outside the figures.
        await complete(session, client.base_url(), plan.model, prompts.prompt(pool, 8, salt), 2)
        for prompt_len, gen_len, concurrency in plan.cells():
            cells.append(
                await _cell(session, plan, pool, seeds, prompt_len, gen_len, concurrency, on_cell)
            )
    return cells


async def _cell(
    session: aiohttp.ClientSession,
    plan: Plan,
    pool: list[int],
    seeds: Iterator[str],
    prompt_len: int,
    gen_len: int,
    concurrency: int,
    on_cell: Callable[[str, int, int], None],
) -> Cell:
    label = f"c={concurrency} prompt={prompt_len} gen={gen_len}"
    total = concurrency * plan.requests
    base = client.base_url()
    samples: list[Sample] = []

    async def one_client() -> None:
        for _ in range(plan.requests):
            tokens = prompts.prompt(pool, prompt_len, next(seeds))
            samples.append(await complete(session, base, plan.model, tokens, gen_len))
            on_cell(label, len(samples), total)

    on_cell(label, 0, total)
    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return Cell(concurrency, prompt_len, gen_len, samples, time.perf_counter() - start)
