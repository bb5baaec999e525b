"""The temperature-0 response cache, in-process over the fake engine (tests/fake_engine.py):
what is cached and what is not, replays equal to live answers on every endpoint, the header,
the opt-out, the byte bound and the metrics."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests import fake_engine
from tests.fake_engine import FakeEngine
from xllm.config import ConfigError, Settings, load_settings
from xllm.engine.protocol import Delta
from xllm.server.app import create_app, make_registry
from xllm.server.response_cache import Answer, ResponseCache

MODEL = "fake:latest"
HEADER = "x-xllm-cache"


def _app(tmp_path: Path, fraction: float = 0.02) -> TestServer:
    settings = Settings(models_dir=tmp_path / "models", cache_ram_fraction=fraction)
    registry = make_registry(settings, engines=fake_engine.engines())
    registry.add_path(fake_engine.model_folder(tmp_path / "fake"))
    FakeEngine.instances.clear()
    return TestServer(create_app(settings, registry))


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(_app(tmp_path)) as c:
        yield c


def _calls() -> int:
    """Generations the engine was asked for."""
    return sum(len(e.generations) for e in FakeEngine.instances)


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


GREEDY: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", _chat("a b c", temperature=0)),
    ("/v1/completions", {"model": MODEL, "prompt": "a b c", "temperature": 0}),
    ("/v1/responses", {"model": MODEL, "input": "a b c", "temperature": 0}),
    ("/api/chat", {**_chat("a b c"), "stream": False, "options": {"temperature": 0}}),
    ("/api/generate", {"model": MODEL, "prompt": "a b c", "stream": False,
                       "options": {"temperature": 0}}),
]  # fmt: skip


def _stable(body: Any) -> Any:
    """A response without what differs between two answers anyway (ids, times)."""
    if isinstance(body, dict):
        drop = {"id", "created", "created_at", "total_duration", "load_duration",
                "prompt_eval_duration", "eval_duration", "completed_at", "response_id",
                "item_id"}  # fmt: skip
        return {k: _stable(v) for k, v in body.items() if k not in drop}
    if isinstance(body, list):
        return [_stable(v) for v in body]
    return body


@pytest.mark.parametrize(("path", "body"), GREEDY)
async def test_a_hit_replays_the_answer_without_the_engine(
    client: TestClient[Any, Any], path: str, body: dict[str, Any]
) -> None:
    first = await client.post(path, json=body)
    assert first.status == 200 and first.headers[HEADER] == "miss"
    second = await client.post(path, json=body)
    assert second.status == 200 and second.headers[HEADER] == "hit"
    assert _calls() == 1
    assert _stable(await second.json()) == _stable(await first.json())


def _records(path: str, text: str) -> list[Any]:
    if path.startswith("/api/"):
        return [json.loads(line) for line in text.splitlines()]
    events = [e for e in text.split("\n\n") if e]
    return [e if "[DONE]" in e else json.loads(e.split("data: ", 1)[1]) for e in events]


@pytest.mark.parametrize(("path", "body"), GREEDY)
async def test_a_streamed_replay_is_framed_as_the_live_stream(
    client: TestClient[Any, Any], path: str, body: dict[str, Any]
) -> None:
    body = {**body, "stream": True}
    if path != "/v1/responses" and not path.startswith("/api/"):
        body["stream_options"] = {"include_usage": True}
    first = await client.post(path, json=body)
    live = _records(path, await first.text())
    second = await client.post(path, json=body)
    assert second.headers[HEADER] == "hit" and _calls() == 1
    replayed = _records(path, await second.text())
    assert len(replayed) == len(live) > 3  # one record per token, as live
    assert _stable(replayed) == _stable(live)


async def test_a_hit_needs_no_free_runner(client: TestClient[Any, Any]) -> None:
    body = _chat("a b", temperature=0)
    await client.post("/v1/chat/completions", json=body)
    slow = " ".join(["slow"] + ["w"] * 40)
    busy = [
        await client.post("/v1/chat/completions", json=_chat(slow, stream=True))
        for _ in range(fake_engine.LIMIT)
    ]  # the engine refuses more now
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status == 200 and r.headers[HEADER] == "hit"
    for s in busy:
        s.close()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", _chat("a b", temperature=0, cache=False)),
        ("/v1/chat/completions", _chat("a b", temperature=0.5)),
        ("/v1/chat/completions", _chat("a b")),  # the dialect's default temperature is not 0
        ("/v1/chat/completions", _chat("a b", temperature=0, n=2)),
        ("/api/chat", {**_chat("a b"), "stream": False, "cache": False,
                       "options": {"temperature": 0}}),
        ("/api/generate", {"model": MODEL, "prompt": "a b", "stream": False}),
    ],
)  # fmt: skip
async def test_what_is_not_cached(
    client: TestClient[Any, Any], path: str, body: dict[str, Any]
) -> None:
    for _ in range(2):
        r = await client.post(path, json=body)
        assert r.status == 200 and HEADER not in r.headers
    assert _calls() == 2


@pytest.mark.parametrize(
    "change",
    [{"max_tokens": 5}, {"stop": ["z"]}, {"seed": 1, "temperature": 0.1}, {"logprobs": True},
     {"frequency_penalty": 0.5}, {"logit_bias": {"5": 1}}, {"response_format": {"type": "json_object"}},
     {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a b"}]}],
)  # fmt: skip
async def test_any_changed_parameter_misses(
    client: TestClient[Any, Any], change: dict[str, Any]
) -> None:
    body = _chat("a b", temperature=0)
    await client.post("/v1/chat/completions", json=body)
    r = await client.post("/v1/chat/completions", json={**body, **change})
    assert r.status == 200 and r.headers.get(HEADER) != "hit"
    assert _calls() == 2


async def test_the_seed_of_a_greedy_request_does_not_matter(client: TestClient[Any, Any]) -> None:
    await client.post("/v1/chat/completions", json=_chat("a b", temperature=0, seed=1))
    r = await client.post("/v1/chat/completions", json=_chat("a b", temperature=0, seed=2))
    assert r.headers[HEADER] == "hit" and _calls() == 1


async def test_a_replaced_model_never_meets_its_predecessors_answers(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    body = _chat("a b", temperature=0)
    await client.post("/v1/chat/completions", json=body)
    r = await client.post("/api/generate", json={"model": MODEL, "keep_alive": 0})
    assert r.status == 200 and not FakeEngine.instances[0].running
    folder = tmp_path / "fake"
    os.utime(folder, ns=(0, folder.stat().st_mtime_ns + 10**9))  # its files rewritten
    r = await client.post("/v1/chat/completions", json=body)
    assert r.headers[HEADER] == "miss" and _calls() == 2
    r = await client.post("/v1/chat/completions", json=body)
    assert r.headers[HEADER] == "hit" and _calls() == 2


async def test_an_opted_out_request_stores_nothing(client: TestClient[Any, Any]) -> None:
    body = _chat("a b", temperature=0)
    await client.post("/v1/chat/completions", json={**body, "cache": False})
    r = await client.post("/v1/chat/completions", json=body)
    assert r.headers[HEADER] == "miss" and _calls() == 2


async def test_failed_and_cancelled_answers_are_not_stored(client: TestClient[Any, Any]) -> None:
    failing = _chat("fail-after x y z", temperature=0)
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json=failing)
        assert r.status == 500 and r.headers[HEADER] == "miss"

    slow = _chat(" ".join(["slow"] + ["w"] * 200), temperature=0, stream=True)
    r = await client.post("/v1/chat/completions", json=slow)
    await r.content.readany()
    gen = FakeEngine.instances[0].generations[-1]
    r.close()
    for _ in range(100):
        if gen.cancelled:
            break
        await asyncio.sleep(0.05)
    assert gen.cancelled
    r = await client.post("/v1/chat/completions", json=slow)
    assert r.headers[HEADER] == "miss"
    r.close()


async def test_a_zero_share_turns_the_cache_off(tmp_path: Path) -> None:
    async with TestClient(_app(tmp_path, fraction=0)) as c:
        for _ in range(2):
            r = await c.post("/v1/chat/completions", json=_chat("a b", temperature=0))
            assert r.status == 200 and HEADER not in r.headers
        assert _calls() == 2


async def test_metrics_count_hits_misses_and_bytes(client: TestClient[Any, Any]) -> None:
    body = _chat("a b", temperature=0)
    for _ in range(3):
        await client.post("/v1/chat/completions", json=body)
    text = await (await client.get("/v0/metrics")).text()
    assert "xllm_response_cache_hits_total 2.0" in text
    assert "xllm_response_cache_misses_total 1.0" in text
    size = next(x for x in text.splitlines() if x.startswith("xllm_response_cache_bytes "))
    assert float(size.split()[1]) > 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", _chat("a", cache="no")),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "cache": 0}),
        ("/v1/responses", {"model": MODEL, "input": "a", "cache": "false"}),
        ("/api/chat", {**_chat("a"), "cache": "false"}),
        ("/api/generate", {"model": MODEL, "prompt": "a", "cache": 1}),
    ],
)
async def test_cache_must_be_a_boolean(
    client: TestClient[Any, Any], path: str, body: dict[str, Any]
) -> None:
    r = await client.post(path, json=body)
    assert r.status == 400
    error = (await r.json())["error"]
    if path.startswith("/v1/"):
        assert error["param"] == "cache" and error["type"] == "invalid_request_error"
    else:
        assert isinstance(error, str) and error.startswith("cache")


def _answer(size: int) -> Answer:
    return Answer(((Delta(0, 0, "x", finish="stop"),),), (), None, size)


def test_the_least_recently_used_answers_go_first_past_the_byte_bound() -> None:
    cache = ResponseCache(max_bytes=300)
    for k in "abc":
        cache.put(k, _answer(100))
    assert cache.get("a") is not None  # now the most recently used
    cache.put("d", _answer(100))
    assert cache.get("b") is None and cache.bytes == 300
    assert all(cache.get(k) is not None for k in "acd")
    cache.put("huge", _answer(301))  # more than the whole bound: not kept
    assert cache.get("huge") is None and len(cache) == 3
    assert (cache.hits, cache.misses) == (4, 2)


def test_the_share_of_ram_is_a_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XLLM_CONFIG", str(tmp_path / "none.yaml"))
    monkeypatch.setenv("XLLM_CACHE_RAM_FRACTION", "5%")
    assert load_settings().cache_ram_fraction == 0.05
    monkeypatch.setenv("XLLM_CACHE_RAM_FRACTION", "0")
    assert load_settings().cache_ram_fraction == 0
    monkeypatch.delenv("XLLM_CACHE_RAM_FRACTION")
    (tmp_path / "config.yaml").write_text("cache:\n  ram_fraction: 0.1\n")
    monkeypatch.setenv("XLLM_CONFIG", str(tmp_path / "config.yaml"))
    assert load_settings().cache_ram_fraction == 0.1
    monkeypatch.setenv("XLLM_CACHE_RAM_FRACTION", "2")
    with pytest.raises(ConfigError, match="XLLM_CACHE_RAM_FRACTION"):
        load_settings()
