"""SIGTERM against a real server: drain, 503s meanwhile, cut streams, exit (RELIABILITY 25)."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Server, process_table, start_server, stop_server

MODEL = "smollm2:135m"
DRAIN_S = 5.0
LONG = {"model": MODEL, "prompt": "Count:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
# Ollama has no ignore_eos: greedy counting goes on far longer than the drain lasts, once the
# prompt has counted far enough (from "1, …, 8," the model soon turns to code and stops)
LONG_OLLAMA = {
    "model": MODEL,
    "prompt": ", ".join(str(i) for i in range(1, 41)) + ",",
    "raw": True,
    "stream": True,
    "options": {"num_predict": 4000, "temperature": 0},
}


def _session(sid: int) -> set[int]:
    """Live processes of session `sid`: the server (started with start_new_session) and every
    runner it started."""
    return {
        p for p, (state, _, session) in process_table().items() if session == sid and state != "Z"
    }


@dataclass
class Stream:
    """A streamed request read on its own thread, line by line."""

    server: Server
    path: str
    body: dict[str, Any]
    status: int = 0
    lines: list[str] = field(default_factory=list)
    error: str | None = None
    """Set when the connection broke instead of ending."""
    ended: float = 0.0
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        url = f"{self.server.url}{self.path}"
        try:
            with httpx.stream("POST", url, json=self.body, timeout=60) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
        except httpx.HTTPError as e:
            self.error = repr(e)
        self.ended = time.monotonic()

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.path}: the stream did not end"


def _until(done: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _refused_with_503(server: Server, path: str) -> tuple[float, int, str | None, Any]:
    """(seconds, status, Retry-After, body) of a request on a new connection."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("POST", path, body=json.dumps({"model": MODEL, "prompt": "Hi"}))
        r = conn.getresponse()
        body = json.loads(r.read())
    finally:
        conn.close()
    return time.monotonic() - t0, r.status, r.getheader("Retry-After"), body


def test_sigterm_cuts_long_streams_at_the_deadline_and_refuses_new_work(tmp_path: Path) -> None:
    s = start_server(
        tmp_path,
        ["--model", MODEL, "--ctx-size", "4200", "--parallel", "3"],
        env={"XLLM_SHUTDOWN_TIMEOUT": str(DRAIN_S)},
    )
    try:
        kept = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        kept.request("GET", "/api/version")
        first = kept.getresponse()
        first.read()
        assert first.status == 200 and not first.will_close  # a kept-alive connection

        streams = [
            Stream(s, "/v1/completions", LONG).start(),
            Stream(s, "/v1/completions", LONG).start(),
            Stream(s, "/api/generate", LONG_OLLAMA).start(),
        ]
        _until(lambda: all(len(x.lines) >= 3 for x in streams))
        signalled = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the server has seen the signal

        # new connections: 503 with Retry-After in the dialect's error shape, at once
        took, status, retry, body = _refused_with_503(s, "/v1/completions")
        print(f"503 on a new connection in {took * 1000:.1f} ms")
        assert status == 503 and retry
        assert body["error"]["message"] == "the server is shutting down"
        assert took < 1.0
        took, status, retry, body = _refused_with_503(s, "/api/generate")
        assert status == 503 and retry
        assert body == {"error": "the server is shutting down"}
        assert took < 1.0
        # a request on the connection opened before the signal gets the 503 too
        t0 = time.monotonic()
        kept.request(
            "POST",
            "/v1/completions",
            body=json.dumps({"model": MODEL, "prompt": "Hi"}),
            headers={"Content-Type": "application/json"},
        )
        on_kept = kept.getresponse()
        assert on_kept.status == 503 and on_kept.getheader("Retry-After")
        assert json.loads(on_kept.read())["error"]["message"] == "the server is shutting down"
        print(f"503 on a kept-alive connection in {(time.monotonic() - t0) * 1000:.1f} ms")
        kept.close()
        # still listening (and refusing) later in the drain
        time.sleep(DRAIN_S - 1.5)
        assert s.proc.poll() is None
        assert _refused_with_503(s, "/v1/completions")[1] == 503

        for x in streams:
            x.join(timeout=10)
            assert x.status == 200 and x.error is None
            # they ran on through the drain, and no longer
            assert DRAIN_S - 0.5 < x.ended - signalled < DRAIN_S + 2, x.path
        # cut streams end properly, in their own dialect: an error, then the terminator
        for x in streams[:2]:
            assert x.lines[-1] == "data: [DONE]", x.lines[-3:]
            error = json.loads(x.lines[-2].removeprefix("data: "))
            assert error["error"]["message"] == "the server is shutting down"
            assert error["error"]["code"] == "overloaded"
            assert not any('"finish_reason":"' in line for line in x.lines), x.lines[-3:]
        ollama = streams[2].lines
        assert json.loads(ollama[-1]) == {"error": "the server is shutting down"}, ollama[-3:]
        assert not any('"done":true' in line for line in ollama)

        code = s.proc.wait(timeout=DRAIN_S + 5)
        exited = time.monotonic() - signalled
        print(f"exited {exited:.2f} s after SIGTERM with a drain of {DRAIN_S:.0f} s")
        assert code == 0
        assert DRAIN_S - 0.5 < exited < DRAIN_S + 5
        _until(lambda: not _session(s.proc.pid), timeout=1)  # no runner left behind
    finally:
        stop_server(s)


def test_sigterm_lets_short_streams_finish(tmp_path: Path) -> None:
    s = start_server(
        tmp_path,
        ["--model", MODEL, "--ctx-size", "1024", "--parallel", "3"],
        env={"XLLM_SHUTDOWN_TIMEOUT": "60"},
    )
    try:
        short = {**LONG, "max_tokens": 16}
        streams = [Stream(s, "/v1/completions", short).start() for _ in range(3)]
        _until(lambda: all(x.lines for x in streams))
        signalled = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        for x in streams:
            x.join(timeout=60)
            assert x.status == 200 and x.error is None
            assert x.lines[-1] == "data: [DONE]"
            assert '"finish_reason":"length"' in x.lines[-2], x.lines[-3:]
            assert not any('"error"' in line for line in x.lines)
        code = s.proc.wait(timeout=10)
        # the server exits once the streams are done, not when the 60 s are up
        assert code == 0
        assert time.monotonic() - max(x.ended for x in streams) < 5
        assert time.monotonic() - signalled < 60
        _until(lambda: not _session(s.proc.pid), timeout=1)
    finally:
        stop_server(s)


def test_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    s = start_server(
        tmp_path,
        ["--model", MODEL, "--ctx-size", "4200", "--parallel", "1"],
        env={"XLLM_SHUTDOWN_TIMEOUT": "30"},
    )
    try:
        stream = Stream(s, "/v1/completions", LONG).start()
        _until(lambda: bool(stream.lines))
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=2)
        assert time.monotonic() - t0 < 2
        _until(lambda: not _session(s.proc.pid), timeout=2)  # runners die with the server
        stream.join(timeout=5)
        assert stream.error is not None  # cut off, as a hard exit does
    finally:
        stop_server(s)
