"""Runner processes and unloading, against a real server (RELIABILITY items 4 and 23)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import gguf_corpus
from tests.conftest import Server, child_pids, start_server, stop_server

MODEL = "smollm2:135m"
LLAMA_CPP_LOG = re.compile(r"sched_reserve|llama_|load_tensors|ggml_|print_info|llm_load")
"""What llama.cpp writes to a runner's stderr: for the server's log, never for a client."""


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
    assert child_pids(s.proc.pid) == set()


def test_runner_is_a_child_process(fresh: Server) -> None:
    pid = _health(fresh)["models"][0]["runner_pid"]
    assert pid != fresh.proc.pid
    assert child_pids(fresh.proc.pid) == {pid}


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_runner_mid_stream(fresh: Server) -> None:
    pid = _health(fresh)["models"][0]["runner_pid"]
    workers = child_pids(pid)
    assert len(workers) == 1  # its chat-template render worker
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
    assert "the request was aborted" in lines[error_at]
    assert not LLAMA_CPP_LOG.search(lines[error_at]), lines[error_at]
    assert lines[error_at + 1 :] == ["data: [DONE]"]
    _, after = fresh.logs().split("was killed by SIGKILL", 1)  # the runner's last output
    assert LLAMA_CPP_LOG.search(after)
    # the model is gone from the loaded list, the server is fine, the next request reloads it
    deadline = time.monotonic() + 2
    while _health(fresh)["models"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _health(fresh)["models"] == []
    assert fresh.proc.poll() is None
    while any(map(_running, workers)) and time.monotonic() < deadline + 2:
        time.sleep(0.05)
    assert not any(map(_running, workers))  # the render worker went with its runner
    r = httpx.post(
        f"{fresh.url}/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 3},
        timeout=60,
    )
    assert r.status_code == 200
    new_pid = _health(fresh)["models"][0]["runner_pid"]
    assert new_pid != pid
    assert child_pids(fresh.proc.pid) == {new_pid}


def test_failed_load_is_explained_without_llama_cpp_log(tmp_path: Path) -> None:
    bad = gguf_corpus.write(tmp_path / "bad.gguf")  # passes xllm's checks, not llama.cpp's
    s = start_server(tmp_path, ["--model", str(bad), "--ctx-size", "256"], wait_model=False)
    try:
        body = {"model": "bad", "prompt": "Hi", "max_tokens": 2}
        for path, extra in (("/v1/completions", {}), ("/v1/completions", {"stream": True})):
            r = httpx.post(f"{s.url}{path}", json=body | extra, timeout=60)
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert err["type"] == "server_error" and err["code"] == "model_load_failed"
            assert err["message"] == (
                f"failed to load model 'bad:latest' from {bad}: llama.cpp could not load {bad} "
                "(the server's log has llama.cpp's messages)"
            )
        r = httpx.post(f"{s.url}/api/generate", json=body | {"stream": False}, timeout=60)
        assert r.status_code == 500 and r.json()["error"] == err["message"]
        # llama.cpp's reason, for the operator
        assert "key not found in model: llama.attention.layer_norm_rms_epsilon" in s.logs()
        assert s.proc.poll() is None
    finally:
        stop_server(s)


def test_keep_alive_unloads(tmp_path: Path) -> None:
    s = start_server(
        tmp_path, ["--model", MODEL, "--ctx-size", "512"], env={"XLLM_KEEP_ALIVE": "1"}
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
        while child_pids(s.proc.pid) and time.monotonic() < deadline + 5:
            time.sleep(0.1)
        assert child_pids(s.proc.pid) == set()
    finally:
        stop_server(s)
