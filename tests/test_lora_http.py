"""LoRA fields of requests, in-process: the wire models' checks on both dialects (a 400 naming
the field before any engine is asked), an engine without adapters refusing them, and how names
resolve against the loras folder and a model's own adapters (tests/e2e/test_lora.py serves
them on a real model)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests import fake_engine, gguf_make
from xllm.config import Settings
from xllm.errors import InvalidRequest
from xllm.models import loras
from xllm.server.app import create_app, make_registry
from xllm.server.ollama.wire import GenerateRequest
from xllm.server.openai.responses import ResponsesRequest
from xllm.server.openai.wire import ChatCompletionRequest

MODEL = "fake:latest"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    settings = Settings(models_dir=tmp_path / "models", memory_budget=10**9)
    registry = make_registry(settings, engines=fake_engine.engines())
    registry.add_path(fake_engine.model_folder(tmp_path / "fake"))
    async with TestClient(TestServer(create_app(settings, registry))) as c:
        yield c


def test_both_forms_become_the_same_adapter_set() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    listed = ChatCompletionRequest.model_validate_json(
        '{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
        '"lora": [{"name": "x", "scale": 0.5}, {"name": "y"}]}'
    )
    assert listed.sampling().lora == (("x", 0.5), ("y", 1.0))
    single = ChatCompletionRequest.model_validate({**chat, "lora": "x", "scale": 0.5})
    assert single.sampling().lora == (("x", 0.5),)
    assert ChatCompletionRequest.model_validate(chat).sampling().lora is None
    responses = ResponsesRequest.model_validate(
        {"model": "m", "input": "hi", "lora": [{"name": "x", "scale": 0.5}, {"name": "y"}]}
    )
    assert responses.loras() == (("x", 0.5), ("y", 1.0))
    responses = ResponsesRequest.model_validate({"model": "m", "input": "hi", "lora": "x"})
    assert responses.loras() == (("x", 1.0),)
    ollama = GenerateRequest.model_validate(
        {"model": "m", "options": {"lora": [{"name": "x", "scale": 2}]}}
    )
    assert ollama.options is not None and ollama.options.sampling().lora == (("x", 2.0),)


BAD = [
    ({"lora": [{"name": "a", "scale": 2.01}]}, "lora[0].scale", "less than or equal to 2"),
    ({"lora": [{"name": "a", "scale": -1}]}, "lora[0].scale", "greater than or equal to 0"),
    ({"lora": [{"name": "a", "scale": "1"}]}, "lora[0].scale", "valid number"),
    ({"lora": [{"name": "a"}, {"name": "a"}]}, "lora", "'a' is named twice"),
    ({"lora": [{"name": "a/b"}]}, "lora[0].name", "should match pattern"),
    ({"lora": [{"name": ""}]}, "lora[0].name", "should match pattern"),
    ({"lora": [{"scale": 1}]}, "lora[0].name", "Field required"),
    ({"lora": [{"name": f"n{i}"} for i in range(9)]}, "lora", "at most 8 items"),
    ({"lora": "a", "scale": 9}, "scale", "less than or equal to 2"),
    ({"scale": 0.5}, "scale", "scale goes with lora given as one adapter's name"),
    ({"lora": [{"name": "a"}], "scale": 0.5}, "scale", "scale goes with lora"),
    ({"lora": 3}, "lora", "valid"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD)
async def test_bad_lora_fields_are_400s_naming_them(
    client: TestClient[Any, Any], fields: dict[str, Any], param: str, message: str
) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    for path, body in (
        ("/v1/chat/completions", chat),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", **fields}),
        ("/v1/responses", {"model": MODEL, "input": "hi", **fields}),
    ):
        r = await client.post(path, json=body)
        err = (await r.json())["error"]
        assert r.status == 400, err
        assert err["param"] == param and message in err["message"], err
    if "scale" in fields or not isinstance(fields.get("lora"), list):
        return  # Ollama's options take the list form only
    r = await client.post(
        "/api/chat", json={**chat, "lora": None, "options": {"lora": fields["lora"]}}
    )
    err = (await r.json())["error"]
    assert r.status == 400 and f"options.{param}" in err and message in err, err


async def test_an_engine_without_adapters_refuses_them(client: TestClient[Any, Any]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    r = await client.post("/v1/chat/completions", json={**body, "lora": "a"})
    err = (await r.json())["error"]
    assert r.status == 400 and err["param"] == "lora", err
    assert "takes no LoRA adapters" in err["message"]
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "lora": "a"})
    err = (await r.json())["error"]
    assert r.status == 400 and err["param"] == "lora", err
    assert "takes no LoRA adapters" in err["message"]
    r = await client.post("/api/chat", json={**body, "stream": False, "options": {"lora": []}})
    assert r.status == 400 and "takes no LoRA adapters" in (await r.json())["error"]
    r = await client.post("/v1/chat/completions", json=body)  # none asked: served
    assert r.status == 200


def test_names_resolve_to_a_models_own_then_the_loras_folder(
    tmp_path: Path, smollm2_path: Path, tiny_path: Path
) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    good = gguf_make.lora(smollm2_path, folder / "good.gguf")
    gguf_make.lora(tiny_path, folder / "other.gguf")
    (folder / "bad name!.gguf").write_bytes(good.read_bytes())
    own = tmp_path / "sha256-0123456789abcdef0123"
    own.write_bytes(good.read_bytes())
    found = loras.resolve("0123456789ab", [own], folder)
    assert found.own and found.path == own
    found = loras.resolve("good", [own], folder)
    assert not found.own and found.path == good
    loras.check(found, [smollm2_path])  # fits
    with pytest.raises(InvalidRequest, match="lora: no LoRA adapter is named 'nope'"):
        loras.resolve("nope", [own], folder)
    with pytest.raises(InvalidRequest, match="do not fit it") as e:
        loras.check(loras.resolve("other", [], folder), [smollm2_path])
    assert e.value.param == "lora"
    listed = loras.available([own], folder, lambda: [smollm2_path])
    assert [(a.name, a.own) for a in listed] == [("0123456789ab", True), ("good", False)]
    assert loras.available([], None, lambda: [smollm2_path]) == []


async def test_embeddings_refuse_adapters_naming_the_field(client: TestClient[Any, Any]) -> None:
    """The embeddings context applies a model's own adapters only: a request's `lora` is a 400,
    never silently ignored (before any model is loaded)."""
    lora = [{"name": "a"}]
    r = await client.post("/v1/embeddings", json={"model": MODEL, "input": "hi", "lora": lora})
    err = (await r.json())["error"]
    assert r.status == 400 and err["param"] == "lora", err
    assert "embeddings take no per-request LoRA adapters" in err["message"]
    assert err["type"] == "invalid_request_error"
    for path, body in (
        ("/api/embed", {"model": MODEL, "input": "hi", "options": {"lora": lora}}),
        ("/api/embeddings", {"model": MODEL, "prompt": "hi", "options": {"lora": lora}}),
    ):
        r = await client.post(path, json=body)
        err = (await r.json())["error"]
        assert r.status == 400, err
        assert err.startswith("options.lora: embeddings take no per-request LoRA adapters"), err
    # an invalid list is still the wire's 400, naming the bad part
    body = {"model": MODEL, "input": "hi", "options": {"lora": [{"name": "a/b"}]}}
    r = await client.post("/api/embed", json=body)
    assert r.status == 400 and "options.lora[0].name" in (await r.json())["error"]
