"""A remote model end to end: a real `xllm serve` (SmolLM2) on loopback is the upstream of a
second one, and the official `openai` and `ollama` clients talk to the front: chat, streams,
forced tool calls, embeddings, Responses; `list`, `ps` and `show` describe the remote model, and
the request field `engine` picks the remote or the local model where a name has both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest

from tests.conftest import Server, start_server, stop_server

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("upstream"),
        ["--model", "smollm2:135m", "--ctx-size", "1024", "--parallel", "4"],
    )
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def front(upstream: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    remote = [
        {"name": "up", "base_url": f"{upstream.url}/v1", "flavour": "xllm", "health_interval": 1,
         "models": {"far": "smollm2:135m", "smollm2:135m": "smollm2:135m"}},
    ]  # fmt: skip
    s = start_server(
        tmp_path_factory.mktemp("front"),
        ["--ctx-size", "512", "--parallel", "2"],
        {"XLLM_REMOTE": json.dumps(remote)},
        wait_model=False,
    )
    yield s
    stop_server(s)


@pytest.fixture
def oai(front: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)


def chat_and_stream(oai: openai.OpenAI, model: str, n: int = 1) -> None:
    """A greedy chat, then the same streamed with `n` choices: each is the same answer."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = oai.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert r.model == model  # the upstream's name rewritten to the client's
    assert r.choices[0].message.content
    assert r.usage is not None and r.usage.completion_tokens > 0
    stream = oai.chat.completions.create(
        model=model, messages=msgs, max_tokens=12, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, n=n,
    )  # fmt: skip
    chunks = list(stream)
    texts = [""] * n
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [r.choices[0].message.content] * n
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_chat_and_stream(oai: openai.OpenAI) -> None:
    chat_and_stream(oai, "far", n=2)  # n relayed


def test_forced_tool_call_and_logprobs(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model="far", messages=[{"role": "user", "content": "Weather in Paris?"}],  # type: ignore[list-item]
        tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},  # type: ignore[list-item]
        max_tokens=40,
    )  # fmt: skip
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert "city" in json.loads(call.function.arguments)  # type: ignore[union-attr]
    lp = oai.chat.completions.create(
        model="far", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,  # type: ignore[list-item]
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    assert lp.choices[0].logprobs is not None and len(lp.choices[0].logprobs.content or []) == 3


def test_response_format_relayed(oai: openai.OpenAI, upstream: Server) -> None:
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
        "required": ["capital"],
    }
    args = {
        "messages": [{"role": "user", "content": "The capital of France, as JSON?"}],
        "max_tokens": 30, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    }  # fmt: skip
    r = oai.chat.completions.create(model="far", **args)  # type: ignore[call-overload]
    answer = json.loads(r.choices[0].message.content)
    assert answer["capital"] in ("Paris", "Rome", "Oslo")  # the upstream's grammar held it
    direct = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="unused")
    same = direct.chat.completions.create(model="smollm2:135m", **args)  # type: ignore[call-overload]
    assert r.choices[0].message.content == same.choices[0].message.content


def test_embeddings_match_the_upstream(oai: openai.OpenAI, upstream: Server, front: Server) -> None:
    direct = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="unused")
    want = direct.embeddings.create(model="smollm2:135m", input=["one", "two"]).data
    got = oai.embeddings.create(model="far", input=["one", "two"]).data
    assert [d.embedding for d in got] == [d.embedding for d in want]
    o = ollama.Client(host=front.url).embed(model="far", input=["one", "two"])
    assert o.embeddings[0] == pytest.approx(want[0].embedding, abs=1e-6)


def test_responses_translated_to_chat(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="far", input="Say hello.", max_output_tokens=8)
    assert r.output_text
    forced = oai.responses.create(
        model="far", input="Weather in Rome?", max_output_tokens=40,
        tools=[{"type": "function", "name": "get_weather", "parameters": TOOL["function"]["parameters"]}],  # type: ignore[index, list-item]
        tool_choice={"type": "function", "name": "get_weather"},
    )  # fmt: skip
    calls = [o for o in forced.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    events = list(oai.responses.create(model="far", input="Hi", max_output_tokens=6, stream=True))
    assert events[-1].type == "response.completed"


def ollama_chat_and_generate(c: ollama.Client, model: str) -> None:
    """A chat cut at num_predict, and a streamed raw generation, in Ollama's shapes."""
    r = c.chat(
        model=model, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 6}
    )
    assert r.message.content and r.eval_count == 6 and r.done_reason == "length"
    pieces = list(
        c.generate(model=model, prompt="Count: 1, 2,", stream=True, options={"num_predict": 6})
    )
    assert pieces[-1].done and "".join(p.response for p in pieces)


def test_ollama_client(front: Server) -> None:
    c = ollama.Client(host=front.url)
    ollama_chat_and_generate(c, "far")
    tools = c.chat(
        model="far", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[TOOL],
        options={"num_predict": 40},
    )  # fmt: skip
    assert tools.done  # the model may answer or call; either comes back in Ollama's shape


def test_list_ps_show(front: Server, upstream: Server) -> None:
    env = {**os.environ, "XLLM_HOST": f"127.0.0.1:{front.port}"}
    listed = subprocess.run(
        [sys.executable, "-m", "xllm", "list"], env=env, capture_output=True, text=True, check=True
    ).stdout
    far = next(line for line in listed.splitlines() if line.startswith("far:latest"))
    assert "remote" in far
    ps = subprocess.run(
        [sys.executable, "-m", "xllm", "ps"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "far:latest" in ps and "remote" in ps
    show = httpx.post(f"{front.url}/api/show", json={"model": "far"}).json()
    assert show["capabilities"] == ["completion", "chat"]  # as the upstream xllm lists them
    assert show["model_info"]["remote.endpoint"] == "up"
    listed = httpx.get(f"{upstream.url}/v1/models").json()["data"]
    context = next(m["max_model_len"] for m in listed if m["id"] == "smollm2:135m")
    arch = show["model_info"]["general.architecture"]  # where Ollama's clients look
    assert show["model_info"][f"{arch}.context_length"] == context > 0
    assert ollama.Client(host=front.url).show("far").modelinfo[f"{arch}.context_length"] == context


def test_engine_field_picks_local_or_remote(front: Server, upstream: Server) -> None:
    def served_by(engine: str | None) -> None:
        body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2, **({"engine": engine} if engine else {})}  # fmt: skip
        r = httpx.post(f"{front.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text

    before = httpx.get(f"{front.url}/v0/health").json()
    requests = before["remote"][0]["upstreams"][0]["requests"]
    served_by("remote")
    health = httpx.get(f"{front.url}/v0/health").json()
    assert health["remote"][0]["upstreams"][0]["requests"] == requests + 1
    engines = {m["instance"]: m["engine"] for m in health["models"]}
    assert engines["remote:up/smollm2:135m"] == "remote"
    served_by(None)  # the local model by default
    engines = {
        m["instance"]: m["engine"] for m in httpx.get(f"{front.url}/v0/health").json()["models"]
    }
    assert engines["smollm2:135m"] == "llama.cpp"
    assert engines["remote:up/smollm2:135m"] == "remote"  # both loaded side by side
