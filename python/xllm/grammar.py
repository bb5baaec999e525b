"""JSON schemas to llama.cpp grammars (GBNF), within the bounds llama.cpp can take.

The converter (llama-cpp-python's) writes a bound such as `maxLength: N` as N nested optional
groups, and llama.cpp's grammar parser recurses once per group: a schema with a bound in the
thousands crashed the runner with a stack overflow. So every bound a schema sets (lengths,
item and property counts, regex quantifiers) is checked before conversion, and the grammar's
size after it.

Schemas no value can satisfy (an empty `enum`, `anyOf` or `type` list...) became empty grammar
rules that llama.cpp refused only once the request reached the front of the queue: the wire
models refuse them up front (`check_schema`), and the runner parses every grammar before a
request is queued, so whatever else llama.cpp rejects is the client's 400 too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from xllm.errors import InvalidRequest

MAX_BOUND = 1000
"""The largest length or count a schema may set (1,000 nested groups parse; 2,000 do not)."""
MAX_GRAMMAR = 1 << 20
"""Bytes of GBNF one request may produce."""

_BOUNDS = frozenset(
    {"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"}
)
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
# JSON Schema keywords whose value is a schema, a list of schemas, or a map of them
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_RANGES = (
    ("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"),
    ("minimum", "maximum"),
)  # fmt: skip


@dataclass(frozen=True)
class Grammar:
    """GBNF text, and the request field it enforces (a grammar llama.cpp rejects is its 400)."""

    text: str
    param: str
    source: str | dict[str, Any] | None = field(default=None, compare=False)
    """What it was made from ("json" or a JSON schema), for engines that constrain output
    themselves (a remote upstream takes it as response_format)."""


def any_json() -> str:
    """A grammar for any JSON value."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


def from_schema(schema: dict[str, Any], param: str) -> str:
    """A grammar for the JSON values `schema` allows; a 400 naming `param` when it cannot be."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        check_schema(schema)
    except ValueError as e:
        raise InvalidRequest(f"{param}: {e}", param=param) from None
    _check_bounds(schema, param)
    try:
        grammar = str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as e:  # the converter raises assorted errors for schemas it cannot map
        raise InvalidRequest(
            f"{param}: unsupported or invalid JSON schema: {e}", param=param
        ) from None
    if len(grammar) > MAX_GRAMMAR:
        raise InvalidRequest(
            f"{param}: the JSON schema is too large to enforce ({len(grammar)} bytes of grammar; "
            f"the limit is {MAX_GRAMMAR})",
            param=param,
        )
    return grammar


def _check_bounds(schema: Any, param: str) -> None:
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                bound: float = 0
                if key in _BOUNDS and isinstance(value, int | float):
                    bound = value
                elif key == "pattern" and isinstance(value, str):
                    bound = max(
                        (max(int(m[1]), int(m[2] or 0)) for m in _QUANTIFIER.finditer(value)),
                        default=0,
                    )
                if bound > MAX_BOUND:
                    raise InvalidRequest(
                        f"{param}: {key} {value!r} exceeds the largest bound xllm can enforce "
                        f"({MAX_BOUND})",
                        param=param,
                    )
                stack.append(value)


def check_schema(schema: Any, prefix: str = "") -> None:
    """ValueError, saying where (after `prefix`), for a JSON schema no value can satisfy or
    whose combinators are malformed: llama.cpp cannot enforce an empty set of values."""
    if not _finite(schema):
        raise ValueError("the schema holds NaN or an infinity, which are not JSON")
    for where, node in _subschemas(schema, prefix):
        for key in ("enum", "anyOf", "oneOf", "allOf", "type"):
            if key not in node or (key == "type" and isinstance(node[key], str)):
                continue
            if not isinstance(node[key], list):
                kinds = "a string or an array" if key == "type" else "an array"
                raise ValueError(f"{where}{key} must be {kinds}")
            if not node[key]:
                why = "it needs at least one schema" if key == "allOf" else "no value can match"
                raise ValueError(f"{where}{key} is empty: {why}")
        if "not" in node and (node["not"] is True or node["not"] == {}):
            raise ValueError(f"{where}not: {json.dumps(node['not'])} excludes every value")
        for low, high in _RANGES:
            a, b = node.get(low), node.get(high)
            if _number(a) and _number(b) and a > b:
                raise ValueError(f"{where}{low} {a} exceeds {high} {b}: no value can match")


def checked_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema`, once `check_schema` passes it (a pydantic validator)."""
    check_schema(schema)
    return schema


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in `value` (Python's json reads and writes them)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return False
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return True


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _subschemas(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object in a schema with its path (`properties.a.`), by keyword, so that
    data (`enum` and `const` values, property names) is never mistaken for a schema."""
    stack = [(where, node)]
    while stack:
        where, node = stack.pop()
        if not isinstance(node, dict):
            continue  # boolean schemas; the converter refuses what it cannot read
        yield where, node
        for key in _ONE:
            if isinstance(node.get(key), dict):
                stack.append((f"{where}{key}.", node[key]))
        for key in _LISTS:
            if isinstance(node.get(key), list):
                stack.extend((f"{where}{key}[{i}].", s) for i, s in enumerate(node[key]))
        for key in _MAPS:
            if isinstance(node.get(key), dict):
                stack.extend((f"{where}{key}.{k}.", s) for k, s in node[key].items())


def for_format(format_: str | dict[str, Any] | None, param: str) -> Grammar | None:
    """A grammar forcing JSON output: any JSON for "json", else JSON matching a schema (a
    request's `format`, `response_format`...; `param` names it in errors)."""
    if not format_:
        return None
    if format_ == "json":
        return Grammar(any_json(), param, "json")
    if not isinstance(format_, dict):
        raise InvalidRequest(f'{param}: expected "json" or a JSON schema', param=param)
    return Grammar(from_schema(format_, param), param, format_)
