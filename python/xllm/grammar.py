"""JSON schemas to llama.cpp grammars (GBNF), within the bounds llama.cpp can take.

The converter (llama-cpp-python's) writes a bound such as `maxLength: N` as N nested optional
groups, and llama.cpp's grammar parser recurses once per group: a schema with a bound in the
thousands crashed the runner with a stack overflow. So every bound a schema sets (lengths,
item and property counts, regex quantifiers) is checked before conversion, and the grammar's
size after it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from xllm.errors import InvalidRequest

MAX_BOUND = 1000
"""The largest length or count a schema may set (1,000 nested groups parse; 2,000 do not)."""
MAX_GRAMMAR = 1 << 20
"""Bytes of GBNF one request may produce."""

_BOUNDS = frozenset(
    {"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"}
)
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def any_json() -> str:
    """A grammar for any JSON value."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


def from_schema(schema: dict[str, Any], param: str) -> str:
    """A grammar for the JSON values `schema` allows; a 400 naming `param` when it cannot be."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

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
