"""Ollama's progress display for pull, push and create, on stderr.

    pulling manifest
    pulling dde5aa3fc5ff:  45% ▕███████         ▏ 912 MB/2.0 GB   45 MB/s     24s
    verifying sha256 digest

On a terminal each layer's bar is redrawn in place; elsewhere (a log, a pipe) a bar line is
written at most once a second and when the layer completes.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from xllm.cli.humanize import human_bytes

_REDRAW_S = 0.1
_LOG_S = 1.0


def eta(seconds: float) -> str:
    """A remaining time as Go prints a duration rounded to seconds: `24s`, `1m30s`, `2h0m5s`."""
    s = max(int(seconds), 0)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def bar_line(
    status: str,
    completed: int,
    total: int,
    rate: float,
    width: int,
    done: bool = False,
    amount: Callable[[int], str] = human_bytes,
) -> str:
    """One bar the way Ollama lays it out: message, percent, bar, amounts, rate, time left.

    `amount` writes a quantity: bytes by default, plain counts (`str`) for requests."""
    percent = 100.0 * completed / total if total > 0 else 100.0
    pre = f"{status} {percent:3.0f}%"
    if done:
        suffix = f"{amount(total):>6}" + " " * 7 + " " * 10 + " " * 8
    else:
        suffix = f"{amount(completed):>6}/{amount(total):<6}"
        if rate >= 1:  # below one unit a second the rate would print as 0
            suffix += f"  {amount(int(rate)):>6}/s  {eta((total - completed) / rate):>6}"
        else:
            suffix += " " * 18
    room = max(width - len(pre) - len(suffix) - 5, 10)
    filled = int(room * percent / 100)
    return f"{pre} ▕{'█' * filled}{' ' * (room - filled)}▏ {suffix}".rstrip()


class Progress:
    """Feeds on Ollama's progress records and draws them."""

    def __init__(
        self, out: TextIO | None = None, amount: Callable[[int], str] = human_bytes
    ) -> None:
        self.out = out or sys.stderr
        self.amount = amount
        self.tty = self.out.isatty()
        self.width = shutil.get_terminal_size((80, 24)).columns if self.tty else 80
        self._digest: str | None = None
        self._status = ""
        self._started = 0.0
        self._drawn = 0.0
        self._last: tuple[int, int] = (0, 0)
        self._printed: set[str] = set()

    def update(self, record: dict[str, Any]) -> None:
        status = str(record.get("status", ""))
        digest, total = record.get("digest"), record.get("total")
        if digest and isinstance(total, int):
            completed = int(record.get("completed") or 0)
            if digest != self._digest:
                self._end_bar()
                self._digest, self._status, self._started = digest, status, time.monotonic()
                self._drawn = 0.0
            self._last = (completed, total)
            self._draw(force=completed >= total)
            return
        self._end_bar()
        if status and status not in self._printed:  # the client and the server may both say it
            self._printed.add(status)
            self._write(status + "\n")
        self._status = status

    def finish(self) -> None:
        self._end_bar()

    def _rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return self._last[0] / elapsed if elapsed > 0.5 else 0.0

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < (_REDRAW_S if self.tty else _LOG_S):
            return
        self._drawn = now
        completed, total = self._last
        done = completed >= total
        line = bar_line(
            self._status + ":", completed, total, self._rate(), self.width, done, self.amount
        )
        if self.tty:
            self._write("\r\x1b[K" + line)
        elif not done:
            self._write(line + "\n")

    def _end_bar(self) -> None:
        if self._digest is None:
            return
        completed, total = self._last
        done = completed >= total
        line = bar_line(self._status + ":", completed, total, 0.0, self.width, done, self.amount)
        self._write(("\r\x1b[K" if self.tty else "") + line + "\n")
        self._digest = None

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
