"""Tools through a chat template that knows them (Qwen2.5-Coder), fill-in-the-middle, capabilities.

Calls a request forces are grammar-constrained in the template's own `<tool_call>` format and
stream as incremental deltas; both API dialects and the official clients see the same calls.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest

from tests.conftest import Server, start_server, stop_server

MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_PARAMS,
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 40}},
            "required": ["timezone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}]


@pytest.fixture(scope="module")
def qwen(qwen_tools_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("qwen"),
        ["--model", str(qwen_tools_path), "--ctx-size", "2048", "--parallel", "2"],
    )
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def oai(qwen: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{qwen.url}/v1", api_key="x", max_retries=0)


def _create(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(
        **{"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 160, **kw}
    )


def _check_call(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "get_weather":
        jsonschema.validate(args, WEATHER_PARAMS)
    else:
        assert name == "get_time" and isinstance(args["timezone"], str)


def test_capabilities_reported(qwen: Server) -> None:
    models = {m["id"]: m["capabilities"] for m in httpx.get(f"{qwen.url}/v1/models").json()["data"]}
    assert models[f"{MODEL}:latest"] == ["completion", "chat", "tools", "insert"]
    assert models["smollm2:135m"] == ["completion", "chat"]
    one = httpx.get(f"{qwen.url}/v1/models/{MODEL}").json()
    assert one["capabilities"] == ["completion", "chat", "tools", "insert"]
    shown = ollama.Client(host=qwen.url).show(MODEL)
    assert shown.capabilities == ["completion", "chat", "tools", "insert"]


def test_required_parallel_calls_in_template_format(oai: openai.OpenAI) -> None:
    r = _create(oai, tools=[WEATHER, TIME], tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        _check_call(c.function.name, c.function.arguments)
    assert {json.loads(c.function.arguments).get("city") for c in calls} >= {"Paris"}


def test_named_and_single_call(oai: openai.OpenAI) -> None:
    r = _create(
        oai,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    calls = r.choices[0].message.tool_calls
    assert calls and [c.function.name for c in calls] == ["get_time"]
    _check_call("get_time", calls[0].function.arguments)
    r = _create(oai, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1


def test_auto_and_none(oai: openai.OpenAI) -> None:
    r = _create(oai, tools=[WEATHER])
    msg = r.choices[0].message
    assert msg.tool_calls, msg.content  # this model calls the tool it is offered
    assert r.choices[0].finish_reason == "tool_calls"
    for c in msg.tool_calls:
        _check_call(c.function.name, c.function.arguments)
    r = _create(oai, tools=[WEATHER], tool_choice="none", max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_streamed_call_arrives_in_pieces(oai: openai.OpenAI) -> None:
    calls: dict[int, dict[str, Any]] = {}
    pieces = 0
    finish = None
    for chunk in _create(oai, tools=[WEATHER], tool_choice="required", stream=True):
        for c in chunk.choices:
            for t in c.delta.tool_calls or []:
                entry = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
                if t.id:
                    assert entry["id"] is None  # the id comes once, with the name
                    entry["id"] = t.id
                if t.function and t.function.name:
                    entry["name"] += t.function.name
                if t.function and t.function.arguments:
                    entry["arguments"] += t.function.arguments
                    pieces += 1
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and calls
    assert pieces > len(calls)  # arguments streamed incrementally, not in one piece
    for entry in calls.values():
        assert entry["id"] and entry["name"] == "get_weather"
        _check_call(entry["name"], entry["arguments"])


HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]  # text, not a call


def _arrivals(events: Any) -> tuple[float, list[tuple[float, Any]]]:
    """When the request went out, and each event with the time it arrived."""
    start = time.monotonic()
    return start, [(time.monotonic(), e) for e in events]


def _spread(start: float, times: list[float]) -> None:
    """Text streamed as it was generated: in several pieces, the first well before the end."""
    assert len(times) > 3, times
    assert times[0] - start < 0.5 * (times[-1] - start), (start, times)


def test_auto_streams_text_as_generated(oai: openai.OpenAI) -> None:
    """With tools the model may call, text goes out as it comes, not once generation ended."""
    kw: dict[str, Any] = {"messages": HAIKU, "tools": [TIME], "tool_choice": "auto"}
    whole = _create(oai, max_tokens=24, **kw).choices[0]  # also caches the prompt
    assert whole.message.tool_calls is None and whole.message.content
    # decoded again, not replayed at once by the response cache from the request above
    start, events = _arrivals(
        _create(oai, max_tokens=24, stream=True, extra_body={"cache": False}, **kw)
    )
    pieces = [(t, c.choices[0]) for t, c in events if c.choices]
    content = [(t, c.delta.content) for t, c in pieces if c.delta.content]
    _spread(start, [t for t, _ in content])
    assert "".join(text for _, text in content) == whole.message.content
    assert [c.finish_reason for _, c in pieces if c.finish_reason] == [whole.finish_reason]
    assert not any(c.delta.tool_calls for _, c in pieces)


def test_auto_streamed_call(oai: openai.OpenAI) -> None:
    """A call the model chooses to make is held back from the text and sent as tool_calls."""
    whole = _create(oai, tools=[WEATHER], max_tokens=80).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls
    expected = [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls
    ]
    calls: dict[int, dict[str, Any]] = {}
    content, finish = "", None
    for chunk in _create(oai, tools=[WEATHER], max_tokens=80, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            for t in c.delta.tool_calls or []:
                entry = calls.setdefault(t.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += t.id or ""
                entry["name"] += t.function.name or "" if t.function else ""
                entry["arguments"] += t.function.arguments or "" if t.function else ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and content.strip() == (whole.message.content or "")
    assert [(e["name"], json.loads(e["arguments"])) for e in calls.values()] == expected
    assert all(e["id"].startswith("call_") for e in calls.values())


def test_responses_auto_streams_text_and_calls(oai: openai.OpenAI) -> None:
    """The Responses API alike: text deltas as generated, a call as a function_call item."""
    time_tool = {"type": "function", **TIME["function"]}
    kw: dict[str, Any] = {"model": MODEL, "tools": [time_tool], "temperature": 0}
    whole = oai.responses.create(input=HAIKU, max_output_tokens=24, **kw)
    assert whole.output_text and not [o for o in whole.output if o.type == "function_call"]
    start, timed = _arrivals(  # decoded again, not replayed by the response cache
        oai.responses.create(
            input=HAIKU, max_output_tokens=24, stream=True, extra_body={"cache": False}, **kw
        )
    )
    deltas = [(t, e.delta) for t, e in timed if e.type == "response.output_text.delta"]
    _spread(start, [t for t, _ in deltas])
    assert "".join(d for _, d in deltas) == whole.output_text
    assert timed[-1][1].type == "response.completed"

    weather_tool = {"type": "function", **WEATHER["function"]}
    ask = "What is the weather in Paris?"
    kw = {**kw, "tools": [weather_tool], "max_output_tokens": 80}
    whole = oai.responses.create(input=ask, **kw)
    expected = [
        (o.name, json.loads(o.arguments)) for o in whole.output if o.type == "function_call"
    ]
    assert expected
    events = list(oai.responses.create(input=ask, stream=True, **kw))
    (completed,) = [e.response for e in events if e.type == "response.completed"]
    got = [(o.name, json.loads(o.arguments)) for o in completed.output if o.type == "function_call"]
    assert got == expected


def test_tool_results_through_the_template(oai: openai.OpenAI) -> None:
    first = _create(oai, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    r = _create(oai, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=24)
    assert r.choices[0].message.content


def test_json_schema_strict(oai: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "languages": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "maxItems": 3,
            },
            "years": {"type": "integer", "minimum": 0, "maximum": 80},
        },
        "required": ["name", "languages", "years"],
        "additionalProperties": False,
    }
    r = _create(
        oai,
        messages=[{"role": "user", "content": "Describe a programmer as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": schema, "strict": True},
        },
        max_tokens=120,
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_responses_streamed_function_call(oai: openai.OpenAI) -> None:
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMS}
    kinds: list[str] = []
    deltas = ""
    completed = None
    for event in oai.responses.create(
        model=MODEL,
        input="Weather in Oslo?",
        tools=[tool],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
        max_output_tokens=80,
        stream=True,
    ):
        kinds.append(event.type)
        if event.type == "response.function_call_arguments.delta":
            deltas += event.delta
        if event.type == "response.completed":
            completed = event.response
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds.count("response.function_call_arguments.delta") > 1
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert completed is not None
    (call,) = [o for o in completed.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.arguments == deltas
    jsonschema.validate(json.loads(deltas), WEATHER_PARAMS)
    assert completed.usage is not None and completed.usage.output_tokens > 0


def test_ollama_chat_tools_and_results(qwen: Server) -> None:
    client = ollama.Client(host=qwen.url)

    def get_weather(city: str) -> str:
        """Current weather in a city.

        Args:
          city: the city name
        """
        return "sunny"

    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat(model=MODEL, messages=ask, tools=[get_weather], options={"temperature": 0})
    assert r.message.role == "assistant" and r.message.tool_calls
    call = r.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    follow = client.chat(
        model=MODEL,
        messages=[
            *ask,
            r.message,
            {"role": "tool", "content": "sunny, 25 C", "tool_name": "get_weather"},
        ],
        tools=[get_weather],
        options={"temperature": 0, "num_predict": 40},
    )
    assert follow.done and follow.message.role == "assistant"


def test_fill_in_the_middle(qwen: Server, oai: openai.OpenAI) -> None:
    client = ollama.Client(host=qwen.url)
    r = client.generate(
        model=MODEL,
        prompt="def add(a, b):\n    ",
        suffix="\n\nprint(add(1, 2))\n",
        options={"temperature": 0, "num_predict": 20},
    )
    assert "a + b" in r.response
    c = oai.completions.create(
        model=MODEL, prompt="def add(a, b):\n    ", suffix="\n", temperature=0, max_tokens=12
    )
    assert "a + b" in c.choices[0].text
    bad = httpx.post(
        f"{qwen.url}/v1/completions",
        json={"model": "smollm2:135m", "prompt": "x", "suffix": "y"},
        timeout=60,
    )
    assert bad.status_code == 400 and "does not support insert" in bad.json()["error"]["message"]
