"""The OpenAI API of a real `xllm serve`, driven by the official `openai` SDK."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import Server

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_chat_answers(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2:135m", messages=FRANCE, temperature=0, max_tokens=24
    )
    choice = r.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.object == "chat.completion"
    assert r.usage is not None
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model="smollm2:135m", messages=FRANCE, temperature=0, max_tokens=20
    )
    stream = client.chat.completions.create(
        model="smollm2:135m",
        messages=FRANCE,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, events = [], None, None, 0
    for chunk in stream:
        events += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and full.usage is not None
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    # one event per token: as many content events as generated tokens (give or take held text)
    assert len(pieces) >= usage.completion_tokens - 3
    assert events > len(pieces)


def test_completion_length_and_usage(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="smollm2:135m",
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 12
    assert r.choices[0].text


def test_completion_token_prompt_counts(client: openai.OpenAI) -> None:
    tokens = [1, 504, 2113, 314, 253, 655]
    r = client.completions.create(model="smollm2:135m", prompt=tokens, max_tokens=3)
    assert r.usage is not None and r.usage.prompt_tokens == len(tokens)


def test_completion_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(
        model="smollm2:135m", prompt="The sky is", max_tokens=10, temperature=0
    )
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="smollm2:135m", prompt="The sky is", max_tokens=10, temperature=0, stream=True
        )
        if c.choices
    )
    assert text == full.choices[0].text


def test_temperature_zero_is_deterministic(client: openai.OpenAI) -> None:
    outs = {
        client.chat.completions.create(
            model="smollm2:135m",
            messages=[{"role": "user", "content": "Write a haiku about rain."}],
            temperature=0,
            max_tokens=30,
            extra_body={"cache": False},  # decoded each time, not replayed
        )
        .choices[0]
        .message.content
        for _ in range(3)
    }
    assert len(outs) == 1


def test_seed_reproducible(client: openai.OpenAI) -> None:
    def once(seed: int) -> str:
        r = client.chat.completions.create(
            model="smollm2:135m",
            messages=[{"role": "user", "content": "Tell me a story."}],
            temperature=1.0,
            seed=seed,
            max_tokens=24,
        )
        return r.choices[0].message.content or ""

    assert once(42) == once(42)


def test_stop_sequences(client: openai.OpenAI) -> None:
    base = client.completions.create(
        model="smollm2:135m", prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0
    ).choices[0]
    assert " 7" in base.text, base.text
    cut = client.completions.create(
        model="smollm2:135m",
        prompt="1, 2, 3, 4, 5,",
        max_tokens=20,
        temperature=0,
        stop=[" 7", "xyz"],
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == base.text[: base.text.index(" 7")]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="smollm2:135m",
            prompt="1, 2, 3, 4, 5,",
            max_tokens=20,
            temperature=0,
            stop=" 7",
            stream=True,
        )
        if c.choices
    )
    assert streamed == cut.text


def test_n_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2:135m", messages=FRANCE, n=2, temperature=0.8, max_tokens=8, seed=1
    )
    assert [c.index for c in r.choices] == [0, 1]


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2:135m",
        messages=FRANCE,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        temperature=0,
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content
    first = lp.content[0]
    assert first.logprob <= 0
    assert len(first.top_logprobs) == 3
    # greedy: the chosen token is the most likely one
    assert first.token == first.top_logprobs[0].token


def test_embeddings_batch(client: openai.OpenAI) -> None:
    r = client.embeddings.create(
        model="smollm2:135m", input=["one", "two words", "three more words"]
    )
    assert len(r.data) == 3
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(d.embedding) == 576 for d in r.data)
    assert r.data[0].embedding != r.data[1].embedding
    single = client.embeddings.create(model="smollm2:135m", input="one", encoding_format="float")
    assert single.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-4)


def test_models_endpoints(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "smollm2:135m" in ids
    assert client.models.retrieve("smollm2:135m").id == "smollm2:135m"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_health(server: Server) -> None:
    r = httpx.get(f"{server.url}/v0/health")
    body = r.json()
    assert r.status_code == 200
    assert body["status"] == "ok"
    assert [m["name"] for m in body["models"]] == ["smollm2:135m"]
    assert body["gpus"] == []


def _stats(server: Server) -> dict[str, float]:
    return httpx.get(f"{server.url}/v0/health").json()["models"][0]["stats"]


def test_disconnect_stops_generation(server: Server) -> None:
    body = {
        "model": "smollm2:135m",
        "prompt": "Count:",
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    seen = _stats(server).get("requests_total", 0)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    # counters reach the server every 0.25 s: wait for a report that includes this request
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        stats = _stats(server)
        if stats["requests_total"] > seen and stats["running"] == 0:
            break
        time.sleep(0.05)
    assert stats["requests_total"] > seen and stats["running"] == 0
    # then nothing is decoded any more
    time.sleep(0.5)
    before = _stats(server)["tokens_generated_total"]
    time.sleep(0.6)
    assert _stats(server)["tokens_generated_total"] == before


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="smollm2:135m",
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
        temperature=0,
        max_tokens=200,
    )
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)
    r = client.chat.completions.create(
        model="smollm2:135m",
        messages=[
            {"role": "user", "content": 'Return a JSON object with the key "city" set to Paris.'}
        ],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
    )
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="smollm2:135m",
            messages=FRANCE,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense-type"}},
            },
        )
    assert "response_format" in str(e.value)
