"""The temperature-0 response cache with a real model and the official clients: an identical
greedy request is answered from the cache (the same text and usage, the `x-xllm-cache: hit`
header, the hit counter up by one) on both dialects, streamed too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ollama
import openai
import pytest

from tests.conftest import Server, start_server, stop_server
from tests.e2e.test_metrics import scrape, value

MODEL = "smollm2:135m"
HITS = "xllm_response_cache_hits_total"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with the response cache as it comes (the session's has it off)."""
    s = start_server(
        tmp_path_factory.mktemp("response-cache"),
        ["--model", MODEL, "--ctx-size", "1024", "--parallel", "2"],
    )
    yield s
    stop_server(s)


def test_a_repeated_greedy_chat_is_a_hit_on_the_openai_client(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]

    def ask() -> Any:
        return client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=24,
        )

    hits = value(scrape(server), HITS)
    first = ask()
    second = ask()
    assert first.headers["x-xllm-cache"] == "miss"
    assert second.headers["x-xllm-cache"] == "hit"
    a, b = first.parse(), second.parse()
    assert a.choices[0].message.content
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage == a.usage
    assert value(scrape(server), HITS) == hits + 1

    def stream() -> list[str]:
        chunks = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=24, stream=True,
            extra_body={"cache": True},
        )  # fmt: skip
        return [c.choices[0].delta.content or "" for c in chunks if c.choices]

    pieces = stream()  # a streamed request replays the non-streamed answer's tokens
    assert "".join(pieces) == a.choices[0].message.content
    assert len([p for p in pieces if p]) > 1  # one event per token, not one block
    assert value(scrape(server), HITS) == hits + 2

    fresh = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=24,
        extra_body={"cache": False},
    )  # fmt: skip
    assert "x-xllm-cache" not in fresh.headers


def test_a_hit_has_the_first_answers_logprobs(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")

    def ask() -> Any:
        return client.completions.with_raw_response.create(
            model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6,
            logprobs=2,
        )  # fmt: skip

    first, second = ask(), ask()
    assert (first.headers["x-xllm-cache"], second.headers["x-xllm-cache"]) == ("miss", "hit")
    a, b = first.parse().choices[0], second.parse().choices[0]
    assert a.logprobs is not None and len(a.logprobs.tokens) == 6
    assert b.text == a.text and b.logprobs == a.logprobs


def test_a_repeated_greedy_generate_is_a_hit_on_the_ollama_client(server: Server) -> None:
    client = ollama.Client(host=server.url)
    options = {"temperature": 0, "num_predict": 20}
    prompt = "Write one sentence about the sea."
    hits = value(scrape(server), HITS)
    first = client.generate(model=MODEL, prompt=prompt, options=options)
    second = client.generate(model=MODEL, prompt=prompt, options=options)
    assert first.response and second.response == first.response
    assert second.eval_count == first.eval_count
    assert second.prompt_eval_count == first.prompt_eval_count
    assert value(scrape(server), HITS) == hits + 1
    streamed = "".join(
        part.response for part in client.generate(MODEL, prompt, options=options, stream=True)
    )
    assert streamed == first.response
    assert value(scrape(server), HITS) == hits + 2
