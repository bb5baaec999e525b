"""Hostile chat templates inside model files (RELIABILITY items 5 and 6), on a real server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, package_file, start_server, stop_server

TEMPLATES = {
    "loop": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "repeat": "{{ 'a' * 10**9 }}",
    "pwn": "{{ cycler.__init__.__globals__.os.popen('touch /tmp/xllm_pwned').read() }}",
}


def _with_template(tmp: Path, name: str, template: str) -> Path:
    out = tmp / f"{name}.gguf"
    subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--chat-template", template,
         str(package_file("tinycoder", "models/tiny.gguf")), str(out)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("templates")
    args = []
    for name, template in TEMPLATES.items():
        args += ["--model", str(_with_template(tmp, name, template))]
    s = start_server(tmp, [*args, "--ctx-size", "256", "--parallel", "1"])
    yield s
    stop_server(s)


def _chat(server: Server, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)


def test_runaway_template_is_cut_off_and_server_stays_responsive(hostile: Server) -> None:
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=5) as c:  # one connection, as a dashboard would poll
            while not done.is_set():
                t0 = time.monotonic()
                assert c.get(f"{hostile.url}/api/tags").status_code == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.05)

    httpx.get(f"{hostile.url}/api/tags", timeout=30)  # the first listing reads the store
    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.monotonic()
    r = _chat(hostile, "loop")
    elapsed = time.monotonic() - t0
    done.set()
    prober.join()
    assert r.status_code == 400 and "template" in r.json()["error"]["message"]
    assert elapsed < 3.0
    latencies.sort()
    assert latencies, "no listing was timed during the attack"
    assert latencies[max(int(len(latencies) * 0.99) - 1, 0)] < 0.1, latencies[-5:]
    # the same model, still loaded, refuses it again; other models are untouched
    assert _chat(hostile, "loop").status_code == 400


def test_huge_repetition_refused_fast(hostile: Server) -> None:
    t0 = time.monotonic()
    r = _chat(hostile, "repeat")
    assert r.status_code == 400 and "template" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 2.0


def test_code_execution_payload_blocked(hostile: Server) -> None:
    Path("/tmp/xllm_pwned").unlink(missing_ok=True)
    r = _chat(hostile, "pwn")
    assert r.status_code == 400
    assert not Path("/tmp/xllm_pwned").exists()
    assert hostile.proc.poll() is None
