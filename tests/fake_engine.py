"""A fake engine behind the real engine seam, for in-process HTTP tests of what needs no model.

It is registered like any plugin (an `Engines` with its manifest) and serves a model folder
whose config.json names the architecture `FakeLM`. What it does is driven by the prompt (the
last user message, or a completion's text):

- `fail-before`: `generate` raises a 400 (a client's mistake found by the engine);
- `fail-after`: two words, then the generation fails (an engine error mid-stream);
- `slow ...`: the words of the prompt, one every 50 ms (for disconnects);
- anything else: the prompt's words, echoed one per delta, then `stop`.

A model folder whose architecture is `FakeVLM` has the `vision` capability: each image the
request carries (decoded `Image`s, in its messages or prompt parts) is echoed first as a word
`image:<width>x<height>:<digest's first 8 characters>`.

At most `LIMIT` generations run at once; more are refused with a 503, as a full queue is.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from xllm.engine.plugins import Engines, LoadSpec, Manifest
from xllm.engine.protocol import ABI_VERSION, Capability, Delta, Generation, Image, Request
from xllm.errors import InvalidRequest, Overloaded
from xllm.memory.planner import Plan
from xllm.models.metadata import ModelInfo

LIMIT = 2
CAPABILITIES = frozenset({Capability.COMPLETION, Capability.CHAT})
VISION = CAPABILITIES | {Capability.VISION}


class FakeGeneration:
    def __init__(self, engine: FakeEngine, words: list[str], n: int, mode: str) -> None:
        self.engine = engine
        self.words = words
        self.n = n
        self.mode = mode
        self.prompt_tokens: Sequence[int] = ()
        self.opens_thinking: bool | None = None
        self.cancelled = False
        self.finished = False

    async def deltas(
        self, is_disconnected: Callable[[], bool] | None = None
    ) -> AsyncIterator[list[Delta]]:
        try:
            for i, word in enumerate(self.words):
                if self.cancelled or (is_disconnected is not None and is_disconnected()):
                    self.cancel()
                    return
                if self.mode == "fail-after" and i == 2:
                    yield [Delta(0, -1, finish="error", error="the fake engine broke")]
                    return
                yield [Delta(0, c, word if i == 0 else " " + word) for c in range(self.n)]
                await asyncio.sleep(0.05 if self.mode == "slow" else 0)
            usage = {"prompt_tokens": len(self.words), "completion_tokens": len(self.words)}
            yield [Delta(0, c, finish="stop", usage=usage) for c in range(self.n)]
            self.finished = True
        finally:
            self.engine.running.discard(self)

    def cancel(self) -> None:
        self.cancelled = True
        self.engine.running.discard(self)


class FakeModel:
    """What every fake engine's model is: named and planned by its load spec, in no process of
    its own, never busy, with nothing to report or close; it generates no text. Subclasses
    (the fake text engine here, the fake painter and voice of their tests) add what they do."""

    kind = "fake-model"
    capability_set: ClassVar[frozenset[Capability]] = frozenset()

    def __init__(self, spec: LoadSpec, context_length: int = 0) -> None:
        self.name = spec.name
        self.key = spec.key
        self.info = ModelInfo(
            name=spec.name, path=spec.path, architecture=spec.architecture,
            context_length=context_length, embedding_length=0, block_count=0,
            parameter_count=0, size=0, quantization="none", chat_template=None,
        )  # fmt: skip
        self.ctx_size = context_length
        self.plan = spec.plan
        self.modelfile = spec.modelfile
        self.keep_alive = spec.options.keep_alive_s
        self.last_active = time.monotonic()
        self.on_exit: Callable[[Any], None] | None = None

    @property
    def capabilities(self) -> frozenset[Capability]:
        return self.capability_set

    @property
    def pid(self) -> int | None:
        return None

    @property
    def busy(self) -> bool:
        return False

    async def generate(self, request: Request) -> Generation:
        raise InvalidRequest(f"model {self.name!r} does not generate text", param="model")

    def stats(self) -> dict[str, int | float]:
        return {}

    def expires_at(self) -> float | None:
        return None

    def abort(self, reason: str) -> None:
        pass

    async def close(self) -> None:
        pass


class FakeEngine(FakeModel):
    kind = "fake"
    instances: ClassVar[list[FakeEngine]] = []
    """Every engine loaded, for tests to look into."""

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec, context_length=4096)
        self.running: set[FakeGeneration] = set()
        self.generations: list[FakeGeneration] = []
        self.requests: list[Request] = []
        """Every request `generate` was given, as the serving layer made it."""
        FakeEngine.instances.append(self)

    @property
    def capabilities(self) -> frozenset[Capability]:
        return VISION if self.info.architecture == "FakeVLM" else CAPABILITIES

    @property
    def busy(self) -> bool:
        return bool(self.running)

    async def generate(self, request: Request) -> FakeGeneration:
        self.requests.append(request)
        images: list[Image] = []
        if request.messages is not None:
            users = [m for m in request.messages if m.get("role") == "user"]
            text = str(users[-1].get("content") or "") if users else ""
            images = [x for m in request.messages for x in m.get("images") or ()]
        else:
            text = "".join(p.text for p in request.prompt)
            images = [p.image for p in request.prompt if p.image is not None]
        assert all(isinstance(x, Image) for x in images), "images reach engines decoded"
        words = [f"image:{x.width}x{x.height}:{x.digest[:8]}" for x in images] + text.split()
        mode = next((w for w in words if not w.startswith("image:")), "")
        if mode == "fail-before":
            raise InvalidRequest("the fake engine refuses this prompt", param=request.param)
        if len(self.running) >= LIMIT:
            raise Overloaded(f"{LIMIT} requests are already running; try again")
        gen = FakeGeneration(self, words, request.sampling.n, mode)
        self.running.add(gen)
        self.generations.append(gen)
        self.last_active = time.monotonic()
        return gen

    def stats(self) -> dict[str, int | float]:
        return {"running": len(self.running)}

    async def close(self) -> None:
        if self.on_exit is not None:
            self.on_exit(self)


async def _load(spec: LoadSpec) -> FakeEngine:
    return FakeEngine(spec)


def _estimate(spec: LoadSpec) -> Plan:
    return Plan(weights=0, kv=0, compute=0, output=0, layers=0, gpu_layers=0, vram=0)


MANIFEST = Manifest(
    name="fake",
    version="1",
    abi=ABI_VERSION,
    formats=("safetensors",),
    architectures=frozenset({"FakeLM", "FakeVLM"}),
    capabilities=VISION,
    load=_load,
    estimate=_estimate,
)


def engines() -> Engines:
    return Engines([MANIFEST])


def model_folder(root: Path, architecture: str = "FakeLM") -> Path:
    """A model folder as a Hugging Face model is stored: config.json and a (tensorless)
    safetensors file."""
    root.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"architectures": [architecture]}
    if architecture == "FakeVLM":
        config["vision_config"] = {"image_size": 32}
    (root / "config.json").write_text(json.dumps(config))
    header = b"{}      "
    (root / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return root
