"""`POST /v1/images/generations` and `GET /images/<id>` rules that need no model, in-process:
the real app, routes, file store and sweeper over a fake painter behind the engine seam (a
flat colour per seed), through a real HTTP round trip. Generation with stable-diffusion.cpp
is tests/e2e/test_images.py."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from tests import fake_engine
from xllm.config import Settings
from xllm.engine.plugins import Engines, LoadSpec, Manifest
from xllm.engine.protocol import ABI_VERSION, Capability, Generation, ImageGeneration, Request
from xllm.errors import InvalidRequest
from xllm.memory.planner import MiB, Plan
from xllm.server.app import create_app, make_registry

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class FakePainting:
    def __init__(self, job: ImageGeneration, hold: asyncio.Event | None) -> None:
        self.job = job
        self.hold = hold
        self.seconds = 0.0
        self.cancelled = False

    async def images(self, is_disconnected: Callable[[], bool] | None = None) -> list[bytes]:
        while self.hold is not None and not self.hold.is_set():
            if self.cancelled or (is_disconnected is not None and is_disconnected()):
                return []
            await asyncio.sleep(0.02)
        out = []
        for i in range(self.job.n):
            seed = self.job.seed + i
            image = Image.new("RGB", (self.job.width, self.job.height),
                              (seed % 256, seed // 256 % 256, 7))  # fmt: skip
            buf = io.BytesIO()
            image.save(buf, format=PIL_FORMATS[self.job.output_format])
            out.append(buf.getvalue())
        return out

    def cancel(self) -> None:
        self.cancelled = True


class FakePainter(fake_engine.FakeModel):
    """An image engine: each image is one flat colour that its seed picks."""

    kind = "fake-painter"
    capability_set = frozenset({Capability.IMAGE_GENERATION})
    samplers: Sequence[str] = ("euler", "euler_a")

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        self.jobs: list[FakePainting] = []
        self.hold: asyncio.Event | None = None

    async def generate(self, request: Request) -> Generation:
        raise InvalidRequest(f"model {self.name!r} makes images, not text", param="model")

    def extra_memory(self, width: int, height: int) -> int:
        """As the diffusion engine's: 2 KiB a pixel beyond the planned 512x512."""
        return max(width * height - 512 * 512, 0) * 2048

    async def paint(self, request: ImageGeneration) -> FakePainting:
        if request.sampler is not None and request.sampler not in self.samplers:
            raise InvalidRequest(f"sampler: {request.sampler!r} is unknown", param="sampler")
        self.jobs.append(FakePainting(request, self.hold))
        return self.jobs[-1]


PAINTERS: list[FakePainter] = []


async def _load(spec: LoadSpec) -> FakePainter:
    PAINTERS.append(FakePainter(spec))
    return PAINTERS[-1]


MANIFEST = Manifest(
    name="fake-painter", version="1", abi=ABI_VERSION, formats=("safetensors",),
    architectures=frozenset({"FakePainter"}),
    capabilities=frozenset({Capability.IMAGE_GENERATION}), load=_load,
    estimate=lambda spec: Plan(weights=40 * MiB, kv=0, compute=0, output=0, layers=0,
                               gpu_layers=0, vram=0),
)  # fmt: skip


async def _client(tmp_path: Path, **settings: Any) -> TestClient[Any, Any]:
    config = Settings(models_dir=tmp_path / "models", images_dir=tmp_path / "images", **settings)
    registry = make_registry(config, engines=Engines([fake_engine.MANIFEST, MANIFEST]))
    registry.add_path(fake_engine.model_folder(tmp_path / "painter", "FakePainter"))
    registry.add_path(fake_engine.model_folder(tmp_path / "painter2", "FakePainter"))
    registry.add_path(fake_engine.model_folder(tmp_path / "fake"))
    PAINTERS.clear()
    fake_engine.FakeEngine.instances.clear()
    client = TestClient(TestServer(create_app(config, registry)))
    await client.start_server()
    return client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    c = await _client(tmp_path)
    yield c
    await c.close()


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "painter", "prompt": "a red apple", "size": "100x70", **extra}


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": " \n\t "}, "prompt"),
        ({"prompt": "a" * 32_001}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": ["a list"]}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"n": 1.5}, "n"),
        ({"n": "2"}, "n"),
        ({"size": "100"}, "size"),
        ({"size": "0x64"}, "size"),
        ({"size": "64x0"}, "size"),
        ({"size": "-64x64"}, "size"),
        ({"size": "64X64"}, "size"),
        ({"size": "64x64x64"}, "size"),
        ({"size": "4097x4096"}, "size"),
        ({"size": 512}, "size"),
        ({"response_format": "file"}, "response_format"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 101}, "output_compression"),
        ({"quality": "ultra"}, "quality"),
        ({"style": "pastel"}, "style"),
        ({"background": "transparent"}, "background"),
        ({"stream": True}, "stream"),
        ({"seed": -2}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"cfg_scale": -1}, "cfg_scale"),
        ({"cfg_scale": 31}, "cfg_scale"),
        ({"sampler": "magic"}, "sampler"),
        ({"negative_prompt": 5}, "negative_prompt"),
        ({"model": "fake"}, "model"),
        ({"model": ""}, "model"),
    ],
)
async def test_a_bad_field_is_a_400_naming_it(
    client: TestClient[Any, Any], change: dict[str, Any], param: str
) -> None:
    r = await client.post("/v1/images/generations", json=_body(**change))
    body = await r.json()
    assert r.status == 400, body
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"
    assert param in body["error"]["message"]


async def test_missing_fields_and_unknown_model(client: TestClient[Any, Any]) -> None:
    r = await client.post("/v1/images/generations", json={"model": "painter"})
    assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"
    r = await client.post("/v1/images/generations", json={"prompt": "hi"})
    assert r.status == 400 and (await r.json())["error"]["param"] == "model"
    r = await client.post("/v1/images/generations", json=_body(model="nothing-here"))
    assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"


async def test_a_text_model_asked_for_images_is_refused_before_it_loads(
    client: TestClient[Any, Any],
) -> None:
    r = await client.post("/v1/images/generations", json=_body(model="fake"))
    body = await r.json()
    assert r.status == 400 and "does not generate images" in body["error"]["message"]
    assert fake_engine.FakeEngine.instances == []


async def test_an_image_model_asked_to_chat_is_a_400_naming_model(
    client: TestClient[Any, Any],
) -> None:
    r = await client.post("/v1/chat/completions",
                          json={"model": "painter", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    body = await r.json()
    assert r.status == 400 and body["error"]["param"] == "model", body
    r = await client.post("/api/generate", json={"model": "painter", "prompt": "hi"})
    assert r.status == 400 and "images" in (await r.json())["error"]


async def test_the_pixel_limit_is_a_setting(tmp_path: Path) -> None:
    client = await _client(tmp_path, images_max_pixels=64 * 64)
    try:
        ok = await client.post("/v1/images/generations", json=_body(size="64x64"))
        assert ok.status == 200
        r = await client.post("/v1/images/generations", json=_body(size="65x64"))
        body = await r.json()
        assert r.status == 400 and body["error"]["param"] == "size"
        assert (
            "4096" in body["error"]["message"] and "images.max_pixels" in body["error"]["message"]
        )
    finally:
        await client.close()


async def test_a_large_image_makes_room_or_is_a_507_naming_size(tmp_path: Path) -> None:
    """Each painter plans 40 MiB (512x512) of a 100 MiB budget; 527x527 takes 30 MiB more, so
    the idle other painter is unloaded; 2048x2048 takes 7.5 GiB more: refused before it runs."""
    client = await _client(tmp_path, memory_budget=100 * MiB)
    try:
        for model in ("painter2", "painter"):
            ok = await client.post(
                "/v1/images/generations", json=_body(model=model, size="512x512")
            )
            assert ok.status == 200
        r = await client.post("/v1/images/generations", json=_body(size="527x527"))
        assert r.status == 200, await r.json()
        ps = await (await client.get("/api/ps")).json()
        assert [m["name"] for m in ps["models"]] == ["painter:latest"]
        r = await client.post("/v1/images/generations", json=_body(size="2048x2048"))
        body = await r.json()
        assert r.status == 507, body
        assert body["error"]["param"] == "size"
        assert body["error"]["code"] == "insufficient_memory"
        message = body["error"]["message"]
        assert message.startswith("size: ") and "2048x2048" in message
        assert [j.job.width for j in PAINTERS[-1].jobs] == [512, 527]  # nothing queued
        ps = await (await client.get("/api/ps")).json()
        assert [m["name"] for m in ps["models"]] == ["painter:latest"]  # still serving
    finally:
        await client.close()


async def test_health_counts_a_large_image_s_memory_while_it_is_made(tmp_path: Path) -> None:
    client = await _client(tmp_path, memory_budget=100 * MiB)
    try:
        assert (await client.post("/v1/images/generations", json=_body())).status == 200

        async def memory() -> dict[str, int]:
            health = await (await client.get("/v0/health")).json()
            return dict(health["node"]["memory"])

        idle = await memory()
        assert idle["models_ram_bytes"] == 40 * MiB and idle["headroom_bytes"] == 60 * MiB
        painter = PAINTERS[0]
        painter.hold = asyncio.Event()
        task = asyncio.create_task(
            client.post("/v1/images/generations", json=_body(size="527x527"))
        )
        for _ in range(250):
            if len(painter.jobs) == 2:
                break
            await asyncio.sleep(0.02)
        extra = painter.extra_memory(527, 527)
        busy = await memory()  # the image's buffers beyond the plan, while it is made
        assert busy["models_ram_bytes"] == 40 * MiB + extra
        assert busy["headroom_bytes"] == 60 * MiB - extra
        painter.hold.set()
        assert (await task).status == 200
        after = await memory()  # given back
        assert (after["models_ram_bytes"], after["headroom_bytes"]) == (40 * MiB, 60 * MiB)
    finally:
        await client.close()


async def test_b64_json_gives_n_images_of_the_exact_size_and_writes_no_file(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    r = await client.post("/v1/images/generations",
                          json=_body(n=2, response_format="b64_json", seed=5))  # fmt: skip
    body = await r.json()
    assert r.status == 200, body
    images = [_png(base64.b64decode(d["b64_json"])) for d in body["data"]]
    assert [(i.format, i.size) for i in images] == [("PNG", (100, 70))] * 2
    assert images[0].getpixel((0, 0)) != images[1].getpixel((0, 0))
    assert body["size"] == "100x70" and body["output_format"] == "png"
    assert isinstance(body["created"], int)
    assert not (tmp_path / "images").exists() or not list((tmp_path / "images").iterdir())
    job = PAINTERS[0].jobs[0].job
    assert (job.seed, job.n, job.width, job.height) == (5, 2, 100, 70)


async def test_the_extensions_reach_the_engine(client: TestClient[Any, Any]) -> None:
    r = await client.post("/v1/images/generations", json=_body(
        negative_prompt="blurry", steps=4, cfg_scale=1.5, sampler="euler", quality="hd",
        style="natural", response_format="b64_json", output_format="jpeg", output_compression=80,
    ))  # fmt: skip
    assert r.status == 200, await r.text()
    job = PAINTERS[0].jobs[0].job
    assert (job.negative_prompt, job.steps, job.cfg_scale, job.sampler) == (
        "blurry",
        4,
        1.5,
        "euler",
    )
    assert (job.output_format, job.quality) == ("jpeg", 80)
    body = await r.json()
    assert _png(base64.b64decode(body["data"][0]["b64_json"])).format == "JPEG"


async def test_without_a_seed_each_request_draws_one(client: TestClient[Any, Any]) -> None:
    for _ in range(2):
        r = await client.post("/v1/images/generations", json=_body(response_format="b64_json"))
        assert r.status == 200
    r = await client.post("/v1/images/generations", json=_body(seed=-1, response_format="b64_json"))
    assert r.status == 200
    seeds = [p.job.seed for p in PAINTERS[0].jobs]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**31 for s in seeds)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_a_url_serves_the_file_with_its_type(
    client: TestClient[Any, Any], tmp_path: Path, fmt: str
) -> None:
    r = await client.post("/v1/images/generations", json=_body(output_format=fmt))
    body = await r.json()
    url = body["data"][0]["url"]
    host = f"http://{client.server.host}:{client.server.port}"
    assert url.startswith(f"{host}/images/") and url.endswith(f".{fmt}")
    got = await client.get(url.removeprefix(host))
    assert got.status == 200
    assert got.headers["Content-Type"] == f"image/{fmt}"
    image = _png(await got.read())
    assert image.size == (100, 70) and image.format == PIL_FORMATS[fmt]
    files = list((tmp_path / "images").iterdir())
    assert [f.name for f in files] == [url.rsplit("/", 1)[1]]
    assert files[0].stat().st_mode & 0o777 == 0o600


async def test_the_url_uses_the_configured_public_base(tmp_path: Path) -> None:
    client = await _client(tmp_path, images_public_url="https://img.example.com/x")
    try:
        r = await client.post("/v1/images/generations", json=_body())
        url = (await r.json())["data"][0]["url"]
        assert url.startswith("https://img.example.com/x/images/") and url.endswith(".png")
    finally:
        await client.close()


@pytest.mark.parametrize(
    "path",
    [
        "/images/",
        "/images",
        "/images/../config.yaml",
        "/images/..%2Fconfig.yaml",
        "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/images/0123456789abcdef0123456789abcdef.gif",
        "/images/0123456789ABCDEF0123456789ABCDEF.png",
        "/images/0123456789abcdef0123456789abcdef.png",
        "/images/0123456789abcdef0123456789abcde.png",
        "/images/.0123456789abcdef0123456789abcdef.png.tmp",
        "/images/%00.png",
    ],
)
async def test_anything_but_an_existing_id_is_a_404(
    client: TestClient[Any, Any], tmp_path: Path, path: str
) -> None:
    r = await client.post("/v1/images/generations", json=_body())  # a real file is there
    assert r.status == 200
    (tmp_path / "config.yaml").write_text("secret: 1\n")
    got = await client.get(path)
    assert got.status == 404, path
    assert b"secret" not in await got.read()


async def test_an_expired_image_is_gone_and_the_sweeper_runs_at_start(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    old = folder / ("a" * 32 + ".png")
    old.write_bytes(b"old")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    stranger = folder / "notes.txt"  # not ours: never touched
    stranger.write_text("keep")
    client = await _client(tmp_path, images_ttl_hours=1.5 / 3600)
    try:
        assert not old.exists()
        assert stranger.exists()
        r = await client.post("/v1/images/generations", json=_body())
        url = (await r.json())["data"][0]["url"]
        path = "/images/" + url.rsplit("/", 1)[1]
        assert (await client.get(path)).status == 200
        await asyncio.sleep(1.7)
        assert (await client.get(path)).status == 404
        assert list(folder.iterdir()) == [stranger]
    finally:
        await client.close()


async def test_images_need_no_key_but_generation_does(tmp_path: Path) -> None:
    client = await _client(tmp_path, api_keys=("k1",))
    try:
        r = await client.post("/v1/images/generations", json=_body())
        assert r.status == 401
        auth = {"Authorization": "Bearer k1"}
        r = await client.post("/v1/images/generations", json=_body(), headers=auth)
        url = (await r.json())["data"][0]["url"]
        assert (await client.get("/images/" + url.rsplit("/", 1)[1])).status == 200
        assert (await client.get("/images/")).status in (401, 404)
    finally:
        await client.close()


async def test_a_client_that_leaves_cancels_its_generation(client: TestClient[Any, Any]) -> None:
    await client.post("/v1/images/generations", json=_body(response_format="b64_json"))
    painter = PAINTERS[0]
    painter.hold = asyncio.Event()
    task = asyncio.create_task(client.post("/v1/images/generations", json=_body()))
    for _ in range(250):
        if len(painter.jobs) == 2:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if painter.jobs[1].cancelled:
            break
        await asyncio.sleep(0.02)
    assert painter.jobs[1].cancelled
    painter.hold.set()
    r = await client.post("/v1/images/generations", json=_body(response_format="b64_json"))
    assert r.status == 200
