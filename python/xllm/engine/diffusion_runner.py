"""The diffusion runner: a child process that hosts one diffusion model on stable-diffusion.cpp
(`xllm runner --engine diffusion`, not for users).

stable-diffusion.cpp links a ggml of its own, which must never share a process with
llama.cpp's, and a crash in it takes down this process only (engine/diffusion.py fails that
model's requests and the next request loads it again). One generation at a time, first come
first served (stable-diffusion.cpp spreads one over every thread it has); its step progress is
sent as it goes. stable-diffusion.cpp cannot stop a generation: a cancelled one still queued is
dropped, a running one runs to its end unless the server stops this process.

Images come out at the requested size exactly: generated at the next multiples of 16 (what the
model families need), then cropped to the centre (scaled instead, should a model give less).

    server -> runner   (SUBMIT, rid, ImageGeneration) · (CANCEL, rid) · (CLOSE,)
    runner -> server   (READY, ModelInfo, samplers) | (FAILED, message) at start
                       (REPLY, rid, WireError | None): queued, or refused
                       (START, rid) · (STEP, rid, step, steps)
                       (DONE, rid, WireError | None, [encoded images], seconds) · (BEAT, stats)
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from xllm.engine import ipc, process
from xllm.engine.options import EngineOptions
from xllm.engine.protocol import ImageGeneration
from xllm.errors import Overloaded
from xllm.models import diffusion

if TYPE_CHECKING:
    from stable_diffusion_cpp import StableDiffusion

log = logging.getLogger("xllm.runner")

START = "start"
STEP = "step"
DONE = "done"
MULTIPLE = 16
"""Sizes stable-diffusion.cpp generates at: multiples of the VAE's 8 times FLUX's patch of 2."""
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def main(fd: int, name: str, path: Path, options_json: str) -> int:
    return process.main(fd, name, path, options_json, _load, _Runner)


def samplers() -> list[str]:
    """The sampling methods stable-diffusion.cpp offers (its binding's names)."""
    from stable_diffusion_cpp.stable_diffusion import SAMPLE_METHOD_MAP

    return [k for k, v in SAMPLE_METHOD_MAP.items() if v is not None and k != "sample_method_count"]


def load(path: Path, options: EngineOptions) -> StableDiffusion:
    """The model in folder `path`: each part's file given as stable-diffusion.cpp's
    `<part>_path`; decode-only (text to image needs no VAE encoder)."""
    from stable_diffusion_cpp import StableDiffusion

    parts = {f"{diffusion.part(p.name)}_path": str(p) for p in sorted(path.iterdir())
             if diffusion.is_file(p.name)}  # fmt: skip
    return StableDiffusion(
        **parts, n_threads=options.resolved_threads(), vae_decode_only=True, verbose=True
    )


def up(n: int) -> int:
    return -(-n // MULTIPLE) * MULTIPLE


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` at exactly width x height: its centre cropped (scaled where it is smaller), as a
    new RGB image that carries none of the binding's metadata."""
    if image.width < width or image.height < height:
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    cropped = image.convert("RGB").crop((left, top, left + width, top + height))
    return Image.frombytes("RGB", (width, height), cropped.tobytes())


def encode(image: Image.Image, fmt: str, quality: int | None) -> bytes:
    out = io.BytesIO()
    options: dict[str, Any] = (
        {} if fmt == "png" else {"quality": 90 if quality is None else quality}
    )
    image.save(out, format=PIL_FORMATS[fmt], **options)
    return out.getvalue()


def run(
    sd: StableDiffusion, job: ImageGeneration, progress: Callable[[int, int, float], None]
) -> list[bytes]:
    """The job's images, encoded; `progress` is called after every step."""
    extra: dict[str, Any] = {}
    if job.steps is not None:
        extra["sample_steps"] = job.steps
    if job.cfg_scale is not None:
        extra["cfg_scale"] = job.cfg_scale
    if job.sampler is not None:
        extra["sample_method"] = job.sampler
    images = sd.generate_image(
        prompt=job.prompt, negative_prompt=job.negative_prompt, width=up(job.width),
        height=up(job.height), seed=job.seed, batch_count=job.n, progress_callback=progress,
        **extra,
    )  # fmt: skip
    if len(images) != job.n:
        raise RuntimeError(f"stable-diffusion.cpp made {len(images)} images, not {job.n}")
    return [encode(fit(i, job.width, job.height), job.output_format, job.quality) for i in images]


def _load(name: str, path: Path, options: EngineOptions) -> tuple[tuple[Any, ...], StableDiffusion]:
    model = load(path, options)
    return (process.folder_info(name, path), samplers()), model


class _Runner:
    def __init__(
        self, model: StableDiffusion, writer: asyncio.StreamWriter, options: EngineOptions
    ) -> None:
        self.model = model
        self.writer = writer
        self.max_queue = options.max_queue
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, ImageGeneration]] = asyncio.Queue()
        self.cancelled: set[int] = set()
        self.queued: set[int] = set()
        self.stats: dict[str, int | float] = {
            "running": 0, "queue_depth": 0, "requests_total": 0, "images_generated_total": 0,
            "diffusion_steps_total": 0, "diffusion_step": 0, "diffusion_steps": 0,
        }  # fmt: skip

    def send(self, message: tuple[Any, ...]) -> None:
        self.writer.write(ipc.encode(message))

    async def submit(self, rid: int, request: ImageGeneration) -> None:
        if len(self.queued) + self.stats["running"] >= max(self.max_queue, 1):
            error = ipc.wire_error(Overloaded("too many images are waiting for this model"))
            self.send((ipc.REPLY, rid, error))
            return
        self.queued.add(rid)
        self.queue.put_nowait((rid, request))
        self.stats["requests_total"] += 1
        self.send((ipc.REPLY, rid, None))

    def cancel(self, rid: int) -> None:
        if rid in self.queued:
            self.cancelled.add(rid)

    async def work(self) -> None:
        while True:
            rid, job = await self.queue.get()
            self.queued.discard(rid)
            if rid in self.cancelled:
                self.cancelled.discard(rid)
                continue
            self.stats["running"] = 1
            self.send((START, rid))
            started = time.perf_counter()

            def progress(step: int, steps: int, _: float, rid: int = rid) -> None:
                self.loop.call_soon_threadsafe(self._step, rid, step, steps)

            images: list[bytes] = []
            error = None
            try:
                images = await asyncio.to_thread(run, self.model, job, progress)
            except Exception as e:  # a failure of this request only: the runner carries on
                log.exception("image generation %d failed", rid)
                error = ipc.wire_error(e)
            self.send((DONE, rid, error, images, time.perf_counter() - started))
            self.stats["images_generated_total"] += len(images)
            self.stats["running"] = self.stats["diffusion_step"] = self.stats["diffusion_steps"] = 0

    def _step(self, rid: int, step: int, steps: int) -> None:
        self.stats["diffusion_steps_total"] += 1
        self.stats["diffusion_step"], self.stats["diffusion_steps"] = step, steps
        self.send((STEP, rid, step, steps))

    def stop(self) -> None:
        """The server closes the runner: a generation under way cannot be stopped, and would
        hold the exit until it ends, so the process ends now."""
        self.cancelled |= self.queued
        if self.stats["running"]:
            os._exit(0)

    async def beat(self) -> None:
        await process.beat(self.stats, self.queue, self.send)
