"""Logging setup: stderr always, optionally a file rotated daily.

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


def setup_logging(level: str = "info", log_file: str | None = None, keep_files: int = 10) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        path = Path(log_file).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.TimedRotatingFileHandler(path, when="midnight", backupCount=keep_files)
        )
    for h in handlers:
        h.setFormatter(_Formatter(FORMAT))
        root.addHandler(h)
