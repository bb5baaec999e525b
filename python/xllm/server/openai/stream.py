"""OpenAI's SSE streams of chat and text completions: one sink each endpoint specializes."""

from __future__ import annotations

from typing import Any

import orjson

from xllm import _core
from xllm.engine.protocol import Delta
from xllm.errors import XllmError
from xllm.server.pump import Usage

Entries = list[Any] | None


def sse_chunk(head: dict[str, Any], choice: dict[str, Any], **top: Any) -> bytes:
    return b"data: " + orjson.dumps({**head, "choices": [choice], **top}) + b"\n\n"


class ChunkSink:
    """An OpenAI SSE stream (a `pump.Sink`), with its usage: on a chunk of its own after the
    last choice's when the client asks for that (`include_usage`, OpenAI's contract: then no
    other chunk has usage, and clients that sum it over chunks count it once), else on the
    last. Subclasses write the chunks."""

    content_type = "text/event-stream"

    def __init__(self, head: dict[str, Any], n: int, include_usage: bool, logprobs: bool) -> None:
        self.head = head
        self.n = n
        self.include_usage = include_usage
        self.want_logprobs = logprobs

    def chunk(
        self, index: int, text: str, finish: str | None, logprobs: Entries, **top: Any
    ) -> bytes:
        raise NotImplementedError

    def opening(self) -> bytes:
        return b""

    def delta(self, d: Delta) -> bytes:
        return self.chunk(d.choice, d.text, None, d.logprobs if self.want_logprobs else None)

    async def finished(self, d: Delta, usage: Usage, running: int) -> bytes:
        top = {"usage": usage.openai()} if running == 0 and not self.include_usage else {}
        return self.chunk(d.choice, "", d.finish, [] if self.want_logprobs else None, **top)

    async def closing(self, usage: Usage) -> bytes:
        if not self.include_usage:
            return _core.SSE_DONE
        last = {**self.head, "choices": [], "usage": usage.openai()}
        return b"data: " + orjson.dumps(last) + b"\n\n" + _core.SSE_DONE

    def error(self, e: XllmError) -> bytes:
        return b"data: " + orjson.dumps(e.openai_body()) + b"\n\n" + _core.SSE_DONE


class FramedSink(ChunkSink):
    """A sink whose text chunks are the text in a fixed frame per choice: each token's chunk
    is written by the Rust codec (`DeltaFramer`) around its JSON-escaped text; a subclass
    that rewrites text before it goes out says `framed = False`."""

    framed = True

    def __init__(self, head: dict[str, Any], n: int, include_usage: bool, logprobs: bool) -> None:
        super().__init__(head, n, include_usage, logprobs)
        self.framers: list[_core.DeltaFramer] = []

    def delta(self, d: Delta) -> bytes:
        if self.want_logprobs or not self.framed:
            return super().delta(d)
        if not self.framers:
            for i in range(self.n):
                prefix, suffix = self.chunk(i, "\x00", None, None)[6:-2].split(b'"\\u0000"')
                self.framers.append(_core.DeltaFramer(prefix, suffix))
        framer: _core.DeltaFramer = self.framers[d.choice]
        return framer.frame(d.text)
