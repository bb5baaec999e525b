"""Bad requests get OpenAI's error shape with the right status, and the server stays up."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Server

CHAT = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "smollm2:135m", "prompt": "hi", "max_tokens": 2}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


CASES = [
    # (path, body, status, code or type, param)
    ("/v1/chat/completions", _with(CHAT, model="nope"), 404, "model_not_found", "model"),
    ("/v1/completions", _with(COMPLETION, model="nope:7b"), 404, "model_not_found", "model"),
    ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model_not_found", "model"),
    ("/v1/chat/completions", _with(CHAT, model="../../etc/passwd"), 400, None, "model"),
    ("/v1/chat/completions", _with(CHAT, temperature=-0.5), 400, None, "temperature"),
    ("/v1/chat/completions", _with(CHAT, temperature="hot"), 400, None, "temperature"),
    ("/v1/chat/completions", _with(CHAT, top_p=1.5), 400, None, "top_p"),
    ("/v1/chat/completions", _with(CHAT, top_p=-0.1), 400, None, "top_p"),
    ("/v1/chat/completions", _with(CHAT, max_tokens=0), 400, None, "max_tokens"),
    ("/v1/chat/completions", _with(CHAT, max_tokens=-1), 400, None, "max_tokens"),
    ("/v1/chat/completions", _with(CHAT, max_tokens="10"), 400, None, "max_tokens"),
    ("/v1/chat/completions", _with(CHAT, top_k=-1), 400, None, "top_k"),
    ("/v1/chat/completions", _with(CHAT, n=0), 400, None, "n"),
    ("/v1/chat/completions", _with(CHAT, n=2**31), 400, None, "n"),
    ("/v1/chat/completions", _with(CHAT, seed=-1), 400, None, "seed"),
    ("/v1/chat/completions", _with(CHAT, stream="yes"), 400, None, "stream"),
    ("/v1/chat/completions", _with(CHAT, messages=[]), 400, None, "messages"),
    ("/v1/chat/completions", _with(CHAT, messages="hi"), 400, None, "messages"),
    (
        "/v1/chat/completions",
        _with(CHAT, messages=[{"role": "wizard", "content": "x"}]),
        400,
        None,
        "messages[0].role",
    ),
    ("/v1/chat/completions", _with(CHAT, messages=[{"role": "user"}]), 400, None, "messages[0]"),
    ("/v1/chat/completions", _with(CHAT, stop=["x"] * 10_000), 400, None, "stop"),
    ("/v1/chat/completions", _with(CHAT, logit_bias={"-1": 5}), 400, None, "logit_bias"),
    ("/v1/chat/completions", _with(CHAT, logit_bias={"99999999": 5}), 400, None, "logit_bias"),
    (
        "/v1/chat/completions",
        _with(CHAT, top_logprobs=30, logprobs=True),
        400,
        None,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        _with(
            CHAT,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                    ],
                }
            ],
        ),
        400,
        None,
        "messages",
    ),
    ("/v1/chat/completions", {"messages": CHAT["messages"]}, 400, None, "model"),
    # numeric boundaries (RELIABILITY item 18): every knob's out-of-range values
    ("/v1/chat/completions", _with(CHAT, max_tokens=2**63 - 1), 400, None, "max_tokens"),
    ("/v1/chat/completions", _with(CHAT, n=-1), 400, None, "n"),
    ("/v1/chat/completions", _with(CHAT, seed=2**63), 400, None, "seed"),
    ("/v1/chat/completions", _with(CHAT, top_k=2**31), 400, None, "top_k"),
    ("/v1/chat/completions", _with(CHAT, min_p=1.5), 400, None, "min_p"),
    ("/v1/chat/completions", _with(CHAT, presence_penalty=3), 400, None, "presence_penalty"),
    ("/v1/chat/completions", _with(CHAT, frequency_penalty=-3), 400, None, "frequency_penalty"),
    ("/v1/chat/completions", _with(CHAT, repeat_penalty=0), 400, None, "repeat_penalty"),
    ("/v1/chat/completions", _with(CHAT, repeat_last_n=-1), 400, None, "repeat_last_n"),
    (
        "/v1/chat/completions",
        _with(CHAT, top_logprobs=-1, logprobs=True),
        400,
        None,
        "top_logprobs",
    ),
    ("/v1/chat/completions", _with(CHAT, logit_bias={"1": 1000}), 400, None, "logit_bias"),
    ("/v1/completions", _with(COMPLETION, logprobs=21), 400, None, "logprobs"),
    ("/v1/completions", _with(COMPLETION, max_tokens=0), 400, None, "max_tokens"),
    ("/v1/completions", _with(COMPLETION, prompt=""), 400, None, "prompt"),
    ("/v1/completions", _with(COMPLETION, prompt=[]), 400, None, "prompt"),
    ("/v1/completions", _with(COMPLETION, prompt=[10**9]), 400, None, "prompt"),
    ("/v1/completions", _with(COMPLETION, prompt="x " * 3000), 400, None, "prompt"),
    (
        "/v1/chat/completions",
        _with(
            CHAT,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 20000}},
            },
        ),
        400,
        None,
        "response_format",
    ),
    ("/v1/embeddings", {"model": "smollm2:135m", "input": ""}, 400, None, "input"),
    ("/v1/embeddings", {"model": "smollm2:135m", "input": []}, 400, None, "input"),
    ("/v1/embeddings", {"model": "smollm2:135m", "input": [20468, 60697]}, 400, None, "input"),
    ("/v1/embeddings", {"model": "smollm2:135m", "input": [-1]}, 400, None, "input"),
]


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), CASES)
def test_bad_request(
    server: Server, path: str, body: dict[str, Any], status: int, code: str | None, param: str
) -> None:
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    if code:
        assert err["code"] == code
    assert err["param"] is not None and err["param"].startswith(param), err
    assert param.split("[")[0].split(".")[0] in err["message"] or status == 404


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[]",
        b"null",
        b'{"model": "smollm2:135m", "messages": [], ',
        b"\xff\xfe",
        b'{"temperature": NaN}',
        b'{"model": "smollm2:135m", "messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
        b'{"model": "smollm2:135m", "messages": [{"role": "user", "content": "x"}], "top_p": -Infinity}',
        b'{"model": "smollm2:135m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}',
    ],
)
def test_malformed_bodies(server: Server, raw: bytes) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=raw,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_endpoint_and_method(server: Server) -> None:
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405
    assert "POST" in r.headers["Allow"]


def test_runner_error_keeps_its_status(server: Server) -> None:
    """A template is rendered in the model's runner: its error is still the client's 400."""
    template = "{% if true %}{{ raise_exception('no system role') }}{% endif %}"
    body = {"model": "smollm2:135m", "prompt": "hi", "template": template, "stream": False}
    r = httpx.post(f"{server.url}/api/generate", json=body, timeout=30)
    assert r.status_code == 400 and r.json() == {"error": "chat template error: no system role"}


def test_server_alive_after_all(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200
    assert server.proc.poll() is None


def test_request_id_echoed(server: Server) -> None:
    r = httpx.get(f"{server.url}/v1/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["X-Request-ID"] == "abc-123"
    r = httpx.get(f"{server.url}/v1/models", headers={"X-Request-ID": "bad\tid"})
    assert r.headers["X-Request-ID"] != "bad\tid" and len(r.headers["X-Request-ID"]) == 16
