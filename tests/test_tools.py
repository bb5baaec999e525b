"""Tool calling and capabilities without a model: grammars, parsing, streamed calls, metadata."""

from __future__ import annotations

import json

import pytest

from xllm import grammar, reasoning, tools
from xllm.errors import InvalidRequest
from xllm.models.metadata import capabilities
from xllm.server.ollama.wire import keep_alive_seconds

WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def _calls(events: list[tuple[str, str]]) -> list[tuple[str, object]]:
    calls: list[list[str]] = []
    for kind, value in events:
        if kind == "call":
            calls.append([value, ""])
        else:
            calls[-1][1] += value
    return [(name, json.loads(args)) for name, args in calls]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"name": "f", "arguments": {"a": "x}\\"y", "b": [1, {"c": 2}]}}',
            [("f", {"a": 'x}"y', "b": [1, {"c": 2}]})],
        ),
        (
            '[{"name":"a","arguments":{}} , { "name" : "b" , "arguments" : {"x": "]"} }]',
            [("a", {}), ("b", {"x": "]"})],
        ),
        (
            '<tool_call>\n{"name": "f", "arguments": {"q": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
            [("f", {"q": 1}), ("g", {})],
        ),
        ('{"name": "caf\\u00e9", "arguments": {}}', [("café", {})]),
    ],
)
@pytest.mark.parametrize("step", [1, 2, 5, 10_000])
def test_call_stream_any_split(text: str, expected: list[object], step: int) -> None:
    stream = tools.CallStream()
    events: list[tuple[str, str]] = []
    for i in range(0, len(text), step):
        events += stream.feed(text[i : i + step])
    assert _calls(events) == expected


def test_call_stream_names_before_arguments() -> None:
    stream = tools.CallStream()
    assert stream.feed('{"name": "get_wea') == []
    assert stream.feed('ther", "arguments": {"ci') == [
        ("call", "get_weather"),
        ("arguments", '{"ci'),
    ]


@pytest.mark.parametrize(
    ("text", "names", "expected_calls", "expected_text"),
    [
        (
            '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
            {"get_weather"},
            [("get_weather", {"city": "Oslo"})],
            "",
        ),
        (
            '```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```',
            {"get_weather"},
            [("get_weather", {"city": "Oslo"})],
            "",
        ),
        (
            'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
            {"get_weather"},
            [("get_weather", {"city": "Oslo"})],
            "Sure.",
        ),
        (
            '[{"name": "a", "parameters": {}}, {"name": "b", "arguments": "{\\"x\\": 1}"}]',
            {"a", "b"},
            [("a", {}), ("b", {"x": 1})],
            "",
        ),
        (
            '{"name": "unknown", "arguments": {}}',
            {"get_weather"},
            [],
            '{"name": "unknown", "arguments": {}}',
        ),
        ("It is sunny.", {"get_weather"}, [], "It is sunny."),
        (
            '{"name": "get_weather", "arguments": [1]}',
            {"get_weather"},
            [],
            '{"name": "get_weather", "arguments": [1]}',
        ),
    ],
)
def test_parse(
    text: str, names: set[str], expected_calls: list[object], expected_text: str
) -> None:
    rest, calls = tools.parse(text, names)
    assert [(c.name, c.arguments) for c in calls] == expected_calls
    assert rest == expected_text
    assert len({c.id for c in calls}) == len(calls)


OSLO = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'


@pytest.mark.parametrize(
    ("text", "streamed", "rest", "calls"),
    [
        ("Hello there, friend.", "Hello there, friend.", "", []),
        (f"Sure.\n<tool_call>\n{OSLO}\n</tool_call>", "Sure.\n", "", ["get_weather"]),
        (f"  {OSLO}", "", "", ["get_weather"]),
        (f"[{OSLO}]", "", "", ["get_weather"]),
        (f"```json\n{OSLO}\n```", "", "", ["get_weather"]),
        ("```python\nprint(1)\n```", "```python\nprint(1)\n```", "", []),
        ("a <b> then <tool_call> no call", "a <b> then ", "<tool_call> no call", []),
        ('{"a": 1}', "", '{"a": 1}', []),
        ('{"name": "unknown", "arguments": {}}', "", '{"name": "unknown", "arguments": {}}', []),
        ("ends in <tool_ca", "ends in ", "<tool_ca", []),
        ("\n ``", "", "\n ``", []),
    ],
)
@pytest.mark.parametrize("step", [1, 2, 5, 10_000])
def test_call_watch_holds_back_only_what_may_be_a_call(
    text: str, streamed: str, rest: str, calls: list[str], step: int
) -> None:
    watch = tools.CallWatch({"get_weather"})
    got = "".join(watch.feed(text[i : i + step]) for i in range(0, len(text), step))
    got_rest, got_calls = watch.end()
    assert (got, got_rest, [c.name for c in got_calls]) == (streamed, rest, calls)
    parsed_text, parsed_calls = tools.parse(text, {"get_weather"})
    assert [c.arguments for c in got_calls] == [c.arguments for c in parsed_calls]
    if not calls:
        assert got + got_rest == parsed_text == text


def test_tagged_grammar_wraps_the_json_call() -> None:
    grammar = tools.call_grammar([WEATHER], None, parallel=True, tagged=True)
    assert grammar.startswith('root ::= tool-call ("\\n" tool-call)*\n')
    assert 'tool-call ::= "<tool_call>\\n" tool-call-json "\\n</tool_call>"' in grammar
    assert "\nroot ::=" not in grammar.split("\n", 1)[1]  # the converter's root was renamed
    single = tools.call_grammar([WEATHER], "get_weather", parallel=True, tagged=True)
    assert single.startswith("root ::= tool-call\n")
    untagged = tools.call_grammar([WEATHER], None, parallel=True)
    assert "tool_call" not in untagged and untagged.count("root ::=") == 1


PYDANTIC_TOOL = {  # what pydantic's model_json_schema() writes for a nested model
    "name": "book",
    "parameters": {
        "type": "object",
        "properties": {"where": {"$ref": "#/$defs/Place"}, "when": {"type": "string"}},
        "required": ["where", "when"],
        "$defs": {
            "Place": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "near": {"$ref": "#/$defs/Place"}},
                "required": ["city"],
            }
        },
    },
}


@pytest.mark.parametrize("tagged", [False, True])
@pytest.mark.parametrize("parallel", [False, True])
def test_call_grammar_resolves_refs_inside_parameters(tagged: bool, parallel: bool) -> None:
    from llama_cpp import LlamaGrammar

    gbnf = tools.call_grammar([PYDANTIC_TOOL, WEATHER], None, parallel, tagged)
    assert "city" in gbnf  # the referenced definition made it into the grammar
    LlamaGrammar.from_string(gbnf, verbose=False)  # and llama.cpp's parser takes it


def test_grammar_errors() -> None:
    with pytest.raises(InvalidRequest, match="unknown function"):
        tools.call_grammar([WEATHER], "nope", parallel=False)
    with pytest.raises(InvalidRequest, match="invalid JSON schema"):
        tools.call_grammar([{"name": "f", "parameters": {"type": "nonsense"}}], None, False)


TOOLS_TEMPLATE = "{% if tools %}{{ tools | tojson }}{% endif %}<|im_start|>"


@pytest.mark.parametrize(
    ("metadata", "infill", "expected"),
    [
        ({"general.architecture": "llama"}, False, ["completion"]),
        (
            {"general.architecture": "llama", "tokenizer.chat_template": "<|im_start|>"},
            False,
            ["completion", "chat"],
        ),
        (
            {"general.architecture": "qwen2", "tokenizer.chat_template": TOOLS_TEMPLATE},
            True,
            ["completion", "chat", "tools", "insert"],
        ),
        (
            {
                "general.architecture": "qwen3",
                "tokenizer.chat_template": "{% if enable_thinking %}<think>{% endif %}",
            },
            False,
            ["completion", "chat", "thinking"],
        ),
        ({"general.architecture": "bert", "bert.pooling_type": 1}, False, ["embedding"]),
        ({"general.architecture": "nomic-bert"}, False, ["embedding"]),
        (
            {"general.architecture": "gemma3", "gemma3.vision.block_count": 27},
            False,
            ["completion", "vision"],
        ),
    ],
)
def test_capabilities(metadata: dict[str, object], infill: bool, expected: list[str]) -> None:
    assert capabilities(metadata, infill=infill) == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (0, 0.0), (-1, -1.0), (300, 300.0), ("5m", 300.0), ("1h30m", 5400.0),
     ("-1", -1.0), ("0", 0.0), ("1.5s", 1.5), ("250ms", 0.25), ("-1m", -60.0)],
)  # fmt: skip
def test_keep_alive_durations(value: str | int | None, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 m", "m5", "1d", "", "5m3"])
def test_keep_alive_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="keep_alive"):
        keep_alive_seconds(value)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": 20_000},
        {"type": "object", "properties": {"a": {"type": "array", "maxItems": 10**9}}},
        {"type": "array", "items": [{"type": "string", "minLength": 5000}]},
        {"anyOf": [{"type": "object", "maxProperties": 1001}]},
        {"type": "string", "pattern": "^a{0,100000}$"},
        {"type": "string", "pattern": "^(ab){5000}$"},
    ],
)
def test_schema_bounds_llama_cpp_cannot_take_are_refused(schema: dict[str, object]) -> None:
    """A bound in the thousands used to crash the runner (one nested group per repetition)."""
    with pytest.raises(InvalidRequest, match="exceeds the largest bound") as e:
        grammar.from_schema(schema, "response_format")
    assert e.value.param == "response_format"
    with pytest.raises(InvalidRequest, match="exceeds the largest bound"):
        tools.call_grammar([{"name": "f", "parameters": schema}], None, parallel=False)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": 1000},
        {"type": "object", "properties": {"maxLength": {"type": "integer", "maximum": 10**9}}},
        {"type": "string", "pattern": "^[a-z]{2,8}$"},
        {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 50},
    ],
)
def test_schema_bounds_within_limits(schema: dict[str, object]) -> None:
    assert "root ::=" in grammar.from_schema(schema, "format")


@pytest.mark.parametrize(
    ("text", "inside", "thinking", "content"),
    [
        ("<think>\nLet me see.\n</think>\n\nParis.", False, "\nLet me see.\n", "Paris."),
        ("  <think>a</think>b", False, "a", "b"),
        ("Let me see.\n</think>\n\nParis.", True, "Let me see.\n", "Paris."),
        ("Paris.", False, "", "Paris."),
        ("<thin", False, "", "<thin"),
        ("<think>never closed </thi", False, "never closed </thi", ""),
        ("a < b </think>", True, "a < b ", ""),
    ],
)
@pytest.mark.parametrize("step", [1, 3, 10_000])
def test_think_splitter(text: str, inside: bool, thinking: str, content: str, step: int) -> None:
    splitter = reasoning.ThinkSplitter(inside)
    got_thinking, got_content = "", ""
    for i in range(0, len(text), step):
        t, c = splitter.feed(text[i : i + step])
        got_thinking, got_content = got_thinking + t, got_content + c
    t, c = splitter.flush()
    assert (got_thinking + t, got_content + c) == (thinking, content)
    assert reasoning.ThinkSplitter(inside).whole(text) == (thinking, content)
