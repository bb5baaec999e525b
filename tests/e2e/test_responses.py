"""OpenAI's Responses API through the `openai` SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import Server

MODEL = "smollm2:135m"


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def test_text_response(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL,
        input="What is the capital of France?",
        instructions="Answer briefly.",
        temperature=0,
        max_output_tokens=24,
    )
    assert r.status in ("completed", "incomplete")
    assert "Paris" in r.output_text
    assert r.usage is not None and r.usage.output_tokens > 0 and r.usage.input_tokens > 5
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_stream_event_sequence(client: openai.OpenAI) -> None:
    full = client.responses.create(
        model=MODEL, input="Say hello.", temperature=0, max_output_tokens=12
    )
    kinds, deltas, completed = [], "", None
    for event in client.responses.create(
        model=MODEL, input="Say hello.", temperature=0, max_output_tokens=12, stream=True
    ):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas += event.delta
        if event.type == "response.completed":
            completed = event.response
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert deltas == full.output_text
    assert completed is not None and completed.output_text == deltas
    assert completed.usage is not None


def test_items_input_and_forced_tool(client: openai.OpenAI) -> None:
    tool = {
        "type": "function",
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    }
    r = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]}],
        tools=[tool],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
        max_output_tokens=60,
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert "city" in json.loads(calls[0].arguments)
    follow = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {
                "type": "function_call_output",
                "call_id": calls[0].call_id,
                "output": "12 degrees, rain",
            },
        ],
        temperature=0,
        max_output_tokens=20,
    )
    assert follow.output_text


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "input": ""},
        {"model": MODEL, "input": "x", "previous_response_id": "resp_1"},
        {
            "model": MODEL,
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_image", "image_url": "data:image/png;base64,AA"}],
                }
            ],
        },
        {"model": MODEL, "input": [{"type": "function_call"}]},
        {"model": MODEL, "input": "x", "temperature": 5},
        {"model": "nope", "input": "x"},
    ],
)
def test_bad_requests(server: Server, body: dict[str, object]) -> None:
    r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=30)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["message"]
