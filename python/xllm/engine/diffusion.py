"""The diffusion engine as the server sees it: one diffusion model (SD 1.x, SDXL, FLUX...) on
stable-diffusion.cpp, in its own runner process (engine/diffusion_runner.py).

stable-diffusion.cpp is the optional dependency `stable-diffusion-cpp-python` (a source-only
package: `pip install 'xllm[images]'` compiles it); without it a diffusion model is a 400 that
names the extra, before anything loads. The model paints (`Painter`); asked to chat or complete
text it refuses with a 400 naming `model`.

stable-diffusion.cpp has no way to abort a generation: when a client goes away from the one
generation its runner is working on, with nothing else waiting, the runner is killed and the
scheduler loads the model again in a new one right away, in the background (so the next
request does not wait for the load). With other requests waiting the cancelled generation runs
to its end and is dropped, so they are not lost.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from xllm.engine import diffusion_runner
from xllm.engine.plugins import LoadSpec, Manifest
from xllm.engine.process import ProcessClient, Spawned, Stream
from xllm.engine.protocol import (
    ABI_VERSION,
    Capability,
    Generation,
    ImageGeneration,
    Request,
)
from xllm.errors import InvalidRequest
from xllm.memory.planner import Plan
from xllm.models import folders
from xllm.models.metadata import ModelInfo

log = logging.getLogger("xllm.engine")

PACKAGE = "stable-diffusion-cpp-python"
EXTRA = "pip install 'xllm[images]'"
BASE = 160 << 20
PER_PIXEL = 2 << 10
"""What a diffusion runner takes beside its model's files is BASE + PER_PIXEL x the image's
pixels: the interpreter, Pillow, stable-diffusion.cpp, and its compute buffers, mostly the
decoder's, which grow with the image (measured: a peak resident memory of 678 MiB at 512x512
for the tests' tiny FLUX.2-klein model and its 24 MiB of files, 293 MiB at 256x256)."""
PLANNED_PIXELS = 512 * 512
"""The image size a model's memory plan holds (the default size). A larger image's extra is
checked against free memory when it is asked for (`DiffusionClient.extra_memory`), rather than
planned for `images.max_pixels`: 2048x2048 would hold 8 GiB per model for the odd large image."""


def overhead(pixels: int) -> int:
    """A diffusion runner's memory beside its model's files, for images of `pixels`."""
    return BASE + PER_PIXEL * pixels


class DiffusionPainting(Stream[list[bytes]]):
    """One generation as the runner reports it (a `protocol.Painting`)."""

    def __init__(self, model: DiffusionClient, rid: int) -> None:
        super().__init__(model, rid)
        self.seconds = 0.0
        self.step = 0
        self.steps = 0

    async def images(self, is_disconnected: Callable[[], bool] | None = None) -> list[bytes]:
        made: list[bytes] = []
        async for images in self._read(is_disconnected):  # one item, then the end
            made = images
        return made


class DiffusionClient(ProcessClient[DiffusionPainting]):
    """A diffusion model in its runner process (a `protocol.Engine` and `Painter`)."""

    kind = "stable-diffusion.cpp"
    engine = "diffusion"

    def __init__(self, spec: LoadSpec, ready: tuple[Any, ...], spawned: Spawned) -> None:
        super().__init__(spec, ready, spawned)
        self.info: ModelInfo = ready[0]
        self.samplers: Sequence[str] = ready[1]
        self._current: int | None = None
        """The generation the runner is working on."""
        self.restart = False
        """Set when the runner is stopped to cancel a generation: the scheduler loads the
        model again at once, so the next request finds it loaded."""

    @classmethod
    async def load(cls, spec: LoadSpec) -> DiffusionClient:
        return cls(spec, *await cls.spawn(spec))

    def _dispatch(self, p: DiffusionPainting, op: str, args: tuple[Any, ...]) -> None:
        if op == diffusion_runner.START:
            self._current = p.rid
        elif op == diffusion_runner.STEP:
            p.step, p.steps = args
            log.debug("model %s: image %d, step %d of %d", self.name, p.rid, p.step, p.steps)
        elif op == diffusion_runner.DONE:
            error, images, p.seconds = args
            self._current = None
            if error is None:
                p.put(images)
            self._done(p, error)

    def _finish(self, rid: int) -> None:
        """A generation cancelled: the runner drops it if it waits; if it is the one running
        and nothing else waits, the runner is stopped."""
        working = rid == self._current and rid in self._running
        super()._finish(rid)
        if working and not self._running and not self._pending and self.alive:
            log.info("model %s: a generation was cancelled; stopping its runner "
                     "(stable-diffusion.cpp cannot abort one)", self.name)  # fmt: skip
            self._closing = True  # an expected end, not a crash to report
            self.restart = True
            self._proc.kill()

    # --- the engine protocol ----------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.IMAGE_GENERATION})

    async def generate(self, request: Request) -> Generation:
        raise InvalidRequest(
            f"model {self.name!r} is an image generation model: it makes pictures "
            "(POST /v1/images/generations) and does not generate text",
            param="model",
        )

    def extra_memory(self, width: int, height: int) -> int:
        planned = self.plan.compute if self.plan is not None else overhead(PLANNED_PIXELS)
        return max(overhead(width * height) - planned, 0)

    async def paint(self, request: ImageGeneration) -> DiffusionPainting:
        """Queue the generation in the runner (a 503 when its queue is full)."""
        if request.sampler is not None and request.sampler not in self.samplers:
            raise InvalidRequest(
                f"sampler: {request.sampler!r} is not a sampler of stable-diffusion.cpp "
                f"(it has {', '.join(self.samplers)})",
                param="sampler",
            )
        painting, _ = await self._submit(request, lambda rid: DiffusionPainting(self, rid))
        return painting


def installed() -> str | None:
    """stable-diffusion-cpp-python's version, None when it is not installed."""
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def _estimate(spec: LoadSpec) -> Plan:
    """The model's files and a measured overhead for a 512x512 image, in RAM; a 400 naming
    the extra to install when stable-diffusion.cpp is missing."""
    if installed() is None:
        raise InvalidRequest(
            f"model {spec.name!r} is a diffusion model, and image generation needs "
            f"{PACKAGE}, which this installation lacks: {EXTRA} (it compiles "
            "stable-diffusion.cpp, about 15 minutes on 2 cores)",
            param="model",
        )
    return Plan(weights=folders.size(spec.path), kv=0, compute=overhead(PLANNED_PIXELS),
                output=0, layers=0, gpu_layers=0, vram=0)  # fmt: skip


async def _load(spec: LoadSpec) -> DiffusionClient:
    options = dataclasses.replace(spec.options, splits=(), adapters=())
    return await DiffusionClient.load(dataclasses.replace(spec, options=options))


MANIFEST = Manifest(
    name="stable-diffusion.cpp",
    version=installed() or "not installed",
    abi=ABI_VERSION,
    formats=("diffusion",),
    architectures=frozenset({"*"}),
    capabilities=frozenset({Capability.IMAGE_GENERATION}),
    load=_load,
    estimate=_estimate,
)
"""The built-in image generation engine: diffusion models on stable-diffusion.cpp, each in its
own runner process."""
