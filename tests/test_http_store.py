"""A damaged model store over HTTP, in-process: the server's 500 (model_corrupt) naming the
manifest (and the blob), in each dialect's shape, while the lists go on listing the others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests import fake_engine
from xllm.config import Settings
from xllm.models import store as st
from xllm.models.names import parse_name
from xllm.models.store import Layer, Manifest, Store
from xllm.server.app import create_app, make_registry

SCRAWLED = "the manifest of model 'scrawled:latest' ({path}) is corrupt: the manifest is not valid "
LOST = "the manifest of model 'lost:latest' ({path}) is corrupt: its blob {digest} ({blob}) is "


def _place(s: Store, name: str, data: bytes) -> Manifest:
    model = Layer(st.MODEL, asyncio.run(s.add_bytes(data)), len(data))
    config = Layer(st.CONFIG_TYPE, asyncio.run(s.add_bytes(name.encode())), len(name))
    manifest = Manifest(config, (model,))
    s.write_manifest(parse_name(name), manifest.to_bytes())
    return manifest


@pytest.fixture
def damaged(tmp_path: Path, tiny_path: Path) -> dict[str, str]:
    """A store with `tiny` whole, `scrawled` (a torn manifest) and `lost` (its model's blob
    gone): the messages their errors start with."""
    s = Store(tmp_path / "models")
    _place(s, "tiny", tiny_path.read_bytes())
    _place(s, "scrawled", tiny_path.read_bytes())
    scrawled = s.manifest_path(parse_name("scrawled"))
    scrawled.write_text('{"schemaVersion": 2, "layers": [')
    lost = _place(s, "lost", b"GGUF" + b"\1" * 60)
    blob = s.blob_path(lost.layers[0].digest)
    blob.unlink()
    return {
        "scrawled": SCRAWLED.format(path=scrawled),
        "lost": LOST.format(
            path=s.manifest_path(parse_name("lost")), digest=lost.layers[0].digest, blob=blob
        ),
    }


@pytest.fixture
async def client(tmp_path: Path, damaged: dict[str, str]) -> AsyncIterator[TestClient[Any, Any]]:
    settings = Settings(models_dir=tmp_path / "models")
    registry = make_registry(settings, engines=fake_engine.engines())
    registry.add_path(fake_engine.model_folder(tmp_path / "fake"))
    async with TestClient(TestServer(create_app(settings, registry))) as c:
        yield c


@pytest.mark.parametrize("model", ["scrawled", "lost"])
async def test_a_damaged_model_is_the_servers_500_in_each_dialect(
    client: TestClient[Any, Any], damaged: dict[str, str], model: str
) -> None:
    start = damaged[model]
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    for method, path, body in (
        ("POST", "/api/show", {"model": model}),
        ("POST", "/api/chat", chat),
        ("POST", "/api/generate", {"model": model, "prompt": "hi"}),
    ):
        r = await client.request(method, path, json=body)
        error = (await r.json())["error"]
        assert r.status == 500 and isinstance(error, str), (path, error)
        assert error.startswith(start) and f"`xllm rm {model}:latest`" in error, (path, error)
    for method, path, body in (
        ("POST", "/v1/chat/completions", chat),
        ("GET", f"/v1/models/{model}", None),
    ):
        r = await client.request(method, path, json=body)
        error = (await r.json())["error"]
        assert r.status == 500, (path, error)
        assert (error["type"], error["code"]) == ("server_error", "model_corrupt"), path
        assert error["message"].startswith(start), (path, error)


async def test_the_lists_leave_out_a_damaged_model_and_list_the_others(
    client: TestClient[Any, Any],
) -> None:
    r = await client.get("/api/tags")
    assert r.status == 200
    listed = {m["name"] for m in (await r.json())["models"]}
    assert {"fake:latest", "tiny:latest"} <= listed
    assert not {"scrawled:latest", "lost:latest"} & listed
    r = await client.get("/v1/models")
    assert r.status == 200
    # GGUFs (tiny, the bundled models) are not the fake engine's: OpenAI's list leaves them out
    assert [m["id"] for m in (await r.json())["data"]] == ["fake:latest"]
    r = await client.post("/api/show", json={"model": "never-was"})
    assert r.status == 404  # a model that is not there is still the client's 404
