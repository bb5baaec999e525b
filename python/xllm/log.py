"""Logging setup: stderr always, optionally a file rotated daily and by size.

Every line logged while a request is handled carries its X-Request-ID (a context variable the
request middleware sets), and control characters in messages are escaped so text from a client
(CR/LF in a path or a model name) cannot forge log lines.
"""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)} | {ord("\n"): "\\n", ord("\r"): "\\r"}


class _Formatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_ESCAPES)
        record.request_id = request_id.get()
        return super().formatMessage(record)


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (the client's fault, answered with a 400) as an
    error with a traceback; one warning line says it, and clients cannot flood the log with
    tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = " ".join(str(exc.message).split())
            record.args = (record.getMessage(), reason)
            record.msg = "%s: malformed HTTP request: %s"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


class RotatingFileHandler(logging.handlers.TimedRotatingFileHandler):
    """Rotated at midnight, and also as soon as the file grows past `max_bytes`; keeps
    `backupCount` old files (the stdlib has one handler per trigger, not both)."""

    def __init__(self, path: Path, max_bytes: int, backup_count: int) -> None:
        super().__init__(path, when="midnight", backupCount=backup_count, encoding="utf-8")
        self.max_bytes = max_bytes

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        if self.stream is not None and self.max_bytes > 0:
            size = self.stream.tell() + len(self.format(record)) + 1
            if size > self.max_bytes:
                return True
        return bool(super().shouldRollover(record))

    def rotation_filename(self, default_name: str) -> str:
        # two rotations within one second (size-triggered) must not overwrite each other
        name, n = default_name, 1
        while Path(name).exists():
            name, n = f"{default_name}.{n:03d}", n + 1
        return name


def setup_logging(
    level: str = "info",
    log_file: str | None = None,
    keep_files: int = 10,
    max_bytes: int = 100 * 10**6,
) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        path = Path(log_file).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(RotatingFileHandler(path, max_bytes, keep_files))
    for h in handlers:
        h.setFormatter(_Formatter(FORMAT))
        root.addHandler(h)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequests) for f in server_log.filters):
        server_log.addFilter(_MalformedRequests())
