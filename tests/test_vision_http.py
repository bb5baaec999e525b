"""Images in requests, in-process: every API shape that carries one (OpenAI chat `image_url`
parts, Responses `input_image`, Ollama's `images` on /api/chat and /api/generate) through the
official `openai` and `ollama` clients, to a fake vision engine that echoes the decoded images
it got (tests/fake_engine.py); and the inputs a server must refuse with a 4xx naming the image,
staying up for the next request.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ollama
import openai
import PIL.Image
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests import fake_engine, pictures
from xllm import images, remote_images
from xllm.cli import main as cli
from xllm.cli import run
from xllm.config import Settings
from xllm.server.app import create_app, make_registry

VISION, TEXT = "fake-vision:latest", "fake-text:latest"
RED, BLUE = pictures.png("red", (64, 48)), pictures.jpeg("blue", (40, 30))


def _digest(data: bytes) -> str:
    """The word the fake engine echoes for an image file."""
    with PIL.Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
        head = f"{rgb.width}x{rgb.height}:".encode()
        return (
            f"image:{rgb.width}x{rgb.height}:{hashlib.sha256(head + rgb.tobytes()).hexdigest()[:8]}"
        )


async def _client(tmp_path: Path, **settings: Any) -> TestClient[Any, Any]:
    config = Settings(models_dir=tmp_path / "models", **settings)
    registry = make_registry(config, engines=fake_engine.engines())
    registry.add_path(fake_engine.model_folder(tmp_path / "fake-vision", "FakeVLM"))
    registry.add_path(fake_engine.model_folder(tmp_path / "fake-text"))
    client = TestClient(TestServer(create_app(config, registry)))
    await client.start_server()
    return client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    c = await _client(tmp_path)
    yield c
    await c.close()


def _openai(client: TestClient[Any, Any]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused")


def _ollama(client: TestClient[Any, Any]) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=str(client.make_url("")).rstrip("/"))


async def test_openai_chat_takes_data_uris_and_raw_base64_in_several_messages(
    client: TestClient[Any, Any],
) -> None:
    reply = await _openai(client).chat.completions.create(
        model=VISION,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "compare"},
                    {"type": "image_url", "image_url": {"url": pictures.data_uri(RED)}},
                    {"type": "image_url", "image_url": {"url": pictures.b64(BLUE)}},
                ],
            },
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": pictures.data_uri(BLUE, "image/jpeg")},
                    },
                    {"type": "text", "text": "and this"},
                ],
            },
        ],
    )
    words = (reply.choices[0].message.content or "").split()
    assert words == [_digest(RED), _digest(BLUE), _digest(BLUE), "and", "this"]
    assert _digest(RED) == "image:64x48:" + images.decode(RED, images.Source("x", "")).digest[:8]


async def test_openai_chat_streams_with_an_image(client: TestClient[Any, Any]) -> None:
    stream = await _openai(client).chat.completions.create(
        model=VISION,
        stream=True,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": pictures.data_uri(RED)}},
                    {"type": "text", "text": "describe"},
                ],
            }
        ],
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == f"{_digest(RED)} describe"


async def test_responses_take_input_image(client: TestClient[Any, Any]) -> None:
    response = await _openai(client).responses.create(
        model=VISION,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is it"},
                    {"type": "input_image", "image_url": pictures.data_uri(RED), "detail": "auto"},
                ],
            }
        ],
    )
    assert response.output_text.split() == [_digest(RED), "what", "is", "it"]


async def test_ollama_chat_takes_images_on_each_message(client: TestClient[Any, Any]) -> None:
    reply = await _ollama(client).chat(
        model=VISION,
        messages=[
            {"role": "user", "content": "first", "images": [RED]},
            {"role": "assistant", "content": "seen"},
            {"role": "user", "content": "second", "images": [BLUE, RED]},
        ],
    )
    assert reply.message.content.split() == [_digest(RED), _digest(BLUE), _digest(RED), "second"]


@pytest.mark.parametrize("raw", [False, True])
async def test_ollama_generate_takes_images(client: TestClient[Any, Any], raw: bool) -> None:
    reply = await _ollama(client).generate(model=VISION, prompt="look", images=[BLUE, RED], raw=raw)
    assert reply.response.split() == [_digest(BLUE), _digest(RED), "look"]


async def test_ollama_takes_an_image_by_path_from_the_client(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    path = tmp_path / "red.png"
    path.write_bytes(RED)
    reply = await _ollama(client).generate(model=VISION, prompt="this", images=[path])
    assert reply.response.split() == [_digest(RED), "this"]


def _chat_with(url: str, model: str = VISION) -> dict[str, Any]:
    content = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": model, "messages": [{"role": "user", "content": "hi"},
                                         {"role": "user", "content": content}]}  # fmt: skip


BAD = {
    "truncated PNG": (pictures.b64(pictures.truncated_png()), "malformed or truncated"),
    "random bytes": (pictures.b64(bytes(range(256)) * 8), "not an image xllm reads"),
    "not base64": ("%%%not base64%%%", "not valid base64"),
    "a 30k x 30k PNG bomb": (pictures.b64(pictures.bomb_png()), "more than 33554432 pixels"),
    "52,800 x 44": (pictures.b64(pictures.png("red", (52_800, 44))), "more than 20 times longer"),
    "a text data URI": ("data:text/plain;base64,aGk=", "is not an image"),
    "a data URI not base64": ("data:image/png,abc", "must be base64"),
    "a remote URL": ("https://example.com/cat.png", "does not fetch image URLs"),
    "a file URL": ("file:///etc/passwd", "does not fetch image URLs"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_images_are_400s_naming_the_image_and_the_server_carries_on(
    client: TestClient[Any, Any], case: str
) -> None:
    url, why = BAD[case]
    field = "messages[1].content[1].image_url"
    r = await client.post("/v1/chat/completions", json=_chat_with(url))
    error = (await r.json())["error"]
    assert r.status == 400, error
    assert error["param"] == field and error["message"].startswith(f"{field}: "), error
    assert why in error["message"], error
    r = await client.post(
        "/api/chat",
        json={"model": VISION, "stream": False,
              "messages": [{"role": "user", "content": "x", "images": [pictures.b64(RED), url]}]},
    )  # fmt: skip
    error = (await r.json())["error"]
    assert r.status == 400 and error.startswith("messages[0].images[1]: ") and why in error, error
    r = await client.post(
        "/api/generate", json={"model": VISION, "prompt": "x", "images": [pictures.b64(RED), url]}
    )
    error = (await r.json())["error"]
    assert r.status == 400 and error.startswith("images[1]: ") and why in error, error
    r = await client.post("/v1/chat/completions", json=_chat_with(pictures.data_uri(RED)))
    assert r.status == 200, await r.text()
    assert (await r.json())["choices"][0]["message"]["content"].startswith(_digest(RED))


async def test_too_many_images_are_refused_before_any_is_decoded(
    client: TestClient[Any, Any],
) -> None:
    one = pictures.b64(RED)
    r = await client.post(
        "/api/generate", json={"model": VISION, "prompt": "x", "images": [one] * 1000}
    )
    error = (await r.json())["error"]
    assert r.status == 400, error
    assert error == (
        f"images[{images.MAX_IMAGES}]: a request may hold at most {images.MAX_IMAGES} images, "
        "this one has 1000"
    )
    per_message = [{"role": "user", "content": "x", "images": [one] * 10} for _ in range(2)]
    r = await client.post("/api/chat", json={"model": VISION, "messages": per_message})
    assert r.status == 400
    assert (await r.json())["error"].startswith("messages[1].images[6]: a request may hold")
    r = await client.post(
        "/api/generate", json={"model": VISION, "prompt": "x", "images": [one] * 16}
    )
    assert r.status == 200, await r.text()
    big = pictures.b64(pictures.png("red", (6000, 4000)))  # 24 Mpixels: two fit, three do not
    r = await client.post(
        "/api/generate", json={"model": VISION, "prompt": "x", "images": [big] * 3}
    )
    assert r.status == 400
    assert (await r.json())["error"] == (
        f"images[2]: the request's images have more than {images.MAX_TOTAL_PIXELS} pixels together"
    )


async def test_images_to_a_text_model_are_400s_on_every_api(client: TestClient[Any, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await _openai(client).chat.completions.create(**_chat_with(pictures.data_uri(RED), TEXT))
    assert e.value.body == {  # type: ignore[comparison-overlap]
        "message": "messages[1].content[1].image_url: model 'fake-text:latest' does not "
        "support images",
        "type": "invalid_request_error",
        "param": "messages[1].content[1].image_url",
        "code": None,
    }
    with pytest.raises(openai.BadRequestError, match=r"input\[0\]\.content\[0\]\.image_url: model"):
        await _openai(client).responses.create(
            model=TEXT,
            input=[{"role": "user", "content": [
                {"type": "input_image", "image_url": pictures.data_uri(RED), "detail": "auto"}]}],
        )  # fmt: skip
    with pytest.raises(ollama.ResponseError) as err:
        await _ollama(client).chat(
            model=TEXT, messages=[{"role": "user", "content": "x", "images": [RED]}]
        )
    assert err.value.status_code == 400
    assert (
        err.value.error == "messages[0].images[0]: model 'fake-text:latest' does not support images"
    )
    with pytest.raises(ollama.ResponseError, match=r"images\[0\]: model 'fake-text:latest'"):
        await _ollama(client).generate(model=TEXT, prompt="x", images=[RED])
    reply = await _ollama(client).generate(model=TEXT, prompt="still here")
    assert reply.response == "still here"


async def test_responses_refuse_files(client: TestClient[Any, Any]) -> None:
    for part, why in (
        ({"type": "input_image", "file_id": "file-1", "detail": "auto"}, "needs image_url"),
        ({"type": "input_file", "file_id": "file-1"}, "files are not supported"),
    ):
        body = {"model": VISION, "input": [{"role": "user", "content": [part]}]}
        r = await client.post("/v1/responses", json=body)
        error = (await r.json())["error"]
        assert r.status == 400 and error["param"] == "input[0].content[0]", error
        assert why in error["message"]


async def test_a_big_image_is_decoded_off_the_event_loop(client: TestClient[Any, Any]) -> None:
    """While a 24-megapixel image decodes (most of a second here), other requests are
    answered at once."""
    big = pictures.b64(pictures.png("red", (6000, 4000)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.ensure_future(
        client.post("/api/generate", json={"model": VISION, "prompt": "big", "images": [big]})
    )
    await asyncio.sleep(0.05)
    waits = []
    while not task.done():
        sent = loop.time()
        assert (await client.get("/api/version")).status == 200
        waits.append(loop.time() - sent)
    r = await task
    assert r.status == 200, await r.text()
    assert "image:6000x4000:" in await r.text()
    took = loop.time() - started
    # decoding on the loop would hold one of these requests for about the whole decode; off
    # it, each waits a few scheduler ticks (more on a loaded machine, never half the time)
    assert took > 0.3 and len(waits) >= 3, waits
    assert max(waits) < took / 2, (took, waits)


async def test_remote_urls_when_allowed_never_reach_private_addresses(tmp_path: Path) -> None:
    c = await _client(tmp_path, remote_images=True)
    try:
        served = str(c.make_url("/api/version"))  # this very server, on loopback
        for url, why in (
            (served, "is not a public address"),
            (served.replace("127.0.0.1", "localhost"), "is not a public address"),
            ("http://[::ffff:127.0.0.1]/x.png", "is not a public address"),
            ("http://169.254.169.254/latest/meta-data", "is not a public address"),
            ("http://10.0.0.1/x.png", "is not a public address"),
            ("ftp://example.com/x.png", "does not fetch image URLs"),
        ):
            r = await c.post("/v1/chat/completions", json=_chat_with(url))
            error = (await r.json())["error"]
            assert r.status == 400, (url, error)
            assert why in error["message"] and error["param"].endswith(".image_url"), (url, error)
    finally:
        await c.close()


@pytest.mark.parametrize(
    ("address", "public"),
    [("8.8.8.8", True), ("2606:4700::1111", True), ("::1", False), ("fe80::1%eth0", False),
     ("100.64.0.1", False), ("192.168.1.1", False), ("::ffff:10.0.0.1", False),
     ("0.0.0.0", False)],
)  # fmt: skip
def test_only_public_addresses_are_fetched_from(address: str, public: bool) -> None:
    """What the resolver and each URL's (or redirect's) address literal are checked by."""
    assert remote_images._public(address) is public


async def test_xllm_run_sends_images_one_shot_and_from_the_repl(
    client: TestClient[Any, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "red.png").write_bytes(RED)
    (tmp_path / "blue.jpg").write_bytes(BLUE)
    monkeypatch.setenv("XLLM_HOST", f"127.0.0.1:{client.port}")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # nothing piped
    argv = ["run", VISION, "describe", "--image", str(tmp_path / "red.png"),
            "--image", str(tmp_path / "blue.jpg")]  # fmt: skip
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert capsys.readouterr().out.split() == [_digest(RED), _digest(BLUE), "describe"]

    argv = ["run", TEXT, "describe", "--image", str(tmp_path / "red.png")]
    assert await asyncio.to_thread(cli.main, argv) == 1
    assert "model 'fake-text:latest' does not support images" in capsys.readouterr().err

    session = run.Session(VISION)
    assert await asyncio.to_thread(session.command, f"/image {tmp_path / 'red.png'}")
    assert await asyncio.to_thread(session.command, f"/image {tmp_path / 'missing.png'}")
    out = capsys.readouterr()
    assert "Added image" in out.out and "missing.png: No such file" in out.err
    await asyncio.to_thread(session.ask, "what")
    await asyncio.to_thread(session.ask, "again")  # the image went with the first message only
    assert capsys.readouterr().out.split() == [_digest(RED), "what", _digest(RED), "again"]


@pytest.mark.parametrize(
    "given",
    [
        pictures.data_uri(RED),
        pictures.data_uri(RED, ""),  # Ollama's `data:;base64,`
        pictures.b64(RED),
        pictures.b64(RED).rstrip("="),  # padding left off
        "\n".join(pictures.b64(RED)[i : i + 76] for i in range(0, len(pictures.b64(RED)), 76)),
    ],
    ids=["data URI", "data URI without type", "base64", "unpadded", "MIME lines"],
)
def test_the_forms_an_image_may_take(given: str) -> None:
    assert images.encoded(images.Source("image", given)) == RED
