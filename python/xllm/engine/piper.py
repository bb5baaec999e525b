"""The Piper engine as the server sees it: one Piper voice in its own runner process
(engine/piper_runner.py).

A crash of the runner ends that voice's syntheses with a 500 and drops the model, so the next
request loads it again; nothing else is touched. The voice speaks (`Speaker`); asked to chat or
complete text it refuses with a 400 naming `model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from xllm.engine import piper_runner
from xllm.engine.plugins import LoadSpec, Manifest
from xllm.engine.process import ProcessClient, Spawned, Stream
from xllm.engine.protocol import ABI_VERSION, Capability, Generation, Request, Speech
from xllm.errors import InvalidRequest
from xllm.memory.planner import Plan
from xllm.models.metadata import ModelInfo

OVERHEAD = 288 << 20
"""What a Piper runner takes beside its voice's files: the interpreter, onnxruntime, espeak-ng
and the synthesis buffers (measured: a peak resident memory of 349 MiB with the Joe voice after a
4,096-character request, less its 60 MiB of files)."""


class PiperUtterance(Stream[bytes]):
    """One synthesis's audio as the runner sends it (a `protocol.Utterance`)."""

    def __init__(self, model: PiperClient, rid: int) -> None:
        super().__init__(model, rid)
        self.sample_rate = model.sample_rate
        self.input_tokens = 0
        """Phoneme ids the voice reads."""
        self.output_tokens = 0
        """Decoder frames it made (known once the audio has ended)."""
        self.seconds = 0.0
        """Time the runner spent synthesizing (known once the audio has ended)."""

    def audio(self, is_disconnected: Callable[[], bool] | None = None) -> AsyncIterator[bytes]:
        return self._read(is_disconnected)


class PiperClient(ProcessClient[PiperUtterance]):
    """A Piper voice in its runner process (a `protocol.Engine` and `Speaker`)."""

    kind = "piper"
    engine = "piper"

    def __init__(self, spec: LoadSpec, ready: tuple[Any, ...], spawned: Spawned) -> None:
        super().__init__(spec, ready, spawned)
        self.info: ModelInfo = ready[0]
        self.voices: Sequence[str] = ready[1]
        self.sample_rate: int = ready[2]

    @classmethod
    async def load(cls, spec: LoadSpec) -> PiperClient:
        return cls(spec, *await cls.spawn(spec))

    def _dispatch(self, u: PiperUtterance, op: str, args: tuple[Any, ...]) -> None:
        if op == piper_runner.AUDIO:
            u.put(args[0])
        elif op == piper_runner.DONE:
            error, u.output_tokens, u.seconds = args
            self._done(u, error)

    # --- the engine protocol ----------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.SPEECH})

    async def generate(self, request: Request) -> Generation:
        raise InvalidRequest(
            f"model {self.name!r} is a voice: it speaks text (POST /v1/audio/speech) and does "
            "not generate text from a prompt",
            param="model",
        )

    async def speak(self, request: Speech) -> PiperUtterance:
        """Send the text to the runner, which checks and plans it (a 400 for a voice it lacks
        or text with nothing to say) and gives it its turns; returns once it has them."""
        utterance, (phonemes,) = await self._submit(request, lambda rid: PiperUtterance(self, rid))
        utterance.input_tokens = phonemes
        return utterance


def _files_size(path: Path) -> int:
    """A voice's bytes: its folder's files, or its .onnx with the .onnx.json beside it."""
    files = path.iterdir() if path.is_dir() else path.parent.glob(f"{path.name}*")
    return sum(p.stat().st_size for p in files if p.is_file())


def _estimate(spec: LoadSpec) -> Plan:
    """The voice's files and a measured overhead, in RAM."""
    return Plan(weights=_files_size(spec.path), kv=0, compute=OVERHEAD, output=0, layers=0,
                gpu_layers=0, vram=0)  # fmt: skip


async def _load(spec: LoadSpec) -> PiperClient:
    options = dataclasses.replace(spec.options, splits=(), adapters=())
    return await PiperClient.load(dataclasses.replace(spec, options=options))


def _version() -> str:
    from importlib.metadata import version

    return version("piper-tts")


MANIFEST = Manifest(
    name="piper",
    version=_version(),
    abi=ABI_VERSION,
    formats=("piper",),
    architectures=frozenset({"piper"}),
    capabilities=frozenset({Capability.SPEECH}),
    load=_load,
    estimate=_estimate,
)
"""The built-in speech synthesis engine: Piper voices on onnxruntime, each in its own runner
process."""
