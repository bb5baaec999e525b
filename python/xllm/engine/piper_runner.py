"""The Piper runner: a child process that hosts one Piper voice (`xllm runner --engine piper`,
not for users).

A crash in onnxruntime or espeak-ng takes down this process only (engine/piper.py fails that
voice's requests and the next request loads it again). A request's text is phonemized and cut
into pieces when it arrives (engine/piper_voice.py), so text with nothing to say is refused at
once. Then the requests take turns a piece at a time, in the order they came: a second request
hears its first piece after one piece of the first, not after all of it, and onnxruntime spreads
each piece over every thread the runner has. Each piece's samples go to the server as soon as
they are made; a cancelled request stops at the next piece.

    server -> runner   (SUBMIT, rid, Speech) · (CANCEL, rid) · (CLOSE,)
    runner -> server   (READY, ModelInfo, voices, sample rate) | (FAILED, message) at start
                       (REPLY, rid, WireError | None, phoneme ids): planned, or refused
                       (AUDIO, rid, samples) · (DONE, rid, WireError | None, frames, seconds)
                       (BEAT, stats)
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xllm.engine import ipc, process
from xllm.engine.options import EngineOptions
from xllm.engine.piper_voice import Loudness, Voice
from xllm.engine.protocol import Speech
from xllm.errors import InvalidRequest, Overloaded
from xllm.models import summary
from xllm.models.metadata import ModelInfo

log = logging.getLogger("xllm.runner")

AUDIO = "audio"
DONE = "done"
BEAT_S = 0.5


def main(fd: int, name: str, path: Path, options_json: str) -> int:
    return process.main(fd, name, path, options_json, _load, _Runner)


@dataclass
class _Job:
    rid: int
    pieces: collections.deque[list[int]]
    speaker: int | None
    speed: float
    loudness: Loudness
    samples: int = 0
    seconds: float = 0.0
    cancelled: bool = False


def _load(name: str, path: Path, options: EngineOptions) -> tuple[tuple[Any, ...], Voice]:
    voice = Voice(path, options.resolved_threads(), options.gpu_layers != 0)
    return (info(name, path), voice.voices, voice.sample_rate), voice


class _Runner:
    def __init__(self, voice: Voice, writer: asyncio.StreamWriter, options: EngineOptions) -> None:
        self.voice = voice
        self.writer = writer
        self.max_queue = options.max_queue
        self.jobs: dict[int, _Job] = {}
        self.turns: collections.deque[_Job] = collections.deque()
        self.wake = asyncio.Event()
        self.planning = 0
        self.stats: dict[str, int | float] = {
            "running": 0, "queue_depth": 0, "requests_total": 0, "audio_seconds_total": 0.0,
        }  # fmt: skip

    def send(self, message: tuple[Any, ...]) -> None:
        self.writer.write(ipc.encode(message))

    async def submit(self, rid: int, request: Speech) -> None:
        """Check and plan the request, then give it its turns; the reply says which."""
        self.planning += 1
        try:
            if len(self.jobs) + self.planning > self.max_queue:
                raise Overloaded("too many syntheses are waiting for this voice; try again")
            if request.voice is not None and request.voice not in self.voice.voices:
                raise InvalidRequest(
                    f"voice: {request.voice!r} is not a voice of this model (it has "
                    f"{', '.join(self.voice.voices)})",
                    param="voice",
                )
            ids = await asyncio.to_thread(self.voice.plan, request.text)
        except Exception as e:  # every failure reaches the server, which waits for this reply
            self.send((ipc.REPLY, rid, ipc.wire_error(e), None))
            return
        finally:
            self.planning -= 1
        job = _Job(rid, collections.deque(ids), self.voice.speaker(request.voice),
                   request.speed, Loudness())  # fmt: skip
        self.jobs[rid] = job
        self.turns.append(job)
        self.wake.set()
        self.stats["requests_total"] += 1
        self.send((ipc.REPLY, rid, None, sum(len(p) for p in ids)))

    def cancel(self, rid: int) -> None:
        job = self.jobs.pop(rid, None)
        if job is not None:
            job.cancelled = True

    async def work(self) -> None:
        """Round robin over the requests, a piece per turn."""
        while True:
            while not self.turns:
                self.wake.clear()
                await self.wake.wait()
            job = self.turns.popleft()
            if job.cancelled:
                continue
            try:
                samples = await asyncio.to_thread(self._piece, job)
            except Exception as e:  # a failure of this request only: the runner carries on
                log.exception("synthesis %d failed", job.rid)
                self.jobs.pop(job.rid, None)
                self.send((DONE, job.rid, ipc.wire_error(e), 0, job.seconds))
                continue
            if job.cancelled:
                continue
            self.send((AUDIO, job.rid, samples))
            if job.pieces:
                self.turns.append(job)
            else:
                self.jobs.pop(job.rid, None)
                self.send((DONE, job.rid, None, self.voice.frames(job.samples), job.seconds))

    def _piece(self, job: _Job) -> bytes:
        started = time.perf_counter()
        audio = self.voice.synthesize(job.pieces.popleft(), job.speaker, job.speed)
        samples = job.loudness.apply(audio)
        job.seconds += time.perf_counter() - started
        job.samples += len(audio)
        self.stats["audio_seconds_total"] += len(audio) / self.voice.sample_rate
        return samples

    def stop(self) -> None:
        for job in self.turns:
            job.cancelled = True

    async def beat(self) -> None:
        while True:
            # every admitted request is running: they take turns; waiting ones are being planned
            self.stats["running"] = len(self.jobs)
            self.stats["queue_depth"] = self.planning
            self.send((ipc.BEAT, dict(self.stats)))
            await asyncio.sleep(BEAT_S)


def info(name: str, path: Path) -> ModelInfo:
    facts = summary.of_file(path)
    files = list(path.iterdir()) if path.is_dir() else list(path.parent.glob(f"{path.name}*"))
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in facts.model_info.items()}
    return ModelInfo(
        name=name, path=path, architecture=facts.architecture, context_length=0,
        embedding_length=0, block_count=0, parameter_count=facts.parameter_count,
        size=sum(p.stat().st_size for p in files if p.is_file()),
        quantization=facts.quantization, chat_template=None, metadata=meta,
        format=facts.format,
    )  # fmt: skip
