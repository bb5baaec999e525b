"""How CLI commands reach a running server: `XLLM_HOST` (default 127.0.0.1:32769), Ollama's API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from xllm.config import load_settings


class NoServer(RuntimeError):
    """Nothing answers at the configured address."""


def base_url() -> str:
    return load_settings().base_url


def call(method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    """JSON request to the server; NoServer when none is up, RuntimeError with its message."""
    url = base_url() + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            message = e.reason
        if isinstance(message, dict):
            message = message.get("message", str(message))
        raise RuntimeError(str(message)) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        raise NoServer(
            f"no xllm server is running at {base_url()}; start one with `xllm serve`"
        ) from None
