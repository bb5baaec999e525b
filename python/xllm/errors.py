"""xllm's error types and their one mapping to HTTP status and error bodies.

Code raises these anywhere; the HTTP layer turns them into OpenAI's
`{"error": {"message", "type", "param", "code"}}` or Ollama's `{"error": "..."}`.
"""

from __future__ import annotations

from typing import Any


class XllmError(Exception):
    """Base class: a message for the user, an HTTP status and OpenAI's error type/code."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}


class InvalidRequest(XllmError):
    """The client sent something wrong (400)."""

    status = 400
    type = "invalid_request_error"


class ModelNotFound(XllmError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(XllmError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Unauthorized(XllmError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(XllmError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class PayloadTooLarge(XllmError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedEncoding(XllmError):
    """A compressed request body (415): bodies are taken as sent, never inflated."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"


class Overloaded(XllmError):
    """The queue is full or the server is shutting down (503 with Retry-After)."""

    status = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, param: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class InsufficientMemory(XllmError):
    status = 507
    type = "server_error"
    code = "insufficient_memory"


class InsufficientStorage(XllmError):
    """The disk is full (ENOSPC) while storing a model."""

    status = 507
    type = "server_error"
    code = "insufficient_storage"


class RegistryError(XllmError):
    """A registry or the Hub failed us: unreachable, bad answer, or bytes that do not verify."""

    status = 502
    type = "server_error"
    code = "registry_error"


class ModelLoadError(XllmError):
    """llama.cpp could not load a model: the message carries its reason and the file;
    `detail` holds llama.cpp's own log lines, for the server's log and never for a client."""

    status = 500
    type = "server_error"
    code = "model_load_failed"

    def __init__(self, message: str, *, param: str | None = None, detail: str = "") -> None:
        super().__init__(message, param=param)
        self.detail = detail


class CorruptModel(XllmError):
    """A stored model's file on disk is damaged (a blob that no longer matches its digest, a
    manifest that cannot be read): the server's condition, whatever the request."""

    status = 500
    type = "server_error"
    code = "model_corrupt"


class EngineError(XllmError):
    """Generation failed inside the engine."""

    status = 500
    type = "server_error"
    code = "engine_error"


class UpstreamError(XllmError):
    """A remote engine's upstream answered with an error: its message, under the status that
    says whose fault it is (the client's 4xx as they were; the upstream's own failures, and
    credentials it refused, are the server's 502)."""

    status = 502
    type = "server_error"
    code = "upstream_error"

    def __init__(self, message: str, *, status: int = 502, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status = status
        if 400 <= status < 500:
            self.type = "invalid_request_error"
        if status == 404:
            self.code = "model_not_found"


class UpstreamTimeout(XllmError):
    """A remote engine's upstream did not answer (or went quiet mid-stream) within its timeout."""

    status = 504
    type = "server_error"
    code = "upstream_timeout"


BY_NAME: dict[str, type[XllmError]] = {
    cls.__name__: cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, XllmError)
}
"""The classes above by name: those an error may take when it crosses a process boundary
(the runner's replies); a subclass defined elsewhere crosses as the nearest of them."""
