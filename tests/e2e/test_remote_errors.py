"""A remote endpoint's failures, through a real `xllm serve` in front of scripted upstreams
(tests/fake_openai.py): upstream errors in xllm's shapes with the upstream's message, timeouts
as 504s, redirects refused with the key kept home, a disconnect closing the upstream request,
requests surviving one of two upstreams going away, and a Modelfile over a remote model."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.conftest import Server, start_server, stop_server
from tests.fake_openai import CONTEXT, MODEL, FakeOpenAI

KEY = "sk-fake-0123456789-secret"


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeOpenAI]]:
    elsewhere = FakeOpenAI("elsewhere").start()
    one = FakeOpenAI("one", redirect_to=elsewhere.url).start()
    a, b = FakeOpenAI("a").start(), FakeOpenAI("b").start()
    yield {"one": one, "elsewhere": elsewhere, "a": a, "b": b}


@pytest.fixture(scope="module")
def front(
    fakes: dict[str, FakeOpenAI], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    remote = [
        {"name": "one", "base_url": fakes["one"].url + "/v1", "api_key_env": "FAKE_KEY",
         "flavour": "vllm", "timeout": 1.5, "models": {"fk": MODEL}},
        {"name": "pair", "base_url": [fakes["a"].url, fakes["b"].url], "flavour": "vllm",
         "balance": "round_robin", "health_interval": 0.5, "models": {"pair": MODEL}},
    ]  # fmt: skip
    env = {"XLLM_REMOTE": json.dumps(remote), "FAKE_KEY": KEY, "XLLM_LOG": "debug"}
    s = start_server(tmp_path_factory.mktemp("front"), [], env, wait_model=False)
    yield s
    stop_server(s)


@pytest.fixture
def client(front: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)


def _chat(front: Server, say: str, model: str = "fk", **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": say}], **extra}
    return httpx.post(f"{front.url}/v1/chat/completions", json=body, timeout=30)


def test_listed_with_the_upstreams_context(front: Server) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the first health check lists the upstream's models
        show = httpx.post(f"{front.url}/api/show", json={"model": "fk"}).json()
        if show["model_info"]["remote.listed"]:
            break
        time.sleep(0.2)
    assert show["details"]["format"] == "remote"
    # where Ollama's clients read a model's context: model_info["<architecture>.context_length"]
    arch = show["model_info"]["general.architecture"]
    assert show["model_info"][f"{arch}.context_length"] == CONTEXT
    assert "FROM remote:one/fake-model" in show["modelfile"]
    ids = {m["id"]: m for m in httpx.get(f"{front.url}/v1/models").json()["data"]}
    assert ids["fk:latest"]["max_model_len"] == CONTEXT


def test_key_sent_upstream_and_never_logged(front: Server, fakes: dict[str, FakeOpenAI]) -> None:
    r = _chat(front, "hi")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hello from one"
    assert r.json()["model"] == "fk"  # the upstream's name is rewritten to the client's
    chats = [x for x in fakes["one"].requests if x["path"] == "/v1/chat/completions"]
    assert chats[-1]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert chats[-1]["body"]["model"] == MODEL
    assert KEY not in front.logs()


@pytest.mark.parametrize(
    ("say", "status", "shape"),
    [
        ("status 500", 502, "the fake says 500"),
        ("status 400", 400, "the fake says 400"),
        ("status 401", 502, "refused this server's credentials"),
        ("status 503", 503, "the fake says 503"),
    ],
)
def test_upstream_errors_keep_their_message(
    front: Server, say: str, status: int, shape: str
) -> None:
    r = _chat(front, say)
    assert r.status_code == status
    assert shape in r.json()["error"]["message"]
    ollama_r = httpx.post(
        f"{front.url}/api/chat",
        json={"model": "fk", "messages": [{"role": "user", "content": say}]},
        timeout=30,
    )
    assert ollama_r.status_code == status
    assert shape in ollama_r.json()["error"]  # Ollama's shape: a string


def test_hang_is_a_504(front: Server) -> None:
    t0 = time.monotonic()
    r = _chat(front, "hang")
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert "1.5 s" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 10


def test_slow_drip_within_the_timeout_streams_whole(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fk", messages=[{"role": "user", "content": "drip"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "one two three four five"


def test_malformed_sse_ends_with_an_error_event(front: Server) -> None:
    # relayed (OpenAI): the bytes are the upstream's; through the seam (Ollama): an error line
    r = httpx.post(
        f"{front.url}/api/chat",
        json={"model": "fk", "messages": [{"role": "user", "content": "malformed"}]},
        timeout=30,
    )
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines[0]["message"]["content"] == "hello from one"
    assert "malformed event" in lines[-1]["error"]


def test_redirect_refused_and_key_kept_home(front: Server, fakes: dict[str, FakeOpenAI]) -> None:
    r = _chat(front, "redirect")
    assert r.status_code == 502
    assert "redirects are not followed" in r.json()["error"]["message"]
    assert not [x for x in fakes["elsewhere"].requests if x["path"] != "/v1/models"]
    assert all("Authorization" not in x["headers"] for x in fakes["elsewhere"].requests)


def test_disconnect_cancels_the_upstream_request(
    front: Server, fakes: dict[str, FakeOpenAI]
) -> None:
    slow = {"model": "fk", "messages": [{"role": "user", "content": "slow"}]}
    for path, payload in [
        ("/v1/chat/completions", {**slow, "stream": True}),  # relayed
        ("/api/chat", slow),  # through the seam
    ]:
        before = fakes["one"].cancelled
        with httpx.stream("POST", f"{front.url}{path}", json=payload, timeout=30) as r:
            for _ in r.iter_bytes():
                break  # the first piece, then hang up
        _wait_cancelled(fakes["one"], before, path)
    pair = [fakes["a"], fakes["b"]]  # no timeout of their own: only the hang-up ends a call
    for path, payload in [  # hung up before the upstream's first byte
        ("/v1/chat/completions", {**slow, "model": "pair"}),  # relayed, unstreamed
        ("/v1/embeddings", {"model": "pair", "input": ["slow"]}),  # relayed
    ]:
        before = sum(f.cancelled for f in pair)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{front.url}{path}", json=payload, timeout=0.5)
        deadline = time.monotonic() + 3
        while sum(f.cancelled for f in pair) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(f.cancelled for f in pair) == before + 1, path
    health = httpx.get(f"{front.url}/v0/health").json()
    for endpoint in health["remote"]:  # each call was closed
        assert [u["outstanding"] for u in endpoint["upstreams"]] == [0] * len(endpoint["upstreams"])


def _wait_cancelled(fake: FakeOpenAI, before: int, path: str) -> None:
    deadline = time.monotonic() + 10
    while fake.cancelled == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fake.cancelled == before + 1, path


def test_round_robin_takes_turns_whoever_is_busy(
    fakes: dict[str, FakeOpenAI], front: Server
) -> None:
    payload = {"model": "pair", "messages": [{"role": "user", "content": "slow"}], "stream": True}
    with httpx.stream("POST", f"{front.url}/v1/chat/completions", json=payload, timeout=30) as r:
        next(r.iter_bytes())  # one upstream is busy with this stream...
        served = [_chat(front, "hi", "pair").json()["choices"][0]["message"]["content"]
                  for _ in range(4)]  # fmt: skip
    # ...and still gets its turn (least-outstanding would send all four to the other)
    assert sorted(served) == ["hello from a"] * 2 + ["hello from b"] * 2


def test_relayed_body_keeps_what_the_flavour_takes(front: Server) -> None:
    extras = {"cache": False, "speculative": {"type": "ngram"}, "engine": "remote", "top_k": 5,
              "repeat_penalty": 1.2, "repeat_last_n": 16, "reasoning_format": "none"}  # fmt: skip
    r = _chat(front, "echo", **extras)
    assert r.status_code == 200, r.text
    sent = json.loads(r.json()["choices"][0]["message"]["content"])
    assert sent["top_k"] == 5 and sent["repetition_penalty"] == 1.2  # vLLM's own names
    assert not {"cache", "speculative", "engine", "repeat_penalty", "repeat_last_n",
                "reasoning_format"} & sent.keys()  # fmt: skip
    r = _chat(front, "echo", lora="french")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "lora"
    assert "takes no LoRA adapters" in r.json()["error"]["message"]


def test_an_upstream_that_never_connects_is_passed_over(
    fakes: dict[str, FakeOpenAI], tmp_path: Path
) -> None:
    with socket.socket() as hole:  # a full accept queue: connecting hangs, as to a dropped host
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        dead = f"http://127.0.0.1:{hole.getsockname()[1]}"
        fillers = [socket.socket() for _ in range(3)]
        for f in fillers:
            f.setblocking(False)
            f.connect_ex(hole.getsockname())
        remote = [{"name": "far", "base_url": [dead, fakes["b"].url], "flavour": "vllm",
                   "balance": "round_robin", "connect_timeout": 0.5, "timeout": 30,
                   "models": {"far": MODEL}}]  # fmt: skip
        s = start_server(tmp_path, [], {"XLLM_REMOTE": json.dumps(remote)}, wait_model=False)
        try:
            t0 = time.monotonic()
            for _ in range(4):  # before the health check (10 s) can tell
                r = _chat(s, "hi", "far")
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == "hello from b"
            assert time.monotonic() - t0 < 8
            ups = next(p for p in httpx.get(f"{s.url}/v0/health").json()["remote"])["upstreams"]
            assert {u["url"]: u["error"] for u in ups}[dead] == "could not connect in time"
        finally:
            stop_server(s)
            for f in fillers:
                f.close()


def test_one_of_two_upstreams_killed(front: Server, fakes: dict[str, FakeOpenAI]) -> None:
    served = [
        _chat(front, "hi", "pair").json()["choices"][0]["message"]["content"] for _ in range(4)
    ]
    assert set(served) == {"hello from a", "hello from b"}  # round robin over both
    fakes["a"].stop()
    for _ in range(10):  # before and after the health check notices: none is lost
        r = _chat(front, "hi", "pair")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "hello from b"
    health = httpx.get(f"{front.url}/v0/health").json()
    pair = next(p for p in health["remote"] if p["name"] == "pair")
    states = {u["url"]: u["state"] for u in pair["upstreams"]}
    assert states == {fakes["a"].url: "down", fakes["b"].url: "up"}
    metrics = httpx.get(f"{front.url}/v0/metrics").text
    assert f'xllm_upstream_up{{endpoint="pair",upstream="{fakes["a"].url}"}} 0.0' in metrics
    assert f'xllm_upstream_requests_total{{endpoint="pair",upstream="{fakes["b"].url}"}}' in metrics
    fakes["b"].stop()
    r = _chat(front, "hi", "pair")
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "1"
    assert "no healthy upstream" in r.json()["error"]["message"]


def test_modelfile_over_a_remote_model(front: Server, fakes: dict[str, FakeOpenAI]) -> None:
    c = ollama.Client(host=front.url)
    c.create(
        model="french",
        from_="remote:one/fake-model",
        system="Answer in French.",
        parameters={"temperature": 0.25, "num_predict": 33, "top_k": 7},
    )
    assert "french:latest" in [m.model for m in c.list().models]
    r = c.chat(model="french", messages=[{"role": "user", "content": "echo"}])
    sent = json.loads(r.message.content)
    assert sent["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert sent["temperature"] == 0.25 and sent["max_tokens"] == 33 and sent["top_k"] == 7
    assert sent["repetition_penalty"] == 1.1  # Ollama's default, in vLLM's name
    # OpenAI's requests keep their own fields; the Modelfile fills in the others
    r2 = _chat(front, "echo", "french", temperature=1.5)
    sent = json.loads(r2.json()["choices"][0]["message"]["content"])
    assert sent["temperature"] == 1.5 and sent["max_tokens"] == 33
    assert sent["messages"][0]["content"] == "Answer in French."


def test_ollama_embed_and_unknown_endpoint(front: Server, tmp_path: Path) -> None:
    r = httpx.post(f"{front.url}/api/embed", json={"model": "fk", "input": ["a", "b"]})
    assert r.status_code == 200, r.text
    assert r.json()["embeddings"] == [[0.6, 0.8], [0.6, 0.8]]  # normalized, as Ollama's are
    assert r.json()["prompt_eval_count"] == 4
    bad = _chat(front, "hi", "remote:nowhere/x")
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "model"
