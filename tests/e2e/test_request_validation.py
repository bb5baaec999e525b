"""Request fields that used to fail late or be ignored: schemas no value satisfies (a 500 after
the queue), Ollama options of any type, and per-request chat templates on the chat endpoints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Server

MODEL = "smollm2:135m"
ASK = [{"role": "user", "content": "Give the value."}]

BAD_SCHEMAS = [
    # (schema, the keyword the error names)
    ({"enum": []}, "enum"),
    ({"type": "string", "enum": []}, "enum"),
    ({"anyOf": []}, "anyOf"),
    ({"oneOf": []}, "oneOf"),
    ({"allOf": []}, "allOf"),
    ({"type": []}, "type"),
    ({"type": "string", "not": {}}, "not"),
    ({"enum": "abc"}, "enum"),
    ({"type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]}, "properties.a.enum"),
    ({"type": "array", "items": {"anyOf": []}}, "items.anyOf"),
    ({"$defs": {"x": {"type": []}}, "$ref": "#/$defs/x"}, "$defs.x.type"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
    ({"type": "integer", "minimum": 10, "maximum": 1}, "minimum"),
]  # fmt: skip


def _function(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": schema}}


# (endpoint, body for a schema, the field the error names, whether the body is OpenAI-shaped)
ENDPOINTS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str, bool]] = [
    (
        "/v1/chat/completions",
        lambda s: {"model": MODEL, "messages": ASK, "max_tokens": 3,
                   "response_format": {"type": "json_schema",
                                       "json_schema": {"name": "v", "schema": s}}},
        "response_format.json_schema.schema",
        True,
    ),
    (
        "/v1/chat/completions",
        lambda s: {"model": MODEL, "messages": ASK, "max_tokens": 3, "tools": [_function(s)],
                   "tool_choice": "required"},
        "tools[0].function.parameters",
        True,
    ),
    (
        "/v1/responses",
        lambda s: {"model": MODEL, "input": "x", "max_output_tokens": 3,
                   "text": {"format": {"type": "json_schema", "name": "v", "schema": s}}},
        "text.format",
        True,
    ),
    (
        "/v1/responses",
        lambda s: {"model": MODEL, "input": "x", "max_output_tokens": 3,
                   "tools": [{"type": "function", "name": "f", "parameters": s}],
                   "tool_choice": "required"},
        "tools[0].parameters",
        True,
    ),
    (
        "/api/chat",
        lambda s: {"model": MODEL, "messages": ASK, "stream": False, "format": s,
                   "options": {"num_predict": 3}},
        "format",
        False,
    ),
    (
        "/api/generate",
        lambda s: {"model": MODEL, "prompt": "x", "stream": False, "format": s,
                   "options": {"num_predict": 3}},
        "format",
        False,
    ),
    (
        "/api/chat",
        lambda s: {"model": MODEL, "messages": ASK, "stream": False, "tools": [_function(s)]},
        "tools[0].function.parameters",
        False,
    ),
]  # fmt: skip


def _runner_pid(server: Server) -> int:
    """The model's runner, loaded first if an earlier test unloaded it (an empty prompt loads)."""
    httpx.post(f"{server.url}/api/generate", json={"model": MODEL}, timeout=60)
    models = httpx.get(f"{server.url}/v0/health").json()["models"]
    return int(next(m["runner_pid"] for m in models if m["name"] == MODEL))


@pytest.mark.parametrize(
    ("schema", "keyword"), BAD_SCHEMAS, ids=[json.dumps(s) for s, _ in BAD_SCHEMAS]
)
@pytest.mark.parametrize(
    ("path", "body", "param", "openai_shape"), ENDPOINTS, ids=[f"{e[0]} {e[2]}" for e in ENDPOINTS]
)
def test_unsatisfiable_schemas_are_a_400_at_once(
    server: Server,
    path: str,
    body: Callable[[dict[str, Any]], dict[str, Any]],
    param: str,
    openai_shape: bool,
    schema: dict[str, Any],
    keyword: str,
) -> None:
    """Empty `enum`/`anyOf`/`type` lists became grammar rules llama.cpp refused only when the
    request's turn came: a 500 ("the grammar does not parse") seconds later."""
    runner = _runner_pid(server)
    t0 = time.monotonic()
    r = httpx.post(server.url + path, json=body(schema), timeout=30)
    elapsed = time.monotonic() - t0
    assert r.status_code == 400, r.text
    assert elapsed < 1.0
    if openai_shape:
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, err
        message = err["message"]
    else:
        assert list(r.json()) == ["error"]
        message = r.json()["error"]
    assert message.startswith(f"{param}: ") and keyword in message, message
    assert _runner_pid(server) == runner  # the model never saw it


def test_a_grammar_llama_cpp_rejects_is_a_400(server: Server) -> None:
    """Whatever else makes a grammar llama.cpp cannot parse (here an empty rule reached through
    a `$ref` into a place no schema keyword names) is refused before the request is queued."""
    runner = _runner_pid(server)
    schema = {"$ref": "#/elsewhere/a", "elsewhere": {"a": {"enum": []}}}
    for path, body, param, openai_shape in (ENDPOINTS[0], ENDPOINTS[4], ENDPOINTS[5]):
        t0 = time.monotonic()
        r = httpx.post(server.url + path, json=body(schema), timeout=30)
        assert r.status_code == 400, (path, r.text)
        assert time.monotonic() - t0 < 1.0
        error = r.json()["error"]
        message = error["message"] if openai_shape else error
        assert "grammar" in message and message.startswith(param.split(".")[0]), message
        if openai_shape:
            assert error["param"] == param.split(".")[0]
    assert _runner_pid(server) == runner


def test_valid_schemas_still_constrain_output(server: Server) -> None:
    schema = {"type": "object", "properties": {"v": {"enum": ["yes", "no"]}}, "required": ["v"]}
    for path, body, _, openai_shape in (ENDPOINTS[0], ENDPOINTS[4]):
        request = {**body(schema), "max_tokens": 20, "options": {"num_predict": 20}}
        r = httpx.post(server.url + path, json=request, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        text = (
            out["choices"][0]["message"]["content"] if openai_shape else out["message"]["content"]
        )
        assert json.loads(text)["v"] in ("yes", "no")


# Every option Ollama knows or knew, with a value of each wrong kind; `negative` is a value
# below the option's range (None: every integer of the type is fine).
INT, FLOAT, BOOL = "int", "float", "bool"
OPTIONS: dict[str, tuple[str, float | None]] = {
    "num_ctx": (INT, 0), "num_predict": (INT, -3), "num_keep": (INT, -2), "top_k": (INT, -1),
    "seed": (INT, -2), "repeat_last_n": (INT, -2), "mirostat": (INT, -1), "num_batch": (INT, 0),
    "num_gpu": (INT, None), "main_gpu": (INT, -1), "num_thread": (INT, -1), "num_gqa": (INT, 0),
    "draft_num_predict": (INT, -1),
    "temperature": (FLOAT, -0.1), "top_p": (FLOAT, -0.1), "min_p": (FLOAT, -0.1),
    "typical_p": (FLOAT, -0.1), "repeat_penalty": (FLOAT, 0), "presence_penalty": (FLOAT, -3),
    "frequency_penalty": (FLOAT, -3), "mirostat_tau": (FLOAT, -1), "mirostat_eta": (FLOAT, -1),
    "tfs_z": (FLOAT, -1), "rope_frequency_base": (FLOAT, 0), "rope_frequency_scale": (FLOAT, 0),
    "penalize_newline": (BOOL, None), "low_vram": (BOOL, None), "f16_kv": (BOOL, None),
    "logits_all": (BOOL, None), "vocab_only": (BOOL, None), "use_mmap": (BOOL, None),
    "use_mlock": (BOOL, None), "numa": (BOOL, None), "embedding_only": (BOOL, None),
    "draft_adaptive": (BOOL, None),
    "stop": ("list", None),
}  # fmt: skip


def _bad_values(kind: str, negative: float | None) -> list[Any]:
    values: list[Any] = [math.nan, "str", 2**64, {"x": 1}]
    if kind != BOOL:
        values.append(True)
    if kind == INT:
        values.append(1.5)
    if kind in (BOOL, "list"):
        values.append(1)
    if negative is not None:
        values.append(negative)
    return values


BAD_OPTIONS = [
    (name, value) for name, (kind, negative) in OPTIONS.items()
    for value in _bad_values(kind, negative)
]  # fmt: skip


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS)
def test_every_option_is_type_and_range_checked(server: Server, name: str, value: Any) -> None:
    # json.dumps writes NaN as the bare literal, as Python clients (httpx, ollama) send it
    body = json.dumps({"model": MODEL, "prompt": "x", "stream": False, "options": {name: value}})
    r = httpx.post(f"{server.url}/api/generate", content=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(f"options.{name}: "), r.text


def test_unknown_options_are_logged_and_ignored(server: Server) -> None:
    """As Ollama: `invalid option provided` in the server log, and the request goes through."""
    options = {"num_predict": 2, "frobnicate": "yes", "temperature_typo": math.nan}
    body = json.dumps({"model": MODEL, "prompt": "x", "stream": False, "options": options})
    r = httpx.post(f"{server.url}/api/generate", content=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["eval_count"] <= 2  # the known option was applied
    deadline = time.monotonic() + 5
    while "'frobnicate'" not in server.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    warning = next(line for line in server.logs().splitlines() if "'frobnicate'" in line)
    assert "invalid option provided" in warning and "'temperature_typo'" in warning


TEMPLATE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}[assistant]"
GO_TEMPLATE = "{{ range .Messages }}[{{ .Role }}]{{ .Content }}\n{{ end }}[assistant]"
RENDERED = "[user]Hello there\n[assistant]"
HELLO = [{"role": "user", "content": "Hello there"}]


def _raw_prompt_tokens(server: Server, text: str) -> int:
    body = {"model": MODEL, "prompt": text, "raw": True, "stream": False,
            "options": {"num_predict": 1, "temperature": 0}}  # fmt: skip
    r = httpx.post(f"{server.url}/api/generate", json=body, timeout=60)
    return int(r.json()["prompt_eval_count"])


def test_openai_chat_template_replaces_the_models(server: Server) -> None:
    """vLLM's `chat_template` (sent by the openai client in extra_body) was ignored with a 200."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    expected = _raw_prompt_tokens(server, RENDERED)
    for template in (TEMPLATE, GO_TEMPLATE):
        r = client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=1, temperature=0,
            extra_body={"chat_template": template},
        )  # fmt: skip
        assert r.usage is not None and r.usage.prompt_tokens == expected, template
    own = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1, temperature=0)
    assert own.usage is not None and own.usage.prompt_tokens != expected
    with pytest.raises(openai.BadRequestError, match="define"):
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=1,
            extra_body={"chat_template": '{{ define "t" }}{{ end }}'},
        )  # fmt: skip


def test_ollama_chat_template_replaces_the_models(server: Server) -> None:
    """/api/chat took `template` as /api/generate does, then ignored it with a 200."""
    expected = _raw_prompt_tokens(server, RENDERED)
    base = {"model": MODEL, "messages": HELLO, "stream": False,
            "options": {"num_predict": 1, "temperature": 0}}  # fmt: skip
    for template in (TEMPLATE, GO_TEMPLATE):
        r = httpx.post(f"{server.url}/api/chat", json={**base, "template": template}, timeout=60)
        assert r.status_code == 200 and r.json()["prompt_eval_count"] == expected, r.text
    own = httpx.post(f"{server.url}/api/chat", json=base, timeout=60).json()
    assert own["prompt_eval_count"] != expected
    bad = {**base, "template": '{{ define "t" }}{{ end }}'}
    r = httpx.post(f"{server.url}/api/chat", json=bad, timeout=60)
    assert r.status_code == 400 and "define" in r.json()["error"], r.text
