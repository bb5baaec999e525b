"""HTTP behaviour that needs no model, in-process: the real app, routes, middleware, stream pump
and engine seam over a fake engine (tests/fake_engine.py), through a real HTTP round trip
(aiohttp's test server and client).

Error shapes per dialect, the streaming rules (errors before the first byte are plain error
responses, after it an error event in the stream's format and its terminator), disconnects
cancelling the generation in the engine, a full engine's 503, and request validation tables.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests import fake_engine
from tests.fake_engine import FakeEngine
from xllm.config import Settings
from xllm.server.app import create_app, make_registry

MODEL = "fake:latest"


BUDGET = 10**9
"""The fixture's `memory.budget`: the fake model plans no memory, so it is all headroom."""


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    settings = Settings(models_dir=tmp_path / "models", memory_budget=BUDGET)
    registry = make_registry(settings, engines=fake_engine.engines())
    registry.add_path(fake_engine.model_folder(tmp_path / "fake"))
    FakeEngine.instances.clear()
    async with TestClient(TestServer(create_app(settings, registry))) as c:
        yield c


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


async def test_a_chat_is_served_through_the_seam_on_both_dialects(
    client: TestClient[Any, Any],
) -> None:
    r = await client.post("/v1/chat/completions", json=_chat("hello there"))
    body = await r.json()
    assert r.status == 200, body
    assert body["choices"][0]["message"]["content"] == "hello there"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 2
    r = await client.post("/api/chat", json={**_chat("hello there"), "stream": False})
    body = await r.json()
    assert r.status == 200, body
    assert body["message"] == {"role": "assistant", "content": "hello there"}
    assert body["done"] is True and body["eval_count"] == 2


async def test_streams_on_every_endpoint(client: TestClient[Any, Any]) -> None:
    r = await client.post("/v1/chat/completions", json=_chat("a b c", stream=True))
    events = [line for line in (await r.text()).split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "a b c"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 3

    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x y", "stream": True})
    events = [line for line in (await r.text()).split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    texts = [json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == "x y"

    r = await client.post("/api/generate", json={"model": MODEL, "prompt": "p q", "raw": True})
    records = [json.loads(line) for line in (await r.text()).splitlines()]
    assert "".join(x["response"] for x in records) == "p q"
    assert records[-1]["done"] is True and records[-1]["done_reason"] == "stop"

    r = await client.post("/v1/responses", json={"model": MODEL, "input": "u v", "stream": True})
    kinds = [e.split("\n")[0].removeprefix("event: ") for e in (await r.text()).split("\n\n") if e]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_before_the_first_byte_is_a_plain_error_response(
    client: TestClient[Any, Any], stream: bool
) -> None:
    r = await client.post("/v1/chat/completions", json=_chat("fail-before", stream=stream))
    assert r.status == 400
    assert r.content_type == "application/json"
    error = (await r.json())["error"]
    assert error["message"] == "the fake engine refuses this prompt"
    assert error["param"] == "messages" and error["type"] == "invalid_request_error"
    r = await client.post("/api/chat", json=_chat("fail-before", stream=stream))
    assert r.status == 400
    assert await r.json() == {"error": "the fake engine refuses this prompt"}


async def test_an_error_after_the_first_byte_goes_into_the_stream(
    client: TestClient[Any, Any],
) -> None:
    r = await client.post("/v1/chat/completions", json=_chat("fail-after x y z", stream=True))
    assert r.status == 200
    events = [e for e in (await r.text()).split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "the fake engine broke" in error["message"]
    assert "fail-after x" in "".join(
        json.loads(e.removeprefix("data: "))["choices"][0]["delta"].get("content", "")
        for e in events[:-2]
    )

    r = await client.post("/api/chat", json=_chat("fail-after x y z"))
    lines = [json.loads(line) for line in (await r.text()).splitlines()]
    assert "the fake engine broke" in lines[-1]["error"]
    assert all("error" not in x for x in lines[:-1]) and not any(x.get("done") for x in lines)

    r = await client.post(
        "/v1/responses", json={"model": MODEL, "input": "fail-after x y", "stream": True}
    )
    last = (await r.text()).strip().split("\n\n")[-1]
    assert last.startswith("event: error")
    assert "the fake engine broke" in json.loads(last.split("data: ", 1)[1])["message"]

    # without a stream it is an ordinary 500
    r = await client.post("/v1/chat/completions", json=_chat("fail-after x y z"))
    assert r.status == 500 and "the fake engine broke" in (await r.json())["error"]["message"]


async def test_a_client_that_disconnects_cancels_its_generation(
    client: TestClient[Any, Any],
) -> None:
    words = " ".join(["slow"] + ["w"] * 200)  # 10 s at 50 ms a word
    r = await client.post("/v1/chat/completions", json=_chat(words, stream=True))
    await r.content.readany()  # the first bytes are there: the generation runs
    (engine,) = FakeEngine.instances
    (gen,) = engine.generations
    r.close()
    for _ in range(100):
        if gen.cancelled:
            break
        await asyncio.sleep(0.05)
    assert gen.cancelled and not gen.finished
    assert not engine.busy


async def test_a_full_engine_is_a_503_with_retry_after(client: TestClient[Any, Any]) -> None:
    words = " ".join(["slow"] + ["w"] * 40)
    streams = [
        await client.post("/v1/chat/completions", json=_chat(words, stream=True))
        for _ in range(fake_engine.LIMIT)
    ]
    r = await client.post("/v1/chat/completions", json=_chat("one more"))
    assert r.status == 503 and "Retry-After" in r.headers
    assert "already running" in (await r.json())["error"]["message"]
    r = await client.post("/api/generate", json={"model": MODEL, "prompt": "one more"})
    assert r.status == 503 and "already running" in (await r.json())["error"]
    for s in streams:
        s.close()


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": MODEL}, "messages"),
        ("/v1/chat/completions", _chat("x", temperature=3), "temperature"),
        ("/v1/chat/completions", _chat("x", n=0), "n"),
        ("/v1/chat/completions", _chat("x", max_tokens=0), "max_tokens"),
        ("/v1/chat/completions", _chat("x", stop=["s"] * 33), "stop"),
        ("/v1/chat/completions", _chat("x", logit_bias={"a": 1}), "logit_bias"),
        ("/v1/chat/completions", _chat("x", engine="no/such"), "engine"),
        ("/v1/chat/completions", _chat("x", engine="llama.cpp"), "engine"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 2}, "top_p"),
        ("/v1/embeddings", {"model": MODEL, "input": []}, "input"),
        ("/v1/responses", {"model": MODEL}, "input"),
        ("/v1/chat/completions", _chat("x", speculative={"type": "eagle"}), "speculative.type"),
        ("/v1/chat/completions", _chat("x", speculative="ngram"), "speculative"),
        ("/v1/chat/completions", _chat("x", speculative={"max_draft": 4}), "speculative.type"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "speculative": {"type": "ngram", "max_draft": 65}},
            "speculative.max_draft",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "speculative": {"type": "ngram", "n_max": 4}},
            "speculative.n_max",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "speculative": {"type": "ngram", "min_p": 0.5}},
            "speculative",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "speculative": {"type": "draft", "min_p": 1.5}},
            "speculative.min_p",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "speculative": {"type": "draft", "draft_model": ""}},
            "speculative.draft_model",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "speculative": {"type": "auto", "adaptive": False}},
            "speculative",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "speculative": {"type": "draft", "adaptive": "no"}},
            "speculative.adaptive",
        ),
        ("/v1/chat/completions", _chat("x", prediction={"type": "text"}), "prediction.type"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "prediction": {"type": "content", "content": 5}},
            "prediction.content",
        ),
    ],
)
async def test_openai_validation(
    client: TestClient[Any, Any], path: str, body: dict[str, Any], param: str
) -> None:
    r = await client.post(path, json=body)
    error = (await r.json())["error"]
    assert r.status == 400, error
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param) or param in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/api/chat", {"model": MODEL, "messages": "hi"}, "messages"),
        ("/api/chat", {**_chat("x"), "options": {"temperature": -1}}, "temperature"),
        ("/api/chat", {**_chat("x"), "keep_alive": "forever"}, "keep_alive"),
        ("/api/chat", {**_chat("x"), "options": {"num_ctx": 1}}, "num_ctx"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"top_k": -1}}, "top_k"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "context": [-1]}, "context"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "think": True}, "think"),
        ("/api/embed", {"model": MODEL, "input": 5}, "input"),
        ("/api/chat", {**_chat("x"), "options": {"speculative": "eagle"}}, "speculative"),
        ("/api/chat", {**_chat("x"), "options": {"max_draft": -1}}, "max_draft"),
        (
            "/api/generate",
            {"model": MODEL, "prompt": "x", "options": {"max_draft": 99}},
            "max_draft",
        ),
    ],
)
async def test_ollama_validation(
    client: TestClient[Any, Any], path: str, body: dict[str, Any], words: str
) -> None:
    r = await client.post(path, json=body)
    error = (await r.json())["error"]
    assert r.status == 400, error
    assert isinstance(error, str) and words in error


async def test_speculation_fields_reach_the_engine(client: TestClient[Any, Any]) -> None:
    ok = _chat("x", speculative={"type": "ngram", "max_draft": 0})
    ok["prediction"] = {"type": "content", "content": [{"type": "text", "text": "x"}]}
    r = await client.post("/v1/chat/completions", json=ok)
    assert r.status == 200, await r.text()
    draft = {"type": "draft", "draft_model": "small", "min_p": 0.25, "max_draft": 4}
    draft["adaptive"] = False
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "x", "speculative": draft}
    )
    assert r.status == 200, await r.text()
    sampling = FakeEngine.instances[-1].requests[-1].sampling
    assert (
        sampling.speculative,
        sampling.draft_model,
        sampling.draft_min_p,
        sampling.max_draft,
        sampling.draft_adaptive,
    ) == (
        "draft",
        "small",
        0.25,
        4,
        False,
    )
    options = {"speculative": "draft", "draft_adaptive": False, "draft_num_predict": 3}
    r = await client.post(
        "/api/generate", json={"model": MODEL, "prompt": "x", "stream": False, "options": options}
    )
    assert r.status == 200, await r.text()
    sampling = FakeEngine.instances[-1].requests[-1].sampling
    assert (sampling.speculative, sampling.draft_adaptive, sampling.max_draft) == (
        "draft",
        False,
        3,
    )


async def test_unknown_models_and_paths_have_each_dialects_shape(
    client: TestClient[Any, Any],
) -> None:
    r = await client.post("/v1/chat/completions", json={**_chat("x"), "model": "nope"})
    assert r.status == 404
    assert (await r.json())["error"]["code"] == "model_not_found"
    r = await client.post("/api/chat", json={**_chat("x"), "model": "nope"})
    assert r.status == 404 and "not found" in (await r.json())["error"]


async def test_the_fake_model_is_listed_and_its_engine_reported(
    client: TestClient[Any, Any],
) -> None:
    ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    assert MODEL in ids
    await client.post("/v1/chat/completions", json=_chat("x"))
    health = await (await client.get("/v0/health")).json()
    engines = {e["name"]: e["state"] for e in health["engines"]}
    assert engines["fake"] == "loaded"
    assert [m["engine"] for m in health["models"]] == ["fake"]


async def test_the_error_dialect_comes_from_the_route_table(client: TestClient[Any, Any]) -> None:
    # `/` is Ollama's ("Ollama is running") though it is not under /api/
    r = await client.post("/")
    assert r.status == 405 and isinstance((await r.json())["error"], str)
    r = await client.get("/v0/health/nope")
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    # a path no route matches takes the dialect of the routes under its first segment
    r = await client.get("/api/nope")
    assert r.status == 404 and isinstance((await r.json())["error"], str)
    r = await client.get("/v1/nope")
    assert r.status == 404 and isinstance((await r.json())["error"], dict)


async def test_health_and_metrics_carry_what_a_balancer_routes_on(
    client: TestClient[Any, Any],
) -> None:
    words = " ".join(["slow"] + ["w"] * 100)
    r = await client.post("/v1/chat/completions", json=_chat(words, stream=True))
    await r.content.readany()  # one generation runs
    health = await (await client.get("/v0/health")).json()
    scrape = {
        (s.name, tuple(s.labels.values())): s.value
        for family in text_string_to_metric_families(await (await client.get("/v0/metrics")).text())
        for s in family.samples
    }
    r.close()
    assert health["schema_version"] == 1 and health["status"] == "ok"
    assert health["draining"] is False
    node = health["node"]
    counts = ("models_loaded", "queue_depth", "running", "free_slots", "requests_in_flight")
    assert all(type(node[k]) is int for k in counts), node
    slots = Settings().parallel
    assert (node["models_loaded"], node["running"], node["free_slots"]) == (1, 1, slots - 1)
    assert node["queue_depth"] == 0 and node["requests_in_flight"] >= 1  # the stream at least
    memory = node["memory"]
    assert memory["budget_bytes"] == memory["headroom_bytes"] == BUDGET
    assert memory["models_ram_bytes"] == 0
    assert 0 < memory["ram_free_bytes"] <= memory["ram_total_bytes"]
    assert type(memory["vram_free_bytes"]) is int
    (model,) = health["models"]
    assert (model["name"], model["engine"], model["remote"]) == (MODEL, "fake", None)
    assert (model["slots"], model["free_slots"], model["running"]) == (slots, slots - 1, 1)
    assert model["queue_depth"] == 0 and model["busy"] is True
    # /v0/metrics has the same gauges
    assert scrape[("xllm_free_slots", (model["instance"],))] == slots - 1
    assert scrape[("xllm_running_sequences", (model["instance"],))] == 1
    assert scrape[("xllm_memory_headroom_bytes", ())] == BUDGET
