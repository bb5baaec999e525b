"""Runner processes and unloading, against a real server (RELIABILITY items 4 and 23)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, process_table, start_server, stop_server

MODEL = "smollm2:135m"


def _children(pid: int) -> set[int]:
    return {p for p, (_, parent, _) in process_table().items() if parent == pid}


def _health(server: Server) -> dict:  # type: ignore[type-arg]
    r = httpx.get(f"{server.url}/v0/health", timeout=1)
    assert r.status_code == 200
    return r.json()  # type: ignore[no-any-return]


@pytest.fixture()
def fresh(tmp_path: Path) -> Iterator[Server]:
    s = start_server(
        tmp_path,
        ["--model", MODEL, "--ctx-size", "1024", "--parallel", "2"],
        env={"XLLM_IDLE_TIMEOUT": "300"},
    )
    yield s
    stop_server(s)
    assert _children(s.proc.pid) == set()


def test_runner_is_a_child_process(fresh: Server) -> None:
    pid = _health(fresh)["models"][0]["runner_pid"]
    assert pid != fresh.proc.pid
    assert _children(fresh.proc.pid) == {pid}


def test_kill_runner_mid_stream(fresh: Server) -> None:
    pid = _health(fresh)["models"][0]["runner_pid"]
    body = {
        "model": MODEL,
        "prompt": "Count:",
        "max_tokens": 800,
        "ignore_eos": True,
        "stream": True,
    }
    lines: list[str] = []
    killed_at: list[float] = []

    def kill_after_first_token() -> None:
        while not lines:
            time.sleep(0.01)
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_token)
    killer.start()
    with httpx.stream("POST", f"{fresh.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                lines.append(line)
    ended = time.monotonic()
    killer.join()
    assert ended - killed_at[0] < 2.0
    assert any('"error"' in line for line in lines), lines[-3:]
    error_at = next(i for i, line in enumerate(lines) if '"error"' in line)
    assert "runner" in lines[error_at] and "SIGKILL" in lines[error_at]
    # the model is gone from the loaded list, the server is fine, the next request reloads it
    deadline = time.monotonic() + 2
    while _health(fresh)["models"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _health(fresh)["models"] == []
    assert fresh.proc.poll() is None
    r = httpx.post(
        f"{fresh.url}/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 3},
        timeout=60,
    )
    assert r.status_code == 200
    new_pid = _health(fresh)["models"][0]["runner_pid"]
    assert new_pid != pid
    assert _children(fresh.proc.pid) == {new_pid}


def test_idle_timeout_unloads(tmp_path: Path) -> None:
    s = start_server(
        tmp_path, ["--model", MODEL, "--ctx-size", "512"], env={"XLLM_IDLE_TIMEOUT": "1"}
    )
    try:
        r = httpx.post(
            f"{s.url}/v1/completions",
            json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
            timeout=60,
        )
        assert r.status_code == 200
        deadline = time.monotonic() + 5
        while _health(s)["models"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _health(s)["models"] == []
        while _children(s.proc.pid) and time.monotonic() < deadline + 5:
            time.sleep(0.1)
        assert _children(s.proc.pid) == set()
    finally:
        stop_server(s)
