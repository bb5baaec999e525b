"""`/v0/metrics` after a known request mix: every counter moves by exactly what was done."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server

MODEL = "smollm2:135m"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: Server) -> Samples:
    text = httpx.get(f"{server.url}/v0/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def settled(server: Server) -> Samples:
    """A scrape once the runner has reported what earlier tests generated: its counters come
    every 0.25 s, so a scrape right after another test's request may not count it yet."""
    last = scrape(server)
    while True:
        time.sleep(0.6)
        now = scrape(server)
        if value(now, "xllm_generated_tokens_total") == value(last, "xllm_generated_tokens_total"):
            return now
        last = now


def test_counters_move_by_the_request_mix(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    before = settled(server)
    prompt = completion = 0
    for n in (4, 6):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {n}."}],
            max_tokens=n,
            extra_body={"ignore_eos": True},
        )
        assert r.usage is not None and r.usage.completion_tokens == n
        prompt += r.usage.prompt_tokens
        completion += n
    stream = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert usage.completion_tokens == 3
    prompt += usage.prompt_tokens
    completion += 3
    g = httpx.post(
        f"{server.url}/api/generate",
        json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}},
        timeout=60,
    ).json()
    prompt += g["prompt_eval_count"]
    completion += g["eval_count"]
    bad = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1},
    )
    assert bad.status_code == 400

    # token counters come from the model's runner, reported every 0.25 s
    deadline = time.monotonic() + 5
    while True:
        after = scrape(server)
        moved = value(after, "xllm_generated_tokens_total", model=MODEL) - value(
            before, "xllm_generated_tokens_total", model=MODEL
        )
        if moved >= completion or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("xllm_generated_tokens_total", model=MODEL) == completion
    assert delta("xllm_prompt_tokens_total", model=MODEL) == prompt
    assert delta("xllm_engine_requests_total", model=MODEL) == 4
    chat = "/v1/chat/completions"
    assert delta("xllm_requests_total", endpoint=chat, model=MODEL, status="200") == 2
    assert delta("xllm_requests_total", endpoint=chat, status="400") == 1
    assert delta("xllm_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("xllm_requests_total", endpoint="/api/generate", status="200") == 1
    assert delta("xllm_generations_total", model=MODEL, finish_reason="length") >= 3
    assert delta("xllm_generations_total", model=MODEL) == 4
    assert delta("xllm_time_to_first_token_seconds_count", model=MODEL) == 4
    assert delta("xllm_inter_token_latency_seconds_count", model=MODEL) >= 3  # 2+ tokens
    assert value(after, "xllm_loaded_models") >= 1
    assert value(after, "xllm_model_ram_bytes", model=MODEL) > 50e6  # weights + KV cache
    assert value(after, "xllm_ram_bytes", kind="total") > value(
        after, "xllm_ram_bytes", kind="free"
    )
    assert value(after, "xllm_queue_depth", model=MODEL) == 0
    assert value(after, "xllm_running_sequences", model=MODEL) == 0


def test_the_balancer_gauges_match_health(server: Server) -> None:
    """What /v0/health routes on, /v0/metrics has too (an idle server: nothing runs)."""
    health = httpx.get(f"{server.url}/v0/health").json()
    samples = scrape(server)
    (model,) = [m for m in health["models"] if m["name"] == MODEL]
    key = model["instance"]
    assert model["slots"] == model["free_slots"] == 4  # --parallel 4
    assert value(samples, "xllm_free_slots", model=key) == model["free_slots"]
    assert value(samples, "xllm_queue_depth", model=key) == model["queue_depth"] == 0
    headroom = health["node"]["memory"]["headroom_bytes"]
    assert headroom > 0  # no budget: free RAM, which moves a little between the two reads
    assert value(samples, "xllm_memory_headroom_bytes") == pytest.approx(headroom, rel=0.2)
