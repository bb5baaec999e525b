"""HTTP hygiene without a model: OpenAPI document, gzip, body limits, metrics format."""

from __future__ import annotations

import gzip
import os
import socket
import struct
import time
import zlib
from collections.abc import Iterator

import httpx
import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, proc_status_bytes, start_server, stop_server


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


def _memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (its peak since `_reset_peak`) of a process, in MiB."""
    return {k: proc_status_bytes(pid, k) / (1 << 20) for k in ("VmRSS", "VmHWM")}


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)


def _growth(pid: int, before: dict[str, float]) -> dict[str, float]:
    after = _memory_mib(pid)
    return {"rss": after["VmRSS"] - before["VmRSS"], "peak": after["VmHWM"] - before["VmRSS"]}


OVER_LIMIT = 50 * 1024 * 1024 + 1


def _chunks(size: int) -> Iterator[bytes]:
    block = b"x" * (1024 * 1024)
    sent = 0
    while sent < size:
        piece = block[: size - sent]
        sent += len(piece)
        yield piece


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_50mb_is_413(bare: Server, chunked: bool) -> None:
    """RELIABILITY 20a: a refused body leaves the server's memory where it was (< 10 MiB), and
    while it is read the server holds at most one copy of the limit, never aiohttp's buffer
    plus a joined copy."""
    headers = {"Content-Type": "application/json"}
    if chunked:
        content: bytes | Iterator[bytes] = _chunks(OVER_LIMIT)
    else:
        content = os.urandom(16) * (OVER_LIMIT // 16) + b"x"
        assert len(content) == OVER_LIMIT
    _reset_peak(bare.proc.pid)
    before = _memory_mib(bare.proc.pid)
    try:
        r = httpx.post(
            f"{bare.url}/v1/chat/completions", content=content, headers=headers, timeout=30
        )
    except httpx.RemoteProtocolError:
        pytest.fail("connection reset instead of a 413")
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    growth = _growth(bare.proc.pid, before)
    assert growth["rss"] < 10, growth
    # refused by Content-Length before reading; a chunked body is read only up to the limit
    assert growth["peak"] < (10 if not chunked else 50 + 5), growth
    assert httpx.get(f"{bare.url}/v0/health").status_code == 200


def _status_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n" not in data:
        piece = sock.recv(4096)
        if not piece:
            break
        data += piece
    return data.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_50mb_is_413_within_a_second(bare: Server, chunked: bool) -> None:
    """The 413 comes at once: before the body for Content-Length, at the limit when chunked."""
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % OVER_LIMIT
    with socket.create_connection(("127.0.0.1", bare.port), timeout=5) as sock:
        sock.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n" + framing + b"\r\n\r\n"
        )
        if chunked:
            for piece in _chunks(OVER_LIMIT):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        start = time.monotonic()
        assert _status_line(sock) == b"HTTP/1.1 413 Request Entity Too Large"
        assert time.monotonic() - start < 1


def _gzip_bomb(inflated: int) -> bytes:
    """gzip of `inflated` zero bytes, about 1/1000 of that: one full-flush deflate block of
    1 MiB of zeros repeated (flushes end on a byte, so the blocks join), and gzip's trailer."""
    block = 1 << 20
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflate.compress(bytes(block)) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(inflated // block):
        crc = zlib.crc32(bytes(block), crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = struct.pack("<II", crc, inflated & 0xFFFFFFFF)
    return header + piece * (inflated // block) + deflate.flush() + trailer


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    bomb = _gzip_bomb(1 << 30)
    assert len(bomb) < 1_100_000
    return bomb


@pytest.mark.parametrize(
    ("path", "encoding"),
    [
        ("/v1/chat/completions", "gzip"),
        ("/api/chat", "gzip"),
        ("/api/generate", "GZip"),
        ("/v1/embeddings", "deflate"),
        ("/v1/completions", "br"),
        ("/api/embed", "gzip, identity"),
    ],
)
def test_compressed_body_is_415_unread(
    bare: Server, gzip_bomb: bytes, path: str, encoding: str
) -> None:
    """1 MiB of gzip that inflates to 1 GiB is refused before anything is inflated."""
    _reset_peak(bare.proc.pid)
    before = _memory_mib(bare.proc.pid)
    start = time.monotonic()
    r = httpx.post(
        f"{bare.url}{path}",
        content=gzip_bomb,
        headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        timeout=30,
    )
    elapsed = time.monotonic() - start
    assert r.status_code == 415, r.text
    assert r.headers["Accept-Encoding"] == "identity"
    error = r.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(error, str) and "Content-Encoding" in error
    else:
        assert error["code"] == "unsupported_content_encoding"
        assert "Content-Encoding" in error["message"]
    assert elapsed < 1
    growth = _growth(bare.proc.pid, before)
    assert growth["rss"] < 10 and growth["peak"] < 10, growth


def test_identity_encoding_is_read_as_usual(bare: Server) -> None:
    r = httpx.post(
        f"{bare.url}/v1/chat/completions",
        content=b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}',
        headers={"Content-Type": "application/json", "Content-Encoding": "identity"},
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


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
