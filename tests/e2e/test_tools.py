"""OpenAI tool calling with grammar-constrained decoding, through the `openai` SDK."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Server

MODEL = "smollm2:135m"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 30}},
            "required": ["timezone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def _create(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(
        **{"model": MODEL, "temperature": 0, "max_tokens": 120, **kw}
    )


def test_required_tool_call_is_well_formed(client: openai.OpenAI) -> None:
    r = _create(
        client,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name in ("get_weather", "get_time")
    args = json.loads(calls[0].function.arguments)
    assert isinstance(args, dict)
    if calls[0].function.name == "get_weather":
        assert args["unit"] in ("celsius", "fahrenheit") and isinstance(args["city"], str)


def test_named_tool_choice(client: openai.OpenAI) -> None:
    r = _create(
        client,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    calls = r.choices[0].message.tool_calls
    assert calls and [c.function.name for c in calls] == ["get_time"]
    assert "timezone" in json.loads(calls[0].function.arguments)


def test_parallel_calls_allowed(client: openai.OpenAI) -> None:
    r = _create(client, messages=ASK, tools=[WEATHER], tool_choice="required")
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_weather" for c in calls)
    assert len({c.id for c in calls}) == len(calls)


def test_none_never_calls(client: openai.OpenAI) -> None:
    r = _create(client, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=20)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content


def test_auto_gives_text_or_calls(client: openai.OpenAI) -> None:
    r = _create(client, messages=ASK, tools=[WEATHER])
    msg = r.choices[0].message
    assert msg.content or msg.tool_calls
    if msg.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls"
        json.loads(msg.tool_calls[0].function.arguments)


def test_streamed_tool_call(client: openai.OpenAI) -> None:
    stream = _create(client, messages=ASK, tools=[WEATHER], tool_choice="required", stream=True)
    name, args, finish = "", "", None
    for chunk in stream:
        for c in chunk.choices:
            for t in c.delta.tool_calls or []:
                name += t.function.name or "" if t.function else ""
                args += t.function.arguments or "" if t.function else ""
            finish = c.finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    assert isinstance(json.loads(args), dict)


def test_tool_result_fed_back(client: openai.OpenAI) -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "content": '{"temperature": 21, "sky": "sunny"}',
        },
    ]
    r = _create(client, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=30)
    assert r.choices[0].message.content


@pytest.mark.parametrize(
    "changes",
    [
        {"tool_choice": {"type": "function", "function": {"name": "missing"}}},
        {"tool_choice": "required", "tools": None},
        {"tools": [{"type": "function", "function": {"description": "no name"}}]},
        {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
            ],
            "tool_choice": "required",
        },
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {
                            "type": "object",
                            "properties": {"a": {"type": "string", "maxLength": 20000}},
                        },
                    },
                }
            ],
            "tool_choice": "required",
        },
        {"tools": [{"type": "retrieval"}]},
        {"tool_choice": "sometimes"},
    ],
)
def test_bad_tool_requests(server: Server, changes: dict[str, Any]) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": [WEATHER], **changes}
    body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
