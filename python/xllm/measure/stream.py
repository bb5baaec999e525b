"""One streamed completion, timed at the client: TTFT, gaps between tokens, end to end.

Requests go to OpenAI's `/v1/completions` with `ignore_eos` and a fixed `max_tokens`, so every
request generates exactly the tokens asked for, and the token counts come from the server's own
`usage`, not from counting chunks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp


class RequestFailed(RuntimeError):
    """The server refused a request or cut its stream; the message is the server's."""


@dataclass
class Sample:
    """What one request took."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    """Time between consecutive chunks that carried text (the inter-token latencies)."""

    @property
    def decode_tokens_per_second(self) -> float:
        """This stream's generation rate after its first token."""
        decode_s = self.e2e_s - self.ttft_s
        return (self.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0


async def complete(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    prompt: str | list[int],
    max_tokens: int,
) -> Sample:
    """Stream one greedy completion of exactly `max_tokens` tokens and time it."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "cache": False,  # xllm's response cache would replay a repeat, not measure it
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sample = Sample()
    start = time.perf_counter()
    last = start
    try:
        async with session.post(base_url + "/v1/completions", json=body) as r:
            if r.status != 200:
                raise RequestFailed(_error_text(await r.text(), r.status))
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RequestFailed(_error_text(line[6:].decode(), r.status))
                now = time.perf_counter()
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    if sample.ttft_s == 0.0:
                        sample.ttft_s = now - start
                    else:
                        sample.gaps_s.append(now - last)
                    last = now
                usage = chunk.get("usage")
                if usage:
                    sample.prompt_tokens = int(usage["prompt_tokens"])
                    sample.completion_tokens = int(usage["completion_tokens"])
                    details = usage.get("prompt_tokens_details") or {}
                    sample.cached_tokens = int(details.get("cached_tokens") or 0)
    except aiohttp.ClientPayloadError:
        raise RequestFailed("the server cut the stream off in the middle") from None
    except aiohttp.ClientError as e:
        raise RequestFailed(f"lost the connection to the server at {base_url}: {e}") from None
    sample.e2e_s = time.perf_counter() - start
    if sample.completion_tokens == 0:
        raise RequestFailed("the stream ended without usage or generated text")
    return sample


def _error_text(body: str, status: int) -> str:
    try:
        error = json.loads(body).get("error", body)
    except (ValueError, AttributeError):
        return f"HTTP {status}: {body.strip()}"
    if isinstance(error, dict):
        error = error.get("message", error)
    return f"HTTP {status}: {error}"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks, as numpy's
    default does; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
