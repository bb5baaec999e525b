"""A toy xllm engine, as an out-of-tree plugin would write one.

It serves models in the `safetensors` format whose config.json names the architecture
`ReverseLM`, and answers a chat's last user message (or a completion's prompt) reversed, one
word per delta. It runs in the server's process: there is no model to load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from xllm.engine.plugins import LoadSpec, Manifest
from xllm.engine.protocol import ABI_VERSION, Capability, Delta, Request
from xllm.errors import InvalidRequest
from xllm.memory.planner import Plan
from xllm.models.metadata import ModelInfo

CONTEXT = 2048


class ReverseGeneration:
    def __init__(self, engine: ReverseEngine, words: list[str], n: int, delay: float) -> None:
        self.engine = engine
        self.words = words
        self.n = n
        self.delay = delay
        self.prompt_tokens: Sequence[int] = ()
        self.opens_thinking: bool | None = None
        self.cancelled = False

    async def deltas(
        self, is_disconnected: Callable[[], bool] | None = None
    ) -> AsyncIterator[list[Delta]]:
        self.engine.running += 1
        try:
            for i, word in enumerate(self.words):
                if self.cancelled or (is_disconnected is not None and is_disconnected()):
                    return
                text = word if i == 0 else " " + word
                yield [Delta(0, c, text) for c in range(self.n)]
                await asyncio.sleep(self.delay)
            usage = {"prompt_tokens": len(self.words), "completion_tokens": len(self.words)}
            yield [Delta(0, c, finish="stop", usage=usage) for c in range(self.n)]
        finally:
            self.engine.running -= 1
            self.engine.last_active = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True


class ReverseEngine:
    kind = "reverse"

    def __init__(self, spec: LoadSpec) -> None:
        self.name = spec.name
        self.key = spec.key
        self.info = ModelInfo(
            name=spec.name, path=spec.path, architecture=spec.architecture,
            context_length=CONTEXT, embedding_length=0, block_count=0, parameter_count=0,
            size=0, quantization="none", chat_template=None,
        )  # fmt: skip
        self.ctx_size = CONTEXT
        self.plan = spec.plan
        self.modelfile = spec.modelfile
        self.keep_alive = spec.options.keep_alive_s
        self.last_active = time.monotonic()
        self.on_exit: Callable[[Any], None] | None = None
        self.running = 0
        self.aborted: str | None = None

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.COMPLETION, Capability.CHAT})

    @property
    def pid(self) -> int | None:
        return None

    @property
    def busy(self) -> bool:
        return self.running > 0

    async def generate(self, request: Request) -> ReverseGeneration:
        if request.messages is not None:
            users = [m for m in request.messages if m.get("role") == "user"]
            text = str(users[-1].get("content") or "") if users else ""
        else:
            text = "".join(p.text for p in request.prompt)
        if not text.strip():
            raise InvalidRequest("the prompt is empty", param=request.param)
        words = text[::-1].split()
        limit = request.sampling.max_tokens
        if limit:
            words = words[:limit]
        delay = float(request.sampling.temperature or 0.0) / 10  # a knob to slow it down
        return ReverseGeneration(self, words, request.sampling.n, delay)

    def stats(self) -> dict[str, int | float]:
        return {"running": self.running}

    def expires_at(self) -> float | None:
        if self.keep_alive < 0:
            return None
        return time.time() + self.keep_alive - (time.monotonic() - self.last_active)

    def abort(self, reason: str) -> None:
        self.aborted = reason

    async def close(self) -> None:
        if self.on_exit is not None:
            self.on_exit(self)


async def _load(spec: LoadSpec) -> ReverseEngine:
    return ReverseEngine(spec)


def _estimate(spec: LoadSpec) -> Plan:
    return Plan(weights=0, kv=0, compute=0, output=0, layers=0, gpu_layers=0, vram=0)


MANIFEST = Manifest(
    name="reverse",
    version="0.1.0",
    abi=ABI_VERSION,
    formats=("safetensors",),
    architectures=frozenset({"ReverseLM"}),
    capabilities=frozenset({Capability.COMPLETION, Capability.CHAT}),
    load=_load,
    estimate=_estimate,
)
