"""Tool calling shared by both dialects: prompting, constraining and parsing tool calls.

A model whose chat template knows tools gets them through the template (its own format).
Otherwise a system message describes them. When a call is required (OpenAI `tool_choice`
"required" or a named function) decoding is constrained by a grammar built from the tools'
JSON schemas, so the output is always a well-formed call. With "auto" the model decides, and
its output is parsed: Hermes/Qwen `<tool_call>{...}</tool_call>` blocks or a bare JSON call.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xllm import grammar, reasoning
from xllm.errors import InvalidRequest


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }
        if index is not None:
            out["index"] = index
        return out


def _call_schema(function: Mapping[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A call's schema; its parameters go into `defs` (the root's `$defs`) under a name of
    their own, their local `$ref`s rebased there: a `#/$defs/X` (what pydantic writes) means the
    parameters' own root, not the call's."""
    params = function.get("parameters") or {"type": "object", "properties": {}}
    key = f"call{len(defs)}"
    defs[key] = _rebase_refs(params, f"#/$defs/{key}")
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": {"$ref": f"#/$defs/{key}"},
        },
        "required": ["name", "arguments"],
    }


def _rebase_refs(node: Any, root: str) -> Any:
    if isinstance(node, list):
        return [_rebase_refs(n, root) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rebase_refs(v, root) for k, v in node.items()}
    ref = node.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = root + ref[1:]
    return out


TAG_OPEN, TAG_CLOSE = "<tool_call>", "</tool_call>"
"""How Hermes/Qwen-style chat templates ask the model to wrap each call."""


def call_grammar(
    functions: Sequence[Mapping[str, Any]], only: str | None, parallel: bool, tagged: bool = False
) -> str:
    """GBNF for one call (or, when parallel, several) to the given functions.

    Untagged: a JSON object `{"name", "arguments"}`, several as a JSON array. Tagged (the
    template's own format): each object inside `<tool_call>...</tool_call>`, one per line.
    """
    chosen = [f for f in functions if only is None or f["name"] == only]
    if not chosen:
        raise InvalidRequest(f"tool_choice names an unknown function {only!r}", param="tool_choice")
    defs: dict[str, Any] = {}
    calls = [_call_schema(f, defs) for f in chosen]
    one: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    several = parallel and only is None
    schema = {"type": "array", "items": one, "minItems": 1} if several and not tagged else one
    schema = {**schema, "$defs": defs}
    gbnf = grammar.from_schema(schema, "tools")
    if not tagged:
        return gbnf
    # the converter names its top rule `root`: it becomes one call inside the tags
    body = re.sub(r"^root ::=", "tool-call-json ::=", gbnf, count=1, flags=re.MULTILINE)
    block = f'"{TAG_OPEN}\\n" tool-call-json "\\n{TAG_CLOSE}"'
    root = 'root ::= tool-call ("\\n" tool-call)*' if several else "root ::= tool-call"
    return f"{root}\ntool-call ::= {block}\n{body}"


def system_prompt(functions: Sequence[Mapping[str, Any]]) -> str:
    """Tool instructions for chat templates that have no tool support of their own."""
    listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
    return (
        "You can call these functions:\n"
        f"{listing}\n"
        'To call one, reply with only a JSON object: {"name": <function name>, '
        '"arguments": <arguments object>}. Otherwise, reply normally.'
    )


_TAGGED = re.compile(rf"{TAG_OPEN}\s*(.*?)\s*{TAG_CLOSE}", re.DOTALL)
_FENCED = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def _as_calls(value: Any) -> list[ToolCall] | None:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(item["name"], args, f"call_{secrets.token_hex(12)}"))
    return calls or None


def parse(text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """(remaining text, calls) from a model's output; calls to unknown functions are text."""
    calls: list[ToolCall] = []
    for block in _TAGGED.findall(text):
        try:
            found = _as_calls(json.loads(block))
        except json.JSONDecodeError:
            found = None
        if found and all(c.name in names for c in found):
            calls += found
    if calls:
        return _TAGGED.sub("", text).strip(), calls
    stripped = text.strip()
    fenced = _FENCED.fullmatch(stripped)
    if fenced:  # small models often wrap the call they were asked for in a code block
        stripped = fenced.group(1)
    if stripped[:1] in "{[":
        try:
            found = _as_calls(json.loads(stripped))
        except json.JSONDecodeError:
            found = None
        if found and all(c.name in names for c in found):
            return "", found
    return text, []


def native(pieces: Sequence[Mapping[str, Any]]) -> list[ToolCall]:
    """Calls an engine made itself (OpenAI's shape: id, function name, arguments as JSON
    text); arguments that are not a JSON object are kept under `arguments`' raw text."""
    calls = []
    for c in pieces:
        fn = c.get("function") or {}
        raw = fn.get("arguments") or "{}"
        try:
            args = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            args = {"arguments": raw}
        calls.append(
            ToolCall(
                str(fn.get("name", "")), args, str(c.get("id") or f"call_{secrets.token_hex(12)}")
            )
        )
    return calls


_BARE_CALL = re.compile(r"(?:```(?:json)?\s*)?[\[{]")
"""How output that `parse` may take whole as one bare JSON call begins."""
_BARE_CALL_PREFIX = re.compile(r"`{1,2}|```(?:j|js|jso)|```(?:json)?\s*")
"""Beginnings too short to tell: an opening code fence not yet followed by the JSON."""


class CallWatch:
    """Output of a model free to call tools or not, as it is generated: the text that cannot
    be part of a call goes out at once, the rest is held back and parsed when the output ends.

    What `parse` may take as calls is held: everything from a `<tool_call>` tag on (and a
    piece of text that may be the tag's start, until it is whole), and, for a bare JSON call,
    the whole output when it opens with `{`, `[` or a code fence around them.
    """

    def __init__(self, names: set[str]) -> None:
        self._names = names
        self._held = ""
        self._at_start = True  # only whitespace so far: a bare JSON call may still come
        self._calling = False  # a call may have begun: the rest waits for the end

    def feed(self, text: str) -> str:
        """The part of the output so far that is text for sure and was not returned yet."""
        held = self._held + text
        if not self._calling and self._at_start:
            begun = held.lstrip()
            if _BARE_CALL.match(begun):
                self._calling = True
            elif not begun or _BARE_CALL_PREFIX.fullmatch(begun):
                self._held = held
                return ""
            self._at_start = False
        if self._calling:
            self._held = held
            return ""
        tag = held.find(TAG_OPEN)
        if tag >= 0:
            self._calling = True
            self._held = held[tag:]
            return held[:tag]
        keep = reasoning.partial_suffix(held, TAG_OPEN)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def end(self) -> tuple[str, list[ToolCall]]:
        """(the rest of the text, the calls) of what was held back."""
        held, self._held = self._held, ""
        return parse(held, self._names)


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates expect them: tool-call arguments as objects."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c["function"])
                with contextlib.suppress(json.JSONDecodeError, TypeError):
                    fn["arguments"] = json.loads(fn["arguments"])
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


def as_text(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message for a template without tool support: calls written as the JSON we ask for."""
    m = dict(message)
    calls = m.pop("tool_calls", None) or []
    parts = [m.get("content") or ""]
    for c in calls:
        fn = c["function"]
        args = fn.get("arguments")
        if isinstance(args, str):
            with contextlib.suppress(json.JSONDecodeError):
                args = json.loads(args)
        parts.append(json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False))
    m["content"] = "\n".join(p for p in parts if p)
    return m


_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class CallStream:
    """Tool calls out of a growing text, as they are generated: for output a grammar made a call.

    `feed` returns ("call", name) when a call's name is complete, then ("arguments", text) for
    each piece of its arguments object. Each call is a JSON object `{"name", "arguments"}`
    (name first, as the grammar writes it); whatever surrounds the objects (an array, tags)
    is skipped.
    """

    def __init__(self) -> None:
        self._state = "outside"  # outside -> head -> arguments -> tail -> outside
        self._head = ""
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[tuple[str, str]]:
        events: list[tuple[str, str]] = []
        arguments = ""
        for ch in text:
            if self._state == "outside":
                if ch == "{":
                    self._state, self._head, self._depth = "head", "{", 1
                continue
            self._track(ch)
            if self._state == "head":
                self._head += ch
                m = _HEAD.fullmatch(self._head)
                if m:
                    events.append(("call", json.loads(f'"{m.group(1)}"')))
                    self._state = "arguments"
            elif self._state == "arguments":
                if arguments or not ch.isspace():
                    arguments += ch
                if self._depth == 1 and not self._in_string and ch in "}]":
                    events.append(("arguments", arguments))
                    arguments, self._state = "", "tail"
            elif self._depth == 0:
                self._state = "outside"
        if arguments:
            events.append(("arguments", arguments))
        return events

    def _track(self, ch: str) -> None:
        """JSON nesting depth and whether we are inside a string, one character at a time."""
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
