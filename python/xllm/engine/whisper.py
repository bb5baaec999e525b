"""The Whisper engine as the server sees it: one Whisper model (CTranslate2 form, run by
faster-whisper) in its own runner process (engine/whisper_runner.py).

A crash of the runner ends that model's transcriptions with a 500 and drops the model, so the
next request loads it again; nothing else is touched. The model transcribes and translates
(`Transcriber`); asked to chat or complete text it refuses with a 400 naming `model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from xllm.engine import whisper_runner
from xllm.engine.plugins import LoadSpec, Manifest
from xllm.engine.process import ProcessClient, Spawned, Stream
from xllm.engine.protocol import (
    ABI_VERSION,
    Capability,
    Generation,
    Request,
    Segment,
    Transcription,
)
from xllm.errors import InvalidRequest
from xllm.memory.planner import Plan
from xllm.models import folders
from xllm.models.metadata import ModelInfo

OVERHEAD = 192 << 20
"""What a Whisper runner takes beside its model's files: the interpreter, CTranslate2, PyAV and
decoding buffers (measured peak resident memory with word timestamps, minus the files: 159 MiB
for tiny.en, 173 MiB for base)."""


class WhisperTranscript(Stream[Segment]):
    """One transcription's segments as the runner sends them (a `protocol.Transcript`)."""

    def __init__(self, model: WhisperClient, rid: int) -> None:
        super().__init__(model, rid)
        self.duration = 0.0
        self.language = ""
        self.language_probability = 0.0
        self.seconds = 0.0
        """How long the runner took, once it has finished."""

    def segments(self, is_disconnected: Callable[[], bool] | None = None) -> AsyncIterator[Segment]:
        return self._read(is_disconnected)


class WhisperClient(ProcessClient[WhisperTranscript]):
    """A Whisper model in its runner process (a `protocol.Engine` and `Transcriber`)."""

    kind = "faster-whisper"
    engine = "whisper"

    def __init__(self, spec: LoadSpec, ready: tuple[Any, ...], spawned: Spawned) -> None:
        super().__init__(spec, ready, spawned)
        self.info: ModelInfo = ready[0]
        self.languages: Sequence[str] = whisper_runner.languages(self.info)

    @classmethod
    async def load(cls, spec: LoadSpec) -> WhisperClient:
        return cls(spec, *await cls.spawn(spec))

    def _dispatch(self, t: WhisperTranscript, op: str, args: tuple[Any, ...]) -> None:
        if op == whisper_runner.INFO:  # before the first segment
            t.language, t.language_probability = args
        elif op == whisper_runner.SEGMENT:
            t.put(args[0])
        elif op == whisper_runner.DONE:
            error, t.seconds = args
            self._done(t, error)

    # --- the engine protocol ----------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.TRANSCRIPTION})

    async def generate(self, request: Request) -> Generation:
        raise InvalidRequest(
            f"model {self.name!r} is a speech recognition model: it transcribes audio "
            "(POST /v1/audio/transcriptions) and does not generate text from a prompt",
            param="model",
        )

    async def transcribe(self, request: Transcription) -> WhisperTranscript:
        """Send the upload to the runner, which decodes it (a 400 for a bad file) and queues
        it; returns once it is queued."""
        self._check(request)
        transcript, (duration,) = await self._submit(
            request, lambda rid: WhisperTranscript(self, rid)
        )
        transcript.duration = duration
        return transcript

    def _check(self, request: Transcription) -> None:
        multilingual = len(self.languages) > 1
        if request.language is not None and request.language not in self.languages:
            known = ", ".join(self.languages) if len(self.languages) < 10 else "ISO-639-1 codes"
            why = "is English-only" if not multilingual else f"knows {known}"
            raise InvalidRequest(
                f"language: {request.language!r} is not a language model {self.name!r} "
                f"transcribes (it {why})",
                param="language",
            )
        if request.task == "translate" and not multilingual:
            raise InvalidRequest(
                f"model: {self.name!r} is English-only and cannot translate; use a "
                "multilingual Whisper model (whisper:base)",
                param="model",
            )


def estimate(spec: LoadSpec, overhead: int = OVERHEAD) -> Plan:
    """A speech model's memory plan: its files and a measured overhead, in RAM (a GPU, where
    one is used, holds less than the files)."""
    return Plan(weights=folders.size(spec.path), kv=0, compute=overhead, output=0, layers=0,
                gpu_layers=0, vram=0)  # fmt: skip


async def _load(spec: LoadSpec) -> WhisperClient:
    options = dataclasses.replace(spec.options, splits=(), adapters=())
    return await WhisperClient.load(dataclasses.replace(spec, options=options))


def _version() -> str:
    from importlib.metadata import version

    return version("faster-whisper")


MANIFEST = Manifest(
    name="faster-whisper",
    version=_version(),
    abi=ABI_VERSION,
    formats=("ctranslate2",),
    architectures=frozenset({"whisper"}),
    capabilities=frozenset({Capability.TRANSCRIPTION}),
    load=_load,
    estimate=estimate,
)
"""The built-in speech recognition engine: Whisper models on faster-whisper, each in its own
runner process."""
