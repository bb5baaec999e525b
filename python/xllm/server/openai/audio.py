"""`POST /v1/audio/transcriptions` and `POST /v1/audio/translations` (OpenAI): speech to text
on a model with the `transcription` capability.

The body is multipart/form-data: the audio as `file` (any container PyAV decodes; at most
`max_audio_upload`, 25 MB like OpenAI's) and the fields below, each checked (a 400 naming it;
a field OpenAI does not define is refused too). The model decodes the upload before anything
is answered, so a file that is not audio is a 400, never a stream that fails. `stream=true`
sends OpenAI's `transcript.text.delta` events as segments are decoded, then
`transcript.text.done`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

import orjson
from aiohttp import BodyPartReader, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xllm.engine.protocol import Capability, Segment, Transcriber, Transcript, Transcription
from xllm.errors import InvalidRequest, PayloadTooLarge, XllmError
from xllm.server import streaming
from xllm.server.http import MODEL_NAME, json_response, load_model, peer_gone
from xllm.server.openai.transcripts import CONTENT_TYPES, srt, text_of, usage, verbose, vtt
from xllm.server.state import METRICS, REGISTRY, SETTINGS

MAX_FIELD = 64 * 1024
"""A form field other than `file` (the prompt is the longest) is read up to this."""
MAX_PARTS = 32
_LISTS = ("timestamp_granularities", "include")
"""Fields sent once per value, as `name[]` (OpenAI's clients) or `name`."""


class TranscriptionForm(BaseModel):
    """The form's fields besides `file`, as OpenAI defines them."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=600)]
    language: Annotated[str, Field(pattern=r"^[a-z]{2,3}$")] | None = None
    """ISO-639-1 (`en`, `de`); absent: detected."""
    prompt: Annotated[str, Field(max_length=4096)] | None = None
    response_format: Literal["json", "text", "srt", "vtt", "verbose_json"] = "json"
    temperature: Annotated[float, Field(ge=0, le=1)] = 0.0
    timestamp_granularities: Annotated[list[Literal["word", "segment"]], Field(max_length=2)] = []
    stream: bool = False
    include: Annotated[list[str], Field(max_length=4)] = []


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "transcribe")


async def translations(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "translate")


async def _serve(
    request: web.Request, task: Literal["transcribe", "translate"]
) -> web.StreamResponse:
    audio, raw = await _read_form(request, request.app[SETTINGS].max_audio_upload)
    for key in ("language", "timestamp_granularities") if task == "translate" else ():
        if key in raw:  # OpenAI's translations have neither: the text is English, untimed
            raise InvalidRequest(f"{key}: a translation takes no {key}", param=key)
    form = _validate(raw)
    if form.include:
        raise InvalidRequest(
            f"include: {form.include[0]!r} is not supported (Whisper gives no log-probabilities "
            "per token here)",
            param="include",
        )
    words = "word" in form.timestamp_granularities
    if form.timestamp_granularities and form.response_format != "verbose_json":
        raise InvalidRequest(
            "timestamp_granularities: timestamps come only with response_format verbose_json",
            param="timestamp_granularities",
        )
    if form.stream and form.response_format not in ("json", "text"):
        raise InvalidRequest(
            "stream: a streamed transcription is text deltas: use response_format json or text",
            param="stream",
        )
    request[MODEL_NAME] = form.model
    engine = await _transcriber(request, form.model)
    job = Transcription(audio=audio, task=task, language=form.language, prompt=form.prompt,
                        temperature=form.temperature or None, words=words)  # fmt: skip
    transcript = await engine.transcribe(job)
    name = request[MODEL_NAME]
    if form.stream:
        return await _stream(request, transcript, name)
    segments = [s async for s in transcript.segments(lambda: peer_gone(request))]
    _observe(request, name, transcript)
    fmt = form.response_format
    if fmt == "json":
        return json_response({"text": text_of(segments), "usage": usage(transcript.duration)})
    if fmt == "verbose_json":
        with_segments = (
            not form.timestamp_granularities or "segment" in form.timestamp_granularities
        )
        return json_response(verbose(task, transcript.language, transcript.duration, segments,
                                     words, with_segments))  # fmt: skip
    body = {"text": text_of(segments) + "\n", "srt": srt(segments), "vtt": vtt(segments)}[fmt]
    return web.Response(text=body, content_type=CONTENT_TYPES[fmt], charset="utf-8")


async def _transcriber(request: web.Request, name: str) -> Transcriber:
    """The loaded model `name`; a 400 before it loads when it does not transcribe."""
    registry = request.app[REGISTRY]
    found = registry.find(name)
    try:
        facts = await asyncio.to_thread(registry.facts, found)
    except (XllmError, OSError):
        facts = None  # loading it reports the defect
    if facts is not None and Capability.TRANSCRIPTION.value not in facts.capabilities:
        raise InvalidRequest(
            f"model {found.name!r} does not transcribe speech (it is a {facts.architecture} "
            f"model: {', '.join(facts.capabilities)}); use a Whisper model, e.g. whisper:tiny.en",
            param="model",
        )
    engine = await load_model(request, found.name)
    if not isinstance(engine, Transcriber):
        raise InvalidRequest(f"model {found.name!r} does not transcribe speech", param="model")
    return engine


async def _stream(request: web.Request, transcript: Transcript, name: str) -> web.StreamResponse:
    response = await streaming.open_sse(request)
    segments: list[Segment] = []
    try:
        async for s in transcript.segments(lambda: peer_gone(request)):
            segments.append(s)
            delta = {"type": "transcript.text.delta", "delta": s.text, "segment_id": str(s.id)}
            if not await streaming.write(response, _event(delta)):
                transcript.cancel()
                return response
    except XllmError as e:
        await streaming.sse_error(response, e)
        return response
    _observe(request, name, transcript)
    done = {"type": "transcript.text.done", "text": text_of(segments),
            "usage": usage(transcript.duration)}  # fmt: skip
    await streaming.finish(response, _event(done))
    return response


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _observe(request: web.Request, name: str, transcript: Transcript) -> None:
    request.app[METRICS].observe_transcription(name, transcript.duration, transcript.seconds)


async def _read_form(request: web.Request, cap: int) -> tuple[bytes, dict[str, Any]]:
    """(the `file` part, the other fields by name); a 400 naming what is wrong, a 413 for a
    file over `cap`."""
    if request.content_type != "multipart/form-data":
        raise InvalidRequest(
            "the body must be multipart/form-data: the audio as `file`, and `model`",
            param="file",
        )
    audio: bytes | None = None
    fields: dict[str, Any] = {}
    try:
        reader = await request.multipart()
        for _ in range(MAX_PARTS + 1):
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader) or not part.name:
                raise InvalidRequest("the form has a part without a name")
            if part.name == "file":
                if audio is not None:
                    raise InvalidRequest("file: given twice", param="file")
                audio = await _read_part(part, cap, "file")
                continue
            key = part.name.removesuffix("[]")
            value = (await _read_part(part, MAX_FIELD, key)).decode("utf-8", "replace")
            if key in _LISTS:
                fields.setdefault(key, []).append(value)
            elif key in fields:
                raise InvalidRequest(f"{key}: given twice", param=key)
            else:
                fields[key] = value
        else:
            raise InvalidRequest(f"the form has more than {MAX_PARTS} parts")
    except (ValueError, AssertionError) as e:  # aiohttp's complaints about a malformed body
        raise InvalidRequest(f"the multipart body is malformed: {e}") from None
    if audio is None:
        raise InvalidRequest("file: the audio file is required", param="file")
    if not audio:
        raise InvalidRequest("file: the audio file is empty", param="file")
    return audio, fields


async def _read_part(part: BodyPartReader, cap: int, name: str) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(1 << 16):
        data += chunk
        if len(data) > cap:
            what = f"the audio file is larger than {cap} bytes" if name == "file" else "too long"
            raise (PayloadTooLarge if name == "file" else InvalidRequest)(
                f"{name}: {what}", param=name
            )
    return bytes(data)


def _validate(fields: dict[str, Any]) -> TranscriptionForm:
    try:
        return TranscriptionForm.model_validate(fields, strict=False)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = str(err["loc"][0]) if err["loc"] else None  # a form is flat: the field
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "missing":
            message = "required"
        raise InvalidRequest(f"{param}: {message}" if param else message, param=param) from None
