"""Embeddings on both dialects, in-process over fake engines: what each endpoint makes of its
wire format, and the rules `xllm.embedding.embed` keeps for all of them (tokens, vocabulary,
context length, truncation, normalization, token counts)."""

from __future__ import annotations

import base64
import dataclasses
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests import fake_engine
from tests.fake_engine import FakeEngine
from xllm.config import Settings
from xllm.engine.plugins import Engines, LoadSpec
from xllm.engine.protocol import Capability
from xllm.server.app import create_app, make_registry

EMBEDDER = "emb:latest"
CTX = 6


class FakeEmbedder(FakeEngine):
    """Tokens are the lengths of the words; a vector is (token count, token sum, normalize)."""

    calls: ClassVar[list[tuple[list[list[int]], bool]]] = []

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        self.info = dataclasses.replace(self.info, n_vocab=10, embedding_length=3)
        self.ctx_size = CTX

    async def tokenize(self, text: str, *, special: bool) -> list[int]:
        assert special
        return [len(w) for w in text.split()]

    async def detokenize(self, tokens: Any) -> str:
        raise NotImplementedError

    async def embed(self, inputs: list[list[int]], normalize: bool = True) -> list[list[float]]:
        FakeEmbedder.calls.append((inputs, normalize))
        return [[float(len(t)), float(sum(t)), float(normalize)] for t in inputs]


async def _load(spec: LoadSpec) -> FakeEmbedder:
    return FakeEmbedder(spec)


MANIFEST = dataclasses.replace(
    fake_engine.MANIFEST,
    name="fake-embedder",
    architectures=frozenset({"FakeEmbedLM"}),
    capabilities=frozenset({Capability.EMBEDDING}),
    load=_load,
)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    settings = Settings(models_dir=tmp_path / "models")
    registry = make_registry(settings, engines=Engines([fake_engine.MANIFEST, MANIFEST]))
    registry.add_path(fake_engine.model_folder(tmp_path / "fake"))
    registry.add_path(fake_engine.model_folder(tmp_path / "emb", "FakeEmbedLM"))
    FakeEmbedder.calls.clear()
    async with TestClient(TestServer(create_app(settings, registry))) as c:
        yield c


async def _post(client: TestClient[Any, Any], path: str, body: dict[str, Any]) -> Any:
    r = await client.post(path, json=body)
    assert r.status == 200, await r.text()
    return await r.json()


async def test_openai_texts_and_token_ids(client: TestClient[Any, Any]) -> None:
    body = await _post(client, "/v1/embeddings", {"model": EMBEDDER, "input": "a bb ccc"})
    assert body == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [3.0, 6.0, 1.0]}],
        "model": EMBEDDER,
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    body = await _post(client, "/v1/embeddings", {"model": EMBEDDER, "input": ["a", "bb cc"]})
    assert [d["embedding"] for d in body["data"]] == [[1.0, 1.0, 1.0], [2.0, 4.0, 1.0]]
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    body = await _post(client, "/v1/embeddings", {"model": EMBEDDER, "input": [9, 0, 4]})
    assert body["data"][0]["embedding"] == [3.0, 13.0, 1.0]
    assert FakeEmbedder.calls[-1] == ([[9, 0, 4]], True)
    body = await _post(
        client,
        "/v1/embeddings",
        {"model": EMBEDDER, "input": "abc", "encoding_format": "base64", "dimensions": 3},
    )
    packed = base64.b64decode(body["data"][0]["embedding"])
    assert array("f", packed).tolist() == [1.0, 3.0, 1.0]


async def test_ollama_embed_truncates_by_default_and_cuts_dimensions(
    client: TestClient[Any, Any],
) -> None:
    long = "a b c d e f g h"  # 8 tokens, the context holds 6
    body = await _post(client, "/api/embed", {"model": EMBEDDER, "input": ["ab", long]})
    assert body["embeddings"] == [[1.0, 2.0, 1.0], [6.0, 6.0, 1.0]]
    assert body["prompt_eval_count"] == 7
    assert body["total_duration"] >= body["load_duration"] >= 0
    body = await _post(client, "/api/embed", {"model": EMBEDDER, "input": "ab", "dimensions": 2})
    assert body["embeddings"] == [[1.0, 2.0]]


async def test_legacy_embeddings_are_not_normalized(client: TestClient[Any, Any]) -> None:
    body = await _post(client, "/api/embeddings", {"model": EMBEDDER, "prompt": "a b c d e f g"})
    assert body == {"embedding": [6.0, 6.0, 0.0]}
    assert FakeEmbedder.calls[-1] == ([[1] * CTX], False)
    body = await _post(client, "/api/embeddings", {"model": EMBEDDER, "prompt": ""})
    assert body == {"embedding": []}
    assert len(FakeEmbedder.calls) == 1  # an empty prompt reaches no engine


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/v1/embeddings", {"input": "a b c d e f g"}, "input", "input[0] is 7 tokens, more than"),
        ("/v1/embeddings", {"input": ["a", "a b c d e f g"]}, "input", "input[1] is 7 tokens"),
        ("/v1/embeddings", {"input": [3, 10]}, "input", "token id 10 is outside the vocabulary"),
        ("/v1/embeddings", {"input": "a", "dimensions": 4}, "dimensions", "have 3 dimensions"),
        ("/v1/embeddings", {"input": "   "}, "input", "input[0] is empty"),
        ("/api/embed", {"input": "a b c d e f g", "truncate": False}, "input", "7 tokens"),
        ("/api/embed", {"input": ["a", ""]}, "input", "empty text cannot be embedded"),
        ("/api/embed", {}, "input", "empty text cannot be embedded"),
        ("/api/embeddings", {"prompt": "   "}, "prompt", "prompt[0] is empty"),
    ],
)
async def test_refusals(
    client: TestClient[Any, Any], path: str, body: dict[str, Any], param: str, message: str
) -> None:
    r = await client.post(path, json={"model": EMBEDDER, **body})
    assert r.status == 400
    error = (await r.json())["error"]
    text = error["message"] if path.startswith("/v1/") else error
    assert message in text
    if path.startswith("/v1/"):
        assert error["param"] == param and error["type"] == "invalid_request_error"
    assert FakeEmbedder.calls == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"input": "hello"}),
        ("/api/embed", {"input": "hello"}),
        ("/api/embeddings", {"prompt": "hello"}),
    ],
)
async def test_an_engine_without_embeddings_is_refused(
    client: TestClient[Any, Any], path: str, body: dict[str, Any]
) -> None:
    r = await client.post(path, json={"model": "fake:latest", **body})
    assert r.status == 400
    error = (await r.json())["error"]
    text = error["message"] if path.startswith("/v1/") else error
    assert text == "model 'fake:latest' does not support embeddings"
    if path.startswith("/v1/"):
        assert error["param"] == "model"
