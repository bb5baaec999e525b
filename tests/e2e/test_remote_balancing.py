"""A remote endpoint over several upstreams, through a real `xllm serve` in front of scripted
ones (tests/fake_openai.py): least-outstanding balancing, an upstream that comes back used
again, the per-upstream metrics and health moving; and what is relayed: streams as they arrive,
`response_format` as the client sent it."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server
from tests.e2e.test_metrics import scrape, value
from tests.fake_openai import MODEL, FakeOpenAI

INTERVAL = 0.5
"""Each endpoint's health_interval: how soon an upstream is checked again."""


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeOpenAI]]:
    yield {name: FakeOpenAI(name).start() for name in ("c", "d", "e", "f")}


@pytest.fixture(scope="module")
def front(
    fakes: dict[str, FakeOpenAI], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    remote = [  # balance: least_outstanding, the default
        {"name": "lo", "base_url": [fakes["c"].url, fakes["d"].url], "flavour": "vllm",
         "health_interval": INTERVAL, "models": {"lo": MODEL}},
        {"name": "back", "base_url": [fakes["e"].url, fakes["f"].url], "flavour": "vllm",
         "health_interval": INTERVAL, "models": {"back": MODEL}},
    ]  # fmt: skip
    s = start_server(
        tmp_path_factory.mktemp("front"), [], {"XLLM_REMOTE": json.dumps(remote)}, wait_model=False
    )
    yield s
    stop_server(s)


def _chat(front: Server, say: str, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": say}], **extra}
    return httpx.post(f"{front.url}/v1/chat/completions", json=body, timeout=30)


def _served_by(front: Server, model: str, n: int) -> list[str]:
    """Which upstream answered each of `n` requests, one after another."""
    out = []
    for _ in range(n):
        r = _chat(front, "hi", model)
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["message"]["content"].removeprefix("hello from "))
    return out


def _upstreams(front: Server, endpoint: str) -> dict[str, dict[str, object]]:
    health = httpx.get(f"{front.url}/v0/health").json()
    pool = next(p for p in health["remote"] if p["name"] == endpoint)
    return {u["url"]: u for u in pool["upstreams"]}


def test_least_outstanding_avoids_the_busy_upstream(
    front: Server, fakes: dict[str, FakeOpenAI]
) -> None:
    assert set(_served_by(front, "lo", 4)) == {"c", "d"}  # both idle: in turn
    body = {"model": "lo", "stream": True, "messages": [{"role": "user", "content": "slow"}]}
    with httpx.stream("POST", f"{front.url}/v1/chat/completions", json=body, timeout=30) as r:
        pieces = r.iter_bytes()  # kept: dropping the iterator would hang up
        next(pieces)  # a 30 s stream holds one upstream
        busy = [url for url, u in _upstreams(front, "lo").items() if u["outstanding"] == 1]
        assert len(busy) == 1
        idle = "d" if busy == [fakes["c"].url] else "c"
        assert _served_by(front, "lo", 6) == [idle] * 6


def test_an_upstream_that_comes_back_is_used_again(
    front: Server, fakes: dict[str, FakeOpenAI]
) -> None:
    e = fakes["e"]
    e.stop()
    assert set(_served_by(front, "back", 6)) == {"f"}  # none lost, before or after the check
    assert _upstreams(front, "back")[e.url]["state"] == "down"
    e.restart()
    t0 = time.monotonic()
    while _upstreams(front, "back")[e.url]["state"] != "up":
        assert time.monotonic() - t0 < INTERVAL + 3, "not checked again after its interval"
        time.sleep(0.1)
    assert set(_served_by(front, "back", 4)) == {"e", "f"}


def test_per_upstream_metrics_and_latency_move(front: Server, fakes: dict[str, FakeOpenAI]) -> None:
    urls = [fakes["c"].url, fakes["d"].url]
    before = scrape(front)
    checked = {url: u["checked_at"] for url, u in _upstreams(front, "lo").items()}
    _served_by(front, "lo", 2)
    assert _chat(front, "status 500", "lo").status_code == 502
    time.sleep(INTERVAL * 3)  # a health check or two
    after = scrape(front)

    def moved(name: str) -> float:
        return sum(
            value(after, name, endpoint="lo", upstream=u)
            - value(before, name, endpoint="lo", upstream=u)
            for u in urls
        )

    assert moved("xllm_upstream_requests_total") == 3
    assert moved("xllm_upstream_errors_total") == 1
    assert moved("xllm_upstream_request_seconds_total") > 0
    for url, u in _upstreams(front, "lo").items():
        latency = value(after, "xllm_upstream_health_latency_seconds", endpoint="lo", upstream=url)
        assert 0 < latency < 1
        assert isinstance(u["latency_ms"], float) and 0 < u["latency_ms"] < 1000
        assert isinstance(u["checked_at"], float) and u["checked_at"] > checked[url]
        assert value(after, "xllm_upstream_up", endpoint="lo", upstream=url) == 1


def test_a_stream_is_relayed_as_it_arrives(front: Server) -> None:
    # the upstream sends five words 0.3 s apart: each must reach the client as it is sent
    body = {"model": "lo", "stream": True, "messages": [{"role": "user", "content": "drip"}]}
    t0 = time.monotonic()
    arrivals = []
    with httpx.stream("POST", f"{front.url}/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 5
    assert arrivals[-1] - arrivals[0] > 1.0  # 4 gaps of 0.3 s
    assert all(b - a > 0.2 for a, b in itertools.pairwise(arrivals)), arrivals


SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
}


def test_response_format_goes_upstream_as_sent(front: Server) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "yn", "schema": SCHEMA}}
    r = _chat(front, "echo", "lo", response_format=response_format)
    assert r.status_code == 200, r.text
    sent = json.loads(r.json()["choices"][0]["message"]["content"])
    assert sent["response_format"] == response_format
    # Ollama's `format` becomes OpenAI's response_format on the way up
    r = httpx.post(
        f"{front.url}/api/chat",
        json={"model": "lo", "messages": [{"role": "user", "content": "echo"}], "format": SCHEMA,
              "stream": False},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    sent = json.loads(r.json()["message"]["content"])
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": SCHEMA},
    }
