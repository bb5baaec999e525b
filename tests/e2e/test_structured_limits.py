"""Structured-output inputs (RELIABILITY 19): a thousand distinct schemas leave memory bounded
while another tenant streams without an error; hostile schemas are a 400, fast."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import proc_status_bytes, start_server, stop_server

MODEL = "tiny"


def _rss_mib(pid: int) -> float:
    return proc_status_bytes(pid, "VmRSS") / (1 << 20)


def _schema(i: int) -> dict[str, object]:
    return {
        "type": "object",
        "properties": {f"field_{i}": {"type": "integer", "minimum": i, "maximum": i + 10}},
        "required": [f"field_{i}"],
        "additionalProperties": False,
    }


def _ask(client: httpx.Client, url: str, schema: dict[str, object]) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Give the value."}],
        "max_tokens": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": schema}},
    }
    return client.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_a_thousand_unique_schemas(tmp_path: Path, tiny_path: Path) -> None:
    args = ["--model", str(tiny_path), "--ctx-size", "256", "--parallel", "4"]
    s = start_server(tmp_path, args)
    try:
        runner = httpx.get(f"{s.url}/v0/health").json()["models"][0]["runner_pid"]
        with httpx.Client() as client:
            for i in range(20):  # warm up allocators before the baseline
                assert _ask(client, s.url, _schema(-1 - i)).status_code == 200
            before = _rss_mib(s.proc.pid) + _rss_mib(runner)
            errors: list[str] = []
            finishes: list[str] = []

            def tenant() -> None:
                body = {"model": MODEL, "prompt": "Hi", "max_tokens": 200, "ignore_eos": True}
                with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True},
                                  timeout=120) as r:  # fmt: skip
                    for line in r.iter_lines():
                        if line.startswith("event: error"):
                            errors.append(line)
                        elif line.startswith("data: {"):
                            event = json.loads(line[6:])
                            if "error" in event:
                                errors.append(line)
                            elif event["choices"][0]["finish_reason"]:
                                finishes.append(event["choices"][0]["finish_reason"])

            other = threading.Thread(target=tenant)
            other.start()
            t0 = time.monotonic()
            for i in range(1000):
                r = _ask(client, s.url, _schema(i))
                assert r.status_code == 200, r.text
            elapsed = time.monotonic() - t0
            other.join()
            grown = _rss_mib(s.proc.pid) + _rss_mib(runner) - before
        print(f"1000 unique schemas in {elapsed:.1f} s; server+runner RSS grew {grown:.0f} MiB")
        assert errors == [] and finishes == ["length"]  # the other tenant's stream completed
        assert grown < 200
        health = httpx.get(f"{s.url}/v0/health").json()["models"][0]
        assert health["runner_pid"] == runner  # the runner never died
    finally:
        stop_server(s)


def test_hostile_schemas_are_refused_quickly(tmp_path: Path, tiny_path: Path) -> None:
    s = start_server(tmp_path, ["--model", str(tiny_path), "--ctx-size", "256"])
    try:
        depth = 10_000  # written by hand: json.dumps itself cannot nest this deep
        nested = '{"type":"array","items":' * depth + '{"type":"string"}' + "}" * depth
        body = (
            '{"model":"tiny","messages":[{"role":"user","content":"x"}],"max_tokens":3,'
            '"response_format":{"type":"json_schema","json_schema":{"name":"v","schema":'
            + nested
            + "}}}"
        )
        with httpx.Client() as client:
            r = client.post(
                f"{s.url}/v1/chat/completions",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code == 400, r.text[:300]
            # a regex that makes backtracking engines explode is a plain automaton in a grammar
            t0 = time.monotonic()
            r = _ask(client, s.url, {"type": "string", "pattern": "^(a+)+$"})
            assert r.status_code == 200 and time.monotonic() - t0 < 2
            for schema in (
                {"type": "string", "maxLength": 10**9},
                {"type": "object", "properties": {"x": {"$ref": "#/nope"}}},
                {"type": "nonsense"},
            ):
                t0 = time.monotonic()
                r = _ask(client, s.url, schema)
                assert r.status_code == 400, (schema, r.text[:300])
                assert time.monotonic() - t0 < 2
            assert _ask(client, s.url, _schema(1)).status_code == 200  # still serving
    finally:
        stop_server(s)
