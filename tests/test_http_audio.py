"""`/v1/audio/transcriptions` and `/v1/audio/translations` rules that need no speech model,
in-process over the fake engine (tests/fake_engine.py): the form is read and every field
checked before any model loads, errors in OpenAI's shape naming the field, the upload cap (a
413), and a model without the transcription capability refused by name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests import fake_engine
from tests.fake_engine import FakeEngine
from xllm.config import Settings
from xllm.server.app import create_app, make_registry

URL = "/v1/audio/transcriptions"
CAP = 1000


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    settings = Settings(models_dir=tmp_path / "models", max_audio_upload=CAP)
    registry = make_registry(settings, engines=fake_engine.engines())
    registry.add_path(fake_engine.model_folder(tmp_path / "fake"))
    FakeEngine.instances.clear()
    async with TestClient(TestServer(create_app(settings, registry))) as c:
        yield c


def form(audio: bytes | None = b"RIFF....WAVE", **fields: str | list[str]) -> aiohttp.FormData:
    data = aiohttp.FormData(default_to_multipart=True)
    for key, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            data.add_field(f"{key}[]" if isinstance(value, list) else key, item)
    if audio is not None:
        data.add_field("file", audio, filename="a.wav", content_type="audio/wav")
    return data


CASES: list[tuple[dict[str, Any], bytes | None, int, str | None, str]] = [
    ({}, b"x", 400, "model", "model: required"),
    ({"model": "fake"}, None, 400, "file", "file: the audio file is required"),
    ({"model": "fake"}, b"", 400, "file", "file: the audio file is empty"),
    ({"model": "fake"}, b"x" * (CAP + 1), 413, "file", "larger than 1000 bytes"),
    ({"model": "fake", "response_format": "docx"}, b"x", 400, "response_format", "response_format"),
    ({"model": "fake", "temperature": "1.5"}, b"x", 400, "temperature", "less than or equal to 1"),
    ({"model": "fake", "language": "EN"}, b"x", 400, "language", "language"),
    (
        {"model": "fake", "timestamp_granularities": ["word"]},
        b"x",
        400,
        "timestamp_granularities",
        "verbose_json",
    ),
    ({"model": "fake", "stream": "yes please"}, b"x", 400, "stream", "stream"),
    (
        {"model": "fake", "stream": "true", "response_format": "vtt"},
        b"x",
        400,
        "stream",
        "json or text",
    ),
    ({"model": "fake", "include": ["logprobs"]}, b"x", 400, "include", "not supported"),
    ({"model": "fake", "voice": "alloy"}, b"x", 400, "voice", "voice: unknown field"),
    ({"model": "fake", "prompt": "p" * 5000}, b"x", 400, "prompt", "prompt"),
    ({"model": "nothing"}, b"x", 404, "model", "not found"),
    ({"model": "fake"}, b"x", 400, "model", "does not transcribe speech"),
]


@pytest.mark.parametrize(("fields", "audio", "status", "param", "text"), CASES)
async def test_the_form_is_checked_before_any_model_loads(
    client: TestClient[Any, Any],
    fields: dict[str, Any],
    audio: bytes | None,
    status: int,
    param: str | None,
    text: str,
) -> None:
    r = await client.post(URL, data=form(audio, **fields))
    body = await r.json()
    assert r.status == status, body
    assert body["error"]["param"] == param and text in body["error"]["message"], body
    assert body["error"]["type"] != "server_error"
    assert FakeEngine.instances == []  # nothing was loaded for any of it


async def test_not_a_form_and_repeated_fields(client: TestClient[Any, Any]) -> None:
    r = await client.post(URL, json={"model": "fake", "file": "a.wav"})
    body = await r.json()
    assert r.status == 400 and body["error"]["param"] == "file"
    assert "multipart/form-data" in body["error"]["message"]
    data = form(model="fake")
    data.add_field("model", "fake")
    r = await client.post(URL, data=data)
    assert r.status == 400 and (await r.json())["error"]["message"] == "model: given twice"
    r = await client.post("/v1/audio/translations", data=form(model="fake", language="de"))
    body = await r.json()
    assert r.status == 400 and body["error"]["param"] == "language"


async def test_audio_routes_are_in_the_openapi_document(client: TestClient[Any, Any]) -> None:
    paths = (await (await client.get("/openapi.json")).json())["paths"]
    assert "post" in paths["/v1/audio/transcriptions"] and "post" in paths["/v1/audio/translations"]
