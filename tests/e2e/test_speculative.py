"""Draft-free speculation (n-gram lookup) and OpenAI's `prediction` with a real model: the
output is exactly what plain decoding gives, alone and among other streams, greedy and seeded;
a prediction of the exact output takes far fewer decode steps (issue 17). Every request skips the
temperature-0 response cache: a repeated request would be replayed, not decoded again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server
from tests.e2e.test_metrics import settled, value

MODEL = "smollm2:135m"

CODE = """def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def mul(a, b):
    return a * b
"""
# a prompt whose continuation repeats what it holds: lookup drafts long runs
REPEAT = f"{CODE}\n\n# The same code again:\n{CODE[:20]}"
PROMPTS = [REPEAT, "The capital of France is", "def fibonacci(n):\n"]


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("spec"),
        ["--model", MODEL, "--ctx-size", "1024", "--parallel", "4"],
    )
    yield s
    stop_server(s)


async def _complete(
    client: httpx.AsyncClient, prompt: str, max_tokens: int = 48, **extra: Any
) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "cache": False, **extra}  # fmt: skip
    r = await client.post("/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def _run(server: Server, *calls: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The completions of `calls` ((prompt, extra fields)), sent at once."""

    async def main() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=server.url) as client:
            return list(await asyncio.gather(*(_complete(client, p, **x) for p, x in calls)))

    return asyncio.run(main())


def _text(result: dict[str, Any]) -> str:
    text: str = result["choices"][0]["text"]
    return text


def _drafts(result: dict[str, Any]) -> tuple[int, int]:
    details = result["usage"]["completion_tokens_details"]
    return details["accepted_prediction_tokens"], details["rejected_prediction_tokens"]


NGRAM = {"speculative": {"type": "ngram"}}


def test_greedy_output_is_the_same_with_ngram_alone_and_among_streams(
    spec_server: Server,
) -> None:
    plain = [_run(spec_server, (p, {}))[0] for p in PROMPTS]
    alone = [_run(spec_server, (p, NGRAM))[0] for p in PROMPTS]
    assert [_text(r) for r in alone] == [_text(r) for r in plain]
    assert all(_drafts(r) == (0, 0) for r in plain)
    accepted, _ = _drafts(alone[0])
    assert accepted >= 8, alone[0]["usage"]  # the repeating prompt drafts long runs
    # four streams at once, drafting and plain ones mixed in each decode
    together = _run(spec_server, *((p, NGRAM) for p in PROMPTS), (PROMPTS[0], {}))
    assert [_text(r) for r in together] == [*(_text(r) for r in plain), _text(plain[0])]
    assert _drafts(together[0])[0] > 0 and _drafts(together[3]) == (0, 0)


def test_seeded_sampling_is_the_same_with_ngram(spec_server: Server) -> None:
    seeded = {"temperature": 0.7, "seed": 1234}
    plain = _run(spec_server, (REPEAT, seeded))[0]
    drafted = _run(spec_server, (REPEAT, {**seeded, **NGRAM}))[0]
    assert _text(drafted) == _text(plain)
    assert sum(_drafts(drafted)) > 0


def test_a_prediction_of_the_output_takes_far_fewer_decode_steps(spec_server: Server) -> None:
    prompt = "Once upon a time, a small robot"
    fixed = {"max_tokens": 96, "ignore_eos": True}
    plain = _run(spec_server, (prompt, fixed))[0]
    expected = _text(plain)
    assert plain["usage"]["completion_tokens"] == 96
    before = settled(spec_server)
    predicted = _run(
        spec_server,
        (prompt, {**fixed, "prediction": {"type": "content", "content": expected}}),
    )[0]
    after = settled(spec_server)
    assert _text(predicted) == expected
    accepted, rejected = _drafts(predicted)
    assert accepted >= 80 and rejected <= 8, predicted["usage"]
    steps = value(after, "xllm_decode_steps_total") - value(before, "xllm_decode_steps_total")
    assert steps <= 12, f"{steps} decode steps for 96 predicted tokens"
    drafted = value(after, "xllm_spec_drafted_tokens_total") - value(
        before, "xllm_spec_drafted_tokens_total"
    )
    taken = value(after, "xllm_spec_accepted_tokens_total") - value(
        before, "xllm_spec_accepted_tokens_total"
    )
    assert (drafted, taken) == (accepted + rejected, accepted)
    # a prediction that is wrong throughout changes nothing but the time
    wrong = _run(
        spec_server,
        (prompt, {**fixed, "prediction": {"type": "content", "content": CODE}}),
    )[0]
    assert _text(wrong) == expected


def test_ollama_options_and_chat_take_speculation(spec_server: Server) -> None:
    body = {"model": MODEL, "prompt": REPEAT, "raw": True, "stream": False, "cache": False}
    options = {"temperature": 0, "num_predict": 32}
    plain = httpx.post(
        f"{spec_server.url}/api/generate", json={**body, "options": options}, timeout=300
    )
    spec = httpx.post(
        f"{spec_server.url}/api/generate",
        json={**body, "options": {**options, "speculative": "ngram", "max_draft": 8}},
        timeout=300,
    )
    assert spec.status_code == 200, spec.text
    assert spec.json()["response"] == plain.json()["response"]
    messages = [{"role": "user", "content": f"Repeat this code exactly:\n{CODE}"}]
    chat = {"model": MODEL, "messages": messages, "max_tokens": 48, "temperature": 0,
            "cache": False}  # fmt: skip
    r1 = httpx.post(f"{spec_server.url}/v1/chat/completions", json=chat, timeout=300).json()
    answer = r1["choices"][0]["message"]["content"]
    prediction = {"type": "content", "content": [{"type": "text", "text": answer}]}
    r2 = httpx.post(
        f"{spec_server.url}/v1/chat/completions",
        json={**chat, "prediction": prediction},
        timeout=300,
    ).json()
    # the prediction (given as content parts) was verified and taken; the text is the plain
    # answer's up to the float effects of multi-row decodes: on some CPUs (an AMD EPYC with
    # AVX2 here) SmolLM2 flips the near-tie of a blank line between the functions
    assert r2["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] >= 8
    content = r2["choices"][0]["message"]["content"]
    assert content.splitlines()[:2] == answer.splitlines()[:2] == CODE.splitlines()[:2]


def test_draft_model_speculation_needs_a_draft_model(spec_server: Server) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "speculative": {"type": "draft"}}
    r = httpx.post(f"{spec_server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "speculative" and "without a draft model" in error["message"]
    ollama = {"model": MODEL, "prompt": "x", "stream": False, "options": {"speculative": "draft"}}
    r = httpx.post(f"{spec_server.url}/api/generate", json=ollama, timeout=60)
    assert r.status_code == 400 and "without a draft model" in r.json()["error"], r.text


def test_auto_mode_changes_nothing_but_the_time(spec_server: Server) -> None:
    auto = {"speculative": {"type": "auto"}}
    plain = [_run(spec_server, (p, {}))[0] for p in PROMPTS]
    before = settled(spec_server)
    alone = [_run(spec_server, (p, auto))[0] for p in PROMPTS]
    assert [_text(r) for r in alone] == [_text(r) for r in plain]
    together = _run(spec_server, *((p, auto) for p in PROMPTS), (PROMPTS[0], auto))
    assert [_text(r) for r in together] == [*(_text(r) for r in plain), _text(plain[0])]
    # the repeating prompt is lookup's best case: its guesses were verified, or, where the
    # costs measured on this machine said a draft would not pay (a busy CI machine's may),
    # declined; the usage counts the verified ones as the metrics do
    after = settled(spec_server)

    def delta(name: str) -> float:
        return value(after, name) - value(before, name)

    verified = sum(sum(_drafts(r)) for r in [*alone, *together])
    assert verified == delta("xllm_spec_drafted_tokens_total")
    assert verified + delta("xllm_spec_declined_tokens_total") > 0
