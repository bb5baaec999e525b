"""`POST /v1/audio/speech`: text to speech, streamed as it is synthesized.

`stream_format` `audio` (the default) sends the encoded bytes as a chunked body, piece by
piece; `sse` sends `speech.audio.delta` events (base64 audio) and then `speech.audio.done` with
the usage. Either way the first bytes leave once the first piece is synthesized, not the whole
text. `voice` names one of the model's voices; OpenAI's built-in names (`alloy`...), which
every OpenAI client sends, mean the model's default voice unless the model has a voice of that
name. `instructions` is accepted and ignored, as OpenAI's tts-1 does.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import orjson
from aiohttp import web
from pydantic import Field, field_validator

from xllm.audio_encoder import FORMATS, AudioEncoder, off_loop
from xllm.engine.protocol import Capability, Speaker, Speech
from xllm.errors import InvalidRequest, XllmError
from xllm.server import streaming
from xllm.server.http import GENERATIONS, load_capable, parse_body, peer_gone
from xllm.server.openai.wire import EngineName, Wire
from xllm.server.state import METRICS

MAX_INPUT = 4096
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer",
     "verse", "marin", "cedar"}
)  # fmt: skip


class VoiceId(Wire):
    id: Annotated[str, Field(min_length=1, max_length=200)]


class SpeechRequest(Wire):
    model: Annotated[str, Field(min_length=1, max_length=400)]
    engine: EngineName | None = None
    input: str
    voice: Annotated[str, Field(min_length=1, max_length=200)] | VoiceId | None = None
    instructions: Annotated[str, Field(max_length=4096)] | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: Annotated[float, Field(ge=0.25, le=4.0)] = 1.0
    stream_format: Literal["audio", "sse"] = "audio"

    @field_validator("input")
    @classmethod
    def _input(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the text to speak is empty")
        if len(v) > MAX_INPUT:
            raise ValueError(f"the text is {len(v)} characters; the limit is {MAX_INPUT}")
        return v

    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice


async def _speaker(request: web.Request, body: SpeechRequest) -> Speaker:
    """The model, loaded, if its engine can speak."""
    refusal = "cannot speak; use a voice such as piper:joe"
    engine = await load_capable(request, body.model, body.engine, Capability.SPEECH, refusal)
    if not isinstance(engine, Speaker):
        raise InvalidRequest(
            f"model: the {engine.kind} engine serving {body.model!r} cannot speak", param="model"
        )
    return engine


async def speech(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, SpeechRequest)
    model = await _speaker(request, body)
    voice = body.voice_name()
    if voice in OPENAI_VOICES and voice not in model.voices:
        voice = None
    utterance = await model.speak(Speech(body.input, voice, body.speed))
    request.setdefault(GENERATIONS, []).append(utterance)
    encoder = AudioEncoder(body.response_format, utterance.sample_rate)
    sse = body.stream_format == "sse"
    content_type = "text/event-stream" if sse else FORMATS[body.response_format].content_type
    response = await streaming.open_stream(request, content_type, compress=False)
    samples = 0
    try:
        async for pcm in utterance.audio(lambda: peer_gone(request)):
            samples += len(pcm) // 2
            data = await off_loop(encoder.encode, pcm)
            if data and not await streaming.write(response, _delta(data) if sse else data):
                utterance.cancel()
                return response
        tail = await off_loop(encoder.finish)
    except XllmError as e:  # after the first byte: the stream ends, saying why where it can
        if sse:
            await streaming.sse_error(response, e)
        else:  # raw audio has no place for an error: the connection is cut, not ended
            streaming.log.warning("speech stream ended with an error: %s", e.message)
            if request.transport is not None:
                request.transport.abort()
        return response
    seconds = samples / utterance.sample_rate
    request.app[METRICS].observe_synthesis(body.model, seconds, utterance.seconds)
    if sse:
        usage = {"input_tokens": utterance.input_tokens, "output_tokens": utterance.output_tokens,
                 "total_tokens": utterance.input_tokens + utterance.output_tokens}  # fmt: skip
        done = orjson.dumps({"type": "speech.audio.done", "usage": usage})
        await streaming.finish(response, (_delta(tail) if tail else b"") + _event(done))
    else:
        await streaming.finish(response, tail)
    return response


def _delta(audio: bytes) -> bytes:
    return _event(orjson.dumps({"type": "speech.audio.delta",
                                "audio": base64.b64encode(audio).decode()}))  # fmt: skip


def _event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"
