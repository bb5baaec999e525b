"""How CLI commands reach a running server: `XLLM_HOST` (default 127.0.0.1:32769), Ollama's API."""

from __future__ import annotations

import contextlib
import http.client
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from xllm.config import load_settings


class NoServer(RuntimeError):
    """Nothing answers at the configured address."""


def base_url() -> str:
    return load_settings().base_url


def call(method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    """JSON request to the server; NoServer when none is up, RuntimeError with its message."""
    data = json.dumps(body).encode() if body is not None else None
    with _open(method, path, data, "application/json", timeout) as r:
        return json.loads(r.read() or b"null")


def stream(method: str, path: str, body: dict[str, Any], timeout: float = 600) -> Iterator[Any]:
    """The records of an NDJSON stream; an `{"error"}` record raises RuntimeError."""
    with _open(method, path, json.dumps(body).encode(), "application/json", timeout) as r:
        try:
            for line in r:
                if line.strip():
                    record = json.loads(line)
                    if isinstance(record, dict) and "error" in record:
                        raise RuntimeError(str(record["error"]))
                    yield record
        except (ConnectionError, http.client.HTTPException, TimeoutError):
            raise RuntimeError("the server closed the connection in the middle of it") from None


def stream_bytes(
    method: str, path: str, body: dict[str, Any], timeout: float = 600
) -> Iterator[bytes]:
    """A body's bytes as they arrive (JSON request)."""
    with _open(method, path, json.dumps(body).encode(), "application/json", timeout) as r:
        try:
            while chunk := r.read1(1 << 16):
                yield chunk
        except (ConnectionError, http.client.HTTPException, TimeoutError):
            raise RuntimeError("the server closed the connection in the middle of it") from None


def status(method: str, path: str) -> int:
    """Just the HTTP status of a request without a body (HEAD)."""
    try:
        with _open(method, path, None, None, 30) as r:
            return int(r.status)
    except HTTPStatus as e:
        return e.status


def upload(path: str, chunks: Iterable[bytes], size: int, timeout: float = 3600) -> None:
    """POST a file's bytes (streamed, not read into memory)."""
    req = urllib.request.Request(base_url() + path, data=chunks, method="POST")
    req.add_header("Content-Type", "application/octet-stream")
    req.add_header("Content-Length", str(size))
    with _send(req, timeout):
        pass


def post_form(
    path: str, fields: dict[str, str], file_name: str, data: bytes, timeout: float = 3600
) -> bytes:
    """POST multipart/form-data (the fields, then `data` as the part `file`); the body."""
    boundary = f"xllm-{uuid.uuid4().hex}"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    safe = file_name.replace('"', "_").replace("\r", "_").replace("\n", "_")
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{safe}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n")  # fmt: skip
    body = b"".join(parts) + head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    with _open("POST", path, body, f"multipart/form-data; boundary={boundary}", timeout) as r:
        result: bytes = r.read()
        return result


class HTTPStatus(RuntimeError):
    """The server answered with an error status; the message is its error text."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _open(
    method: str, path: str, data: bytes | None, content_type: str | None, timeout: float
) -> contextlib.AbstractContextManager[Any]:
    req = urllib.request.Request(base_url() + path, data=data, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    return _send(req, timeout)


@contextlib.contextmanager
def _send(req: urllib.request.Request, timeout: float) -> Iterator[Any]:
    try:
        response = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except (ValueError, AttributeError):
            message = e.reason
        if isinstance(message, dict):
            message = message.get("message", str(message))
        raise HTTPStatus(str(message), e.code) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        raise NoServer(
            f"no xllm server is running at {base_url()}; start one with `xllm serve`"
        ) from None
    with response:
        yield response
