"""HTTP hygiene without a model: OpenAPI document, gzip, body limit, metrics format."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator

import httpx
import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, start_server, stop_server


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("http"), [], wait_model=False)
    yield s
    stop_server(s)


def test_openapi_document_is_valid(bare: Server) -> None:
    doc = httpx.get(f"{bare.url}/openapi.json").json()
    validate(doc)
    assert "/v1/chat/completions" in doc["paths"]
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")


def test_gzip_only_when_accepted_and_large(bare: Server) -> None:
    with httpx.Client(headers={"Accept-Encoding": "gzip"}) as c:
        r = c.get(f"{bare.url}/openapi.json")
        assert r.headers["Content-Encoding"] == "gzip"
        assert int(r.headers["Content-Length"]) < len(r.content) / 3
        small = c.get(f"{bare.url}/v1/models")
        assert "Content-Encoding" not in small.headers
    raw = httpx.get(f"{bare.url}/openapi.json", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in raw.headers
    # what went over the wire really is gzip
    with httpx.stream("GET", f"{bare.url}/openapi.json", headers={"Accept-Encoding": "gzip"}) as r:
        wire = b"".join(r.iter_raw())
    assert gzip.decompress(wire) == raw.content


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_50mb_is_413(bare: Server, chunked: bool) -> None:
    size = 50 * 1024 * 1024 + 1
    before = _rss_kib(bare.proc.pid)

    def chunks() -> Iterator[bytes]:
        block = b"x" * (1024 * 1024)
        sent = 0
        while sent < size:
            piece = block[: size - sent]
            sent += len(piece)
            yield piece

    headers = {"Content-Type": "application/json"}
    if chunked:
        content: bytes | Iterator[bytes] = chunks()
    else:
        content = os.urandom(16) * (size // 16) + b"x"
        assert len(content) == size
    try:
        r = httpx.post(
            f"{bare.url}/v1/chat/completions", content=content, headers=headers, timeout=30
        )
    except httpx.RemoteProtocolError:
        pytest.fail("connection reset instead of a 413")
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    # refused by Content-Length before reading; a chunked body is read only up to the limit
    assert _rss_kib(bare.proc.pid) - before < (10 if not chunked else 80) * 1024
    assert httpx.get(f"{bare.url}/v0/health").status_code == 200


def test_metrics_parse(bare: Server) -> None:
    httpx.get(f"{bare.url}/v1/models")
    text = httpx.get(f"{bare.url}/v0/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"xllm_requests", "xllm_loaded_models", "xllm_process_ram_bytes"} <= names
    assert 'xllm_requests_total{endpoint="/v1/models",model="",status="200"}' in text


def test_logs_carry_request_id_and_cannot_be_forged(bare: Server) -> None:
    httpx.get(f"{bare.url}/v1/models", headers={"X-Request-ID": "trace-42"})
    httpx.get(f"{bare.url}/v1/models/x%0d%0aINFO%20forged%20line")
    logs = bare.logs()
    assert any("[trace-42]" in line and "/v1/models" in line for line in logs.splitlines())
    assert not any(line.startswith("INFO forged") for line in logs.splitlines())
    assert "\\r\\nINFO forged line" in logs
