"""`POST /v1/audio/speech` rules that need no model, in-process: the real app, routes and
encoders over a fake voice behind the engine seam (a tone per word), through a real HTTP round
trip. Text-to-speech with the real Piper voice is tests/e2e/test_speech.py."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests import fake_engine
from xllm.audio_encoder import ENCODER_NICENESS, off_loop
from xllm.config import Settings
from xllm.engine.plugins import Engines, LoadSpec, Manifest
from xllm.engine.protocol import ABI_VERSION, Capability, Speech
from xllm.errors import InvalidRequest
from xllm.memory.planner import Plan
from xllm.server.app import create_app, make_registry

RATE = 16_000
WORD_S = 0.25


class FakeUtterance:
    def __init__(self, words: list[str], speed: float) -> None:
        self.words = words
        self.speed = speed
        self.sample_rate = RATE
        self.input_tokens = sum(len(w) for w in words)
        self.output_tokens = 0
        self.seconds = 0.0
        self.cancelled = False

    async def audio(
        self, is_disconnected: Callable[[], bool] | None = None
    ) -> AsyncIterator[bytes]:
        n = int(RATE * WORD_S / self.speed)
        for _ in self.words:
            if self.cancelled:
                return
            tone = np.sin(np.arange(n) * 2 * np.pi * 440 / RATE) * 8000
            self.output_tokens += 1
            yield tone.astype("<i2").tobytes()

    def cancel(self) -> None:
        self.cancelled = True


class FakeVoice(fake_engine.FakeModel):
    """A voice engine: each word of the text is a quarter second of 440 Hz."""

    kind = "fake-voice"
    capability_set = frozenset({Capability.SPEECH})

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        self.voices: Sequence[str] = ("fake", "alloy-like")
        self.requests: list[Speech] = []

    async def speak(self, request: Speech) -> FakeUtterance:
        if request.voice is not None and request.voice not in self.voices:
            raise InvalidRequest(f"voice: {request.voice!r} is not a voice here", param="voice")
        self.requests.append(request)
        return FakeUtterance(request.text.split(), request.speed)


VOICES: list[FakeVoice] = []


async def _load(spec: LoadSpec) -> FakeVoice:
    VOICES.append(FakeVoice(spec))
    return VOICES[-1]


MANIFEST = Manifest(
    name="fake-voice", version="1", abi=ABI_VERSION, formats=("safetensors",),
    architectures=frozenset({"FakeVoice"}), capabilities=frozenset({Capability.SPEECH}),
    load=_load,
    estimate=lambda spec: Plan(weights=0, kv=0, compute=0, output=0, layers=0, gpu_layers=0,
                               vram=0),
)  # fmt: skip


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    settings = Settings(models_dir=tmp_path / "models")
    registry = make_registry(settings, engines=Engines([fake_engine.MANIFEST, MANIFEST]))
    registry.add_path(fake_engine.model_folder(tmp_path / "voice", "FakeVoice"))
    registry.add_path(fake_engine.model_folder(tmp_path / "fake"))
    VOICES.clear()
    fake_engine.FakeEngine.instances.clear()
    async with TestClient(TestServer(create_app(settings, registry))) as c:
        yield c


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "voice", "input": "one two three four", **extra}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": " \n\t "}, "input"),
        ({"input": "a" * 4097}, "input"),
        ({"input": None}, "input"),
        ({"input": ["a list"]}, "input"),
        ({"speed": 0.2}, "speed"),
        ({"speed": 4.01}, "speed"),
        ({"speed": "fast"}, "speed"),
        ({"response_format": "ogg"}, "response_format"),
        ({"stream_format": "ndjson"}, "stream_format"),
        ({"voice": "nobody"}, "voice"),
        ({"voice": {"id": "nobody"}}, "voice"),
        ({"voice": ""}, "voice"),
        ({"model": "fake"}, "model"),
        ({"model": ""}, "model"),
    ],
)
async def test_a_bad_field_is_a_400_naming_it(
    client: TestClient[Any, Any], change: dict[str, Any], param: str
) -> None:
    r = await client.post("/v1/audio/speech", json=_body(**change))
    body = await r.json()
    assert r.status == 400, body
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"
    assert param in body["error"]["message"]


async def test_input_of_exactly_the_limit_is_spoken(client: TestClient[Any, Any]) -> None:
    r = await client.post("/v1/audio/speech", json=_body(input="ab " * 1365 + "a"))
    assert r.status == 200
    assert len(await r.read()) > 0


async def test_missing_fields_and_unknown_model(client: TestClient[Any, Any]) -> None:
    r = await client.post("/v1/audio/speech", json={"model": "voice"})
    assert r.status == 400 and (await r.json())["error"]["param"] == "input"
    r = await client.post("/v1/audio/speech", json={"input": "hi"})
    assert r.status == 400 and (await r.json())["error"]["param"] == "model"
    r = await client.post("/v1/audio/speech", json=_body(model="nothing-here"))
    assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"


async def test_a_text_model_asked_to_speak_is_refused_before_it_loads(
    client: TestClient[Any, Any],
) -> None:
    r = await client.post("/v1/audio/speech", json=_body(model="fake"))
    body = await r.json()
    assert r.status == 400 and "cannot speak" in body["error"]["message"]
    assert fake_engine.FakeEngine.instances == []


async def test_a_voice_asked_to_chat_is_a_400_naming_model(client: TestClient[Any, Any]) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "voice", "messages": [{"role": "user", "content": "hi"}]},
    )
    body = await r.json()
    assert r.status == 400 and body["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [("mp3", "audio/mpeg"), ("opus", "audio/ogg"), ("aac", "audio/aac"),
     ("flac", "audio/flac"), ("wav", "audio/wav"), ("pcm", "audio/pcm")],
)  # fmt: skip
async def test_each_format_decodes_to_the_duration_at_24_khz(
    client: TestClient[Any, Any], fmt: str, content_type: str
) -> None:
    r = await client.post(
        "/v1/audio/speech", json=_body(response_format=fmt), headers={"Accept-Encoding": "gzip"}
    )
    data = await r.read()
    assert r.status == 200
    assert r.headers["Content-Type"] == content_type
    assert "Content-Encoding" not in r.headers  # audio is never gzipped
    assert abs(duration(data, fmt) - 4 * WORD_S) < 0.08


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
async def test_encoding_runs_below_the_server_threads_priority() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)  # 0: the calling thread, on Linux

    def niceness() -> bytes:
        return str(os.getpriority(os.PRIO_PROCESS, 0)).encode()

    assert int(await off_loop(niceness)) == min(base + ENCODER_NICENESS, 19)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the event loop's thread is untouched


def duration(data: bytes, fmt: str) -> float:
    """Seconds of audio in `data` (24 kHz samples for pcm; decoded by PyAV otherwise)."""
    if fmt == "pcm":
        return len(data) / 2 / 24_000
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        if fmt != "opus":
            assert stream.rate == 24_000
        return sum(f.samples for f in c.decode(stream)) / stream.rate


async def test_speed_and_voices_reach_the_engine(client: TestClient[Any, Any]) -> None:
    for voice, seen in (("alloy", None), ("alloy-like", "alloy-like"), ({"id": "fake"}, "fake")):
        r = await client.post(
            "/v1/audio/speech", json=_body(voice=voice, speed=2, response_format="pcm")
        )
        data = await r.read()
        assert r.status == 200, data
        assert VOICES[0].requests[-1].voice == seen
        assert VOICES[0].requests[-1].speed == 2.0
        assert abs(len(data) / 2 / 24_000 - 4 * WORD_S / 2) < 0.02
    r = await client.post("/v1/audio/speech", json=_body(instructions="whisper it"))
    assert r.status == 200  # accepted and ignored, as tts-1 does


async def test_sse_sends_deltas_then_done_with_usage(client: TestClient[Any, Any]) -> None:
    r = await client.post(
        "/v1/audio/speech", json=_body(stream_format="sse", response_format="wav")
    )
    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
    events = [json.loads(e.removeprefix("data: ")) for e in (await r.text()).split("\n\n") if e]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert len(events) >= 5
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    assert done["usage"] == {"input_tokens": 15, "output_tokens": 4, "total_tokens": 19}
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert abs(duration(audio, "wav") - 4 * WORD_S) < 0.02
