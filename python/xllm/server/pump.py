"""The stream pump: the one place an engine's deltas become a response, for every dialect.

Each endpoint gives a `Sink`, which says how its records look (OpenAI SSE chunks, Responses
events, Ollama NDJSON); the rules are written once, here:

- an error before the first byte is a normal error response (the handler simply raises: the
  generation is started before the pump opens the stream);
- after it, the error goes into the stream in the sink's own format, then its terminator;
- a client that disconnects, or whose writes fail, cancels the generation in the engine;
- usage is counted over every choice (the prompt once), and handed to the sink as choices end.

`collect` runs a generation to its end for the non-streamed responses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from xllm.engine.protocol import Delta, Generation
from xllm.errors import EngineError, XllmError
from xllm.server import streaming
from xllm.server.http import peer_gone

log = logging.getLogger("xllm.server")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float = 0.0
    gen_ms: float = 0.0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    """Draft tokens (speculation, `prediction`) the model generated too, and those it did not."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, usage: Mapping[str, Any] | None) -> None:
        """Account one finished choice (the prompt is shared by all choices)."""
        if not usage:
            return
        self.prompt_tokens = int(usage.get("prompt_tokens", self.prompt_tokens))
        self.cached_tokens = max(self.cached_tokens, int(usage.get("cached_tokens", 0)))
        self.completion_tokens += int(usage.get("completion_tokens", 0))
        self.ttft_ms = max(self.ttft_ms, float(usage.get("ttft_ms", 0.0)))
        self.gen_ms = max(self.gen_ms, float(usage.get("gen_ms", 0.0)))
        self.accepted_prediction_tokens += int(usage.get("accepted_prediction_tokens", 0))
        self.rejected_prediction_tokens += int(usage.get("rejected_prediction_tokens", 0))

    def merge(self, other: Usage) -> None:
        """Another prompt's usage (a batch of prompts in one request)."""
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.accepted_prediction_tokens += other.accepted_prediction_tokens
        self.rejected_prediction_tokens += other.rejected_prediction_tokens

    def openai(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {
                "accepted_prediction_tokens": self.accepted_prediction_tokens,
                "rejected_prediction_tokens": self.rejected_prediction_tokens,
            },
        }


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[Any] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Result:
    choices: list[Choice]
    usage: Usage


def raise_if_failed(delta: Delta) -> None:
    """A delta that ends its choice with an error raises it: the server's own (shutting down,
    the runner gone) as it is, the engine's as a 500."""
    if delta.finish != "error":
        return
    if isinstance(delta.error, XllmError):
        raise delta.error
    raise EngineError(f"generation failed: {delta.error or 'unknown engine error'}")


async def collect(gen: Generation, is_disconnected: Callable[[], bool] | None) -> Result:
    """Run a generation to the end and gather its choices."""
    choices = [Choice(i) for i in range(gen.n)]
    usage = Usage()
    async for batch in gen.deltas(is_disconnected):
        for d in batch:
            raise_if_failed(d)
            choice = choices[d.choice]
            choice.text += d.text
            if d.logprobs:
                choice.logprobs.extend(d.logprobs)
            if d.tool_calls:
                choice.tool_calls.extend(d.tool_calls)
            if d.finish is not None:
                choice.finish_reason = d.finish
                usage.add(d.usage)
    return Result(choices, usage)


class Sink(Protocol):
    """How one endpoint writes a streamed generation."""

    content_type: str

    def opening(self) -> bytes:
        """What goes first (OpenAI's role chunks, Responses' `response.created`...)."""

    def delta(self, d: Delta) -> bytes:
        """The record(s) for a delta's text, log-probabilities or call pieces (b"": none yet)."""

    async def finished(self, d: Delta, usage: Usage, running: int) -> bytes:
        """A choice ended (after its `delta`); `running` choices are left, `usage` so far."""

    async def closing(self, usage: Usage) -> bytes:
        """The end of a stream whose choices all finished: last records and terminator."""

    def error(self, e: XllmError) -> bytes:
        """An error event in the stream's format, and its terminator."""


async def stream(request: web.Request, gen: Generation, sink: Sink) -> web.StreamResponse:
    """Run a started generation as a streamed response through `sink`."""
    response = await streaming.open_stream(request, sink.content_type)
    out = bytearray(sink.opening())
    usage = Usage()
    running = gen.n
    try:
        async for batch in gen.deltas(lambda: peer_gone(request)):
            for d in batch:
                if d.text or d.logprobs or d.tool_calls:
                    out += sink.delta(d)
                if d.finish is not None:
                    raise_if_failed(d)
                    usage.add(d.usage)
                    running = 0 if d.choice < 0 else running - 1
                    out += await sink.finished(d, usage, running)
            if out:
                if not await streaming.write(response, bytes(out)):
                    gen.cancel()
                    return response
                out.clear()
    except XllmError as e:
        gen.cancel()
        log.warning("stream ended with an error: %s", e.message)
        await streaming.finish(response, bytes(out) + sink.error(e))
        return response
    if peer_gone(request):
        return response
    await streaming.finish(response, bytes(out) + await sink.closing(usage))
    return response
