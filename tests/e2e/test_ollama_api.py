"""Ollama's API through the official `ollama` Python client, unchanged, against xllm."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import ollama
import pytest

from tests.conftest import Server, start_server, stop_server

MODEL = "smollm2:135m"


@pytest.fixture(scope="module")
def client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url)


def test_generate(client: ollama.Client) -> None:
    r = client.generate(
        model=MODEL,
        prompt="What is the capital of France?",
        options={"temperature": 0, "num_predict": 24},
    )
    assert "Paris" in r.response
    assert r.done and r.done_reason in ("stop", "length")
    assert r.eval_count and 0 < r.eval_count <= 24
    assert r.prompt_eval_count and r.prompt_eval_count > 5
    assert isinstance(r.total_duration, int) and r.total_duration > 0
    assert r.eval_duration is not None and r.load_duration is not None
    # each phase's own time: the prompt's decode in prompt_eval (more than a fraction of one
    # token's step: it was once stamped before that decode ran), the rest's in eval
    assert r.prompt_eval_duration and r.eval_duration
    assert r.prompt_eval_duration > 0.3 * r.eval_duration / r.eval_count
    assert r.prompt_eval_duration + r.eval_duration <= r.total_duration
    assert r.context and len(r.context) >= r.prompt_eval_count


def test_generate_stream_matches(client: ollama.Client) -> None:
    opts = {"temperature": 0, "num_predict": 16}
    full = client.generate(model=MODEL, prompt="Tell me about cats.", options=opts)
    parts = list(
        client.generate(model=MODEL, prompt="Tell me about cats.", options=opts, stream=True)
    )
    assert "".join(p.response for p in parts) == full.response
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert parts[-1].eval_count == full.eval_count


def test_generate_with_a_request_template(client: ollama.Client) -> None:
    """`template` (Ollama's Go syntax) replaces the model's own for this request: the prompt
    it renders is exactly the raw text it spells out."""
    opts = {"num_predict": 1, "temperature": 0}
    templated = client.generate(
        model=MODEL, prompt="Hello there", system="Be brief", options=opts,
        template="{{ if .System }}[SYS]{{ .System }}[/SYS]{{ end }}{{ .Prompt }}",
    )  # fmt: skip
    raw = client.generate(
        model=MODEL, prompt="[SYS]Be brief[/SYS]Hello there", raw=True, options=opts
    )
    own = client.generate(model=MODEL, prompt="Hello there", system="Be brief", options=opts)
    assert templated.prompt_eval_count == raw.prompt_eval_count
    assert templated.response == raw.response
    assert own.prompt_eval_count != templated.prompt_eval_count  # ChatML adds its markers
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL, prompt="x", template='{{ define "t" }}{{ end }}')
    assert e.value.status_code == 400 and "define" in e.value.error


def test_generate_raw_and_context(client: ollama.Client) -> None:
    r = client.generate(
        model=MODEL, prompt="1, 2, 3,", raw=True, options={"temperature": 0, "num_predict": 4}
    )
    assert r.response.strip().startswith("4")


def test_chat_and_stream(client: ollama.Client) -> None:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat(model=MODEL, messages=msgs, options={"temperature": 0, "num_predict": 24})
    assert r.message.role == "assistant" and "Paris" in (r.message.content or "")
    chunks = list(
        client.chat(
            model=MODEL, messages=msgs, options={"temperature": 0, "num_predict": 24}, stream=True
        )
    )
    assert all(c.message.role == "assistant" for c in chunks)
    assert "".join(c.message.content or "" for c in chunks) == r.message.content
    assert chunks[-1].done and chunks[-1].done_reason


def test_chat_format_json_schema(client: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    r = client.chat(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Give the capital of France and its population as JSON."}
        ],
        format=schema,
        options={"temperature": 0, "num_predict": 64},
    )
    data = json.loads(r.message.content or "")
    assert isinstance(data["city"], str) and isinstance(data["population"], int)
    r = client.generate(
        model=MODEL,
        prompt="Reply with a JSON object with one key, name, set to Bob.",
        format="json",
        options={"temperature": 0, "num_predict": 200},
    )
    json.loads(r.response)


def test_stop_option(client: ollama.Client) -> None:
    r = client.generate(
        model=MODEL,
        prompt="1, 2, 3, 4,",
        raw=True,
        options={"temperature": 0, "num_predict": 20, "stop": [" 7"]},
    )
    assert " 7" not in r.response and r.done_reason == "stop"


def test_embed_and_legacy(client: ollama.Client) -> None:
    r = client.embed(model=MODEL, input=["one", "two", "three"])
    assert len(r.embeddings) == 3 and all(len(v) == 576 for v in r.embeddings)
    single = client.embed(model=MODEL, input="one")
    assert single.embeddings[0] == pytest.approx(r.embeddings[0], abs=1e-4)
    legacy = client.embeddings(model=MODEL, prompt="one")
    assert len(legacy.embedding) == 576


def test_tags_show_ps_version(client: ollama.Client, server: Server) -> None:
    names = [m.model for m in client.list().models]
    assert MODEL in names
    shown = client.show(MODEL)
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.capabilities and "completion" in shown.capabilities
    assert shown.details is not None and shown.details.quantization_level == "Q4_1"
    assert "im_start" in (shown.template or "")
    running = client.ps().models
    assert [m.model for m in running] == [MODEL]
    assert running[0].context_length == 1024 and running[0].size_vram == 0
    assert running[0].expires_at is not None
    assert httpx.get(f"{server.url}/api/version").json()["version"]
    assert httpx.get(f"{server.url}/").text == "Ollama is running"
    assert httpx.head(f"{server.url}/").status_code == 200
    assert httpx.head(f"{server.url}/api/tags").status_code == 200


def test_load_and_unload_with_keep_alive(client: ollama.Client, server: Server) -> None:
    r = client.generate(model=MODEL, prompt="", keep_alive=0)
    assert r.done and r.done_reason == "unload"
    assert client.ps().models == []
    r = client.generate(model=MODEL, prompt="")
    assert r.done_reason == "load"
    assert [m.model for m in client.ps().models] == [MODEL]
    r2 = client.chat(model=MODEL, messages=[], keep_alive="10m")
    assert r2.done_reason == "load"
    expires = client.ps().models[0].expires_at
    assert expires is not None and expires.timestamp() > time.time() + 9 * 60
    # a keep_alive past any date (schemathesis found it broke /api/ps) means forever
    client.generate(model=MODEL, prompt="", keep_alive=1e20)  # type: ignore[arg-type]
    expires = client.ps().models[0].expires_at
    assert expires is not None and expires.year > 2100
    client.generate(model=MODEL, prompt="", keep_alive="5m")


ASK = [{"role": "user", "content": "x"}]
FN = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/generate", {"model": "nope", "prompt": "x"}, 404),
        ("/api/generate", {"model": "nope", "prompt": ""}, 404),
        ("/api/generate", {"model": "nope", "prompt": "", "keep_alive": 0}, 404),
        ("/api/generate", {"model": "../x", "prompt": "x"}, 400),
        ("/api/generate", {"prompt": "x"}, 400),
        ("/api/generate", {"model": MODEL, "prompt": 5}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "raw": 1}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "context": [-1]}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "context": "abc"}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"temperature": -1}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"temperature": "hot"}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"top_p": 2}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"top_k": -5}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"num_predict": "10"}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"num_ctx": 0}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"seed": 1.5}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"stop": "x"}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"repeat_penalty": 0}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"num_gpu": "all"}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"use_mmap": "no"}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": [1]}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "keep_alive": "soon"}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "keep_alive": [5]}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "images": ["aGVsbG8="]}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "images": "aGVsbG8="}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "think": True}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "think": "extreme"}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "template": "{{ .Prompt | frob }}"}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "template": 5}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "format": "yaml"}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "format": {"type": "nonsense-type"}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x", "format": {"type": "string", "maxLength": 20000}}, 400),
        ("/api/chat", {"model": MODEL, "messages": ASK, "format": {"type": "array", "maxItems": 10**9}}, 400),
        ("/api/generate", {"model": MODEL, "prompt": "x " * 3000}, 400),
        ("/api/chat", {"model": "nope", "messages": ASK}, 404),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400),
        ("/api/chat", {"model": MODEL, "messages": "hi"}, 400),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400),
        ("/api/chat", {"model": MODEL, "messages": ASK, "format": {"type": "nonsense-type"}}, 400),
        ("/api/chat", {"model": MODEL, "messages": ASK, "think": True}, 400),
        ("/api/chat", {"model": MODEL, "messages": ASK, "tools": [{"type": "function", "function": {"description": "no name"}}]}, 400),
        ("/api/chat", {"model": MODEL, "messages": ASK, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400),
        ("/api/chat", {"model": MODEL, "messages": ASK, "tools": [{"type": "retrieval"}]}, 400),
        ("/api/chat", {"model": MODEL, "messages": ASK, "tools": FN}, 400),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]}, 400),
        ("/api/embed", {"model": "nope", "input": "x"}, 404),
        ("/api/embed", {"model": MODEL, "input": 3}, 400),
        ("/api/embed", {"model": MODEL, "input": [1, 2]}, 400),
        ("/api/embed", {"model": MODEL, "input": ["ok", ""]}, 400),
        ("/api/embed", {"model": MODEL, "input": "x " * 3000, "truncate": False}, 400),
        ("/api/embed", {"model": MODEL, "input": "x", "dimensions": 0}, 400),
        ("/api/embeddings", {"model": "nope", "prompt": "x"}, 404),
        ("/api/embeddings", {"model": MODEL, "prompt": 5}, 400),
        ("/api/show", {"model": "nope"}, 404),
        ("/api/show", {}, 400),
        ("/api/show", {"model": 5}, 400),
    ],
)  # fmt: skip
def test_errors_in_ollama_shape(
    server: Server, path: str, body: dict[str, object], status: int
) -> None:
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    error = r.json()["error"]
    assert isinstance(error, str) and error
    assert list(r.json()) == ["error"]


@pytest.mark.parametrize(
    ("path", "raw"),
    [("/api/generate", b"{"), ("/api/chat", b"[]"), ("/api/embed", b"null"), ("/api/show", b"")],
)
def test_malformed_bodies(server: Server, path: str, raw: bytes) -> None:
    r = httpx.post(server.url + path, content=raw, timeout=30)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


def test_capability_errors_name_the_feature(client: ollama.Client) -> None:
    for kwargs, feature in (
        ({"think": True}, "thinking"),
        ({"suffix": "end"}, "insert"),
        ({"images": ["aGVsbG8="]}, "images"),
    ):
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model=MODEL, prompt="x", **kwargs)
        assert e.value.status_code == 400 and f"does not support {feature}" in e.value.error
    # think: false is fine on any model
    r = client.generate(model=MODEL, prompt="Hi", think=False, options={"num_predict": 2})
    assert r.done


def test_server_alive_after_bad_inputs(client: ollama.Client, server: Server) -> None:
    assert server.proc.poll() is None
    r = client.generate(model=MODEL, prompt="Hi", options={"num_predict": 3, "temperature": 0})
    assert r.done and r.eval_count


def test_client_raises_response_error(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="missing-model", prompt="x")
    assert e.value.status_code == 404


def test_chat_tools_parsed(client: ollama.Client) -> None:
    def get_weather(city: str) -> str:
        """Current weather in a city.

        Args:
          city: the city name
        """
        return "sunny"

    r = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris? Use the tool."}],
        tools=[get_weather],
        options={"temperature": 0, "num_predict": 60},
    )
    assert r.message.role == "assistant"
    assert r.message.content or r.message.tool_calls
    for call in r.message.tool_calls or []:
        assert call.function.name == "get_weather"
        assert isinstance(call.function.arguments, dict)
    streamed = list(
        client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the weather in Paris? Use the tool."}],
            tools=[get_weather],
            options={"temperature": 0, "num_predict": 60},
            stream=True,
        )
    )
    assert streamed[-1].done
    assert (streamed[0].message.tool_calls is None) == (r.message.tool_calls is None)


def test_error_line_inside_a_started_stream(tmp_path: Path) -> None:
    """Once NDJSON has started, a failure is an `{"error"}` line (the client raises it)."""
    s = start_server(tmp_path, ["--model", MODEL, "--ctx-size", "1024", "--parallel", "2"])
    try:
        pid = httpx.get(f"{s.url}/v0/health").json()["models"][0]["runner_pid"]
        parts: list[ollama.GenerateResponse] = []

        def kill_after_first_part() -> None:
            while not parts:
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_after_first_part)
        killer.start()
        stream = ollama.Client(host=s.url).generate(
            model=MODEL, prompt="1, 2, 3, 4,", raw=True, stream=True, options={"num_predict": 900}
        )
        with pytest.raises(ollama.ResponseError) as e:
            for part in stream:
                parts.append(part)
        killer.join()
        assert "runner" in e.value.error and not any(p.done for p in parts)
        again = ollama.Client(host=s.url).generate(
            model=MODEL, prompt="Hi", options={"num_predict": 2}
        )
        assert again.done
    finally:
        stop_server(s)
