"""The Whisper runner: a child process that hosts one Whisper model on faster-whisper
(`xllm runner --engine whisper`, not for users).

A crash in CTranslate2 or FFmpeg takes down this process only (engine/whisper.py fails that
model's requests and the next request reloads it). Uploads are decoded as they arrive, each on
a worker thread, so a file that does not decode is refused at once; decoded audio then waits
its turn: one transcription at a time, first come first served (CTranslate2 already spreads
one over every thread it has), its segments sent as they are decoded.

    server -> runner   (SUBMIT, rid, Transcription) · (CANCEL, rid) · (CLOSE,)
    runner -> server   (READY, ModelInfo) | (FAILED, message) at start
                       (REPLY, rid, WireError | None, seconds of audio): decoded, or refused
                       (INFO, rid, language, probability) · (SEGMENT, rid, Segment)
                       (DONE, rid, WireError | None) · (BEAT, stats)
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xllm.engine import ipc, process
from xllm.engine.options import EngineOptions
from xllm.engine.protocol import Segment, Transcription, Word
from xllm.errors import InvalidRequest, Overloaded
from xllm.models.metadata import ModelInfo

if TYPE_CHECKING:
    import numpy as np
    from faster_whisper import WhisperModel

log = logging.getLogger("xllm.runner")

INFO = "info"
SEGMENT = "segment"
DONE = "done"
SAMPLE_RATE = 16_000
MAX_AUDIO_S = 3600.0
"""The longest upload decoded (an hour is 230 MB of samples)."""
DECODERS = 2
"""Uploads decoded at once (each holds its file and samples in memory)."""
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""Greedy first, then warmer where a segment fails its checks (OpenAI's and faster-whisper's
default)."""


def main(fd: int, name: str, path: Path, options_json: str) -> int:
    return process.main(fd, name, path, options_json, _load, _Runner)


def device(options: EngineOptions) -> tuple[str, str]:
    """(device, compute type): CUDA in float16 with int8 weights where a GPU is there and
    allowed (`gpu_layers` 0 keeps models off GPUs), else int8 on the CPU."""
    import ctranslate2

    if options.gpu_layers != 0 and ctranslate2.get_cuda_device_count() > 0:
        return "cuda", "int8_float16"
    return "cpu", "int8"


def load(path: Path, options: EngineOptions) -> WhisperModel:
    from faster_whisper import WhisperModel

    where, compute = device(options)
    return WhisperModel(
        str(path), device=where, compute_type=compute, cpu_threads=options.resolved_threads()
    )


def decode(data: bytes, max_seconds: float = MAX_AUDIO_S) -> np.ndarray[Any, Any]:
    """16 kHz mono float samples of an uploaded file (as faster-whisper's `decode_audio`,
    stopping past `max_seconds`: a small file of a low-bitrate codec can hold hours); a 400
    naming `file` for one PyAV cannot decode, too long, or that holds no sound."""
    import gc

    import av
    import numpy as np

    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    pieces: list[np.ndarray[Any, Any]] = []
    total, limit = 0, int(max_seconds * SAMPLE_RATE)

    def add(frames: list[av.AudioFrame]) -> None:
        nonlocal total
        for out in frames:
            samples = out.to_ndarray().reshape(-1)
            pieces.append(samples)
            total += len(samples)
        if total > limit:
            raise InvalidRequest(
                f"file: the audio is longer than {max_seconds / 60:g} minutes", param="file"
            )

    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise InvalidRequest("file: the file has no audio stream", param="file")
            frames = container.decode(audio=0)
            while True:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except av.InvalidDataError:  # a damaged frame: skipped, as faster-whisper does
                    continue
                frame.pts = None  # resampled in order, whatever the timestamps say
                add(resampler.resample(frame))
            add(resampler.resample(None))
    except (av.FFmpegError, ValueError) as e:
        raise InvalidRequest(f"file: the audio could not be decoded ({e})", param="file") from None
    finally:
        del resampler
        gc.collect()  # PyAV's resampler holds buffers until collected (faster-whisper #390)
    if not total:
        raise InvalidRequest("file: the file holds no audio", param="file")
    audio: np.ndarray[Any, Any] = np.concatenate(pieces).astype(np.float32) / 32768.0
    return audio


def run(
    model: WhisperModel,
    audio: np.ndarray[Any, Any],
    job: Transcription,
    stop: threading.Event,
    send: Callable[[tuple[Any, ...]], None],
) -> None:
    """Transcribe `audio`, sending its language and then each segment as it is decoded,
    until it ends or `stop` is set."""
    segments, info = model.transcribe(
        audio,
        task=job.task,
        language=job.language,
        initial_prompt=job.prompt or None,
        temperature=job.temperature if job.temperature else TEMPERATURES,
        word_timestamps=job.words,
    )
    send((INFO, info.language, float(info.language_probability)))
    for s in segments:
        if stop.is_set():
            return
        send((SEGMENT, segment(s)))


def segment(s: Any) -> Segment:
    """faster-whisper's segment as the engine seam's."""
    words = tuple(
        Word(float(w.start), float(w.end), w.word, float(w.probability)) for w in s.words or ()
    )  # numpy floats there: plain ones cross the wire and serialise
    return Segment(
        id=s.id - 1,  # faster-whisper counts from 1, OpenAI from 0
        start=float(s.start), end=float(s.end), text=s.text, seek=int(s.seek),
        tokens=tuple(map(int, s.tokens)), temperature=float(s.temperature or 0.0),
        avg_logprob=float(s.avg_logprob), compression_ratio=float(s.compression_ratio),
        no_speech_prob=float(s.no_speech_prob), words=words,
    )  # fmt: skip


@dataclass
class _Job:
    rid: int
    request: Transcription
    audio: np.ndarray[Any, Any]
    stop: threading.Event = field(default_factory=threading.Event)


def _load(name: str, path: Path, options: EngineOptions) -> tuple[tuple[Any, ...], WhisperModel]:
    return (process.folder_info(name, path),), load(path, options)


class _Runner:
    def __init__(self, model: WhisperModel, writer: asyncio.StreamWriter, options: EngineOptions):
        self.model = model
        self.writer = writer
        self.max_queue = options.max_queue
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.jobs: dict[int, _Job] = {}
        self.decoding: set[int] = set()
        self.decoders = asyncio.Semaphore(DECODERS)
        self.stats: dict[str, int | float] = {"running": 0, "queue_depth": 0, "done_total": 0}

    def send(self, message: tuple[Any, ...]) -> None:
        self.writer.write(ipc.encode(message))

    def send_threadsafe(self, message: tuple[Any, ...]) -> None:
        self.loop.call_soon_threadsafe(self.send, message)

    async def submit(self, rid: int, request: Transcription) -> None:
        """Decode the upload; refuse it or queue it."""
        self.decoding.add(rid)
        try:
            if len(self.jobs) + len(self.decoding) > self.max_queue:
                raise Overloaded("too many transcriptions are waiting for this model; try again")
            async with self.decoders:
                audio = await asyncio.to_thread(decode, request.audio)
        except Exception as e:  # every failure reaches the server, which waits for this reply
            self.send((ipc.REPLY, rid, ipc.wire_error(e), None))
            return
        finally:
            self.decoding.discard(rid)
        job = _Job(rid, request, audio)
        self.jobs[rid] = job
        self.queue.put_nowait(job)
        self.send((ipc.REPLY, rid, None, len(audio) / SAMPLE_RATE))

    def cancel(self, rid: int) -> None:
        job = self.jobs.get(rid)
        if job is not None:
            job.stop.set()

    async def work(self) -> None:
        while True:
            job = await self.queue.get()
            if job.stop.is_set():
                self.jobs.pop(job.rid, None)
                continue
            self.stats["running"] = 1
            started = time.perf_counter()
            error = None

            def send(message: tuple[Any, ...], rid: int = job.rid) -> None:
                self.send_threadsafe((message[0], rid, *message[1:]))

            try:
                await asyncio.to_thread(run, self.model, job.audio, job.request, job.stop, send)
            except Exception as e:  # a failure of this request only: the runner carries on
                log.exception("transcription %d failed", job.rid)
                error = ipc.wire_error(e)
            self.send((DONE, job.rid, error, time.perf_counter() - started))
            self.jobs.pop(job.rid, None)
            self.stats["running"] = 0
            self.stats["done_total"] += 1

    def stop(self) -> None:
        for job in self.jobs.values():
            job.stop.set()

    async def beat(self) -> None:
        await process.beat(self.stats, self.queue, self.send)


def languages(model_info: ModelInfo) -> Sequence[str]:
    value = json.loads(model_info.metadata.get("whisper.languages", "[]"))
    return [str(x) for x in value] if isinstance(value, list) else []
