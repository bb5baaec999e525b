"""The balancer example (deploy/haproxy.cfg) as shipped: two real xllm nodes behind HAProxy,
least connections and health checks on /v0/health. Both nodes serve; a node killed outright
loses no request, before or after the health check notices."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, free_port, start_server, stop_server

CONFIG = Path(__file__).parents[2] / "deploy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    args = ["--model", "smollm2:135m", "--ctx-size", "512", "--parallel", "2"]
    started = [start_server(tmp_path_factory.mktemp(f"node{i}"), args) for i in (1, 2)]
    yield started
    for s in started:
        stop_server(s)


@pytest.fixture(scope="module")
def balancer(nodes: list[Server]) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "XLLM_LB_BIND": f"127.0.0.1:{port}",
        "XLLM_NODE1": f"127.0.0.1:{nodes[0].port}",
        "XLLM_NODE2": f"127.0.0.1:{nodes[1].port}",
    }
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(CONFIG)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v0/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)


def _served(node: Server) -> int:
    text = httpx.get(f"{node.url}/v0/metrics").text
    m = re.search(r'xllm_engine_requests_total\{model="smollm2:135m"\} (\d+)', text)
    return int(m.group(1)) if m else 0


def _ask(url: str) -> int:
    body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2}  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code


def test_nodes_share_and_survive_a_kill(nodes: list[Server], balancer: str) -> None:
    before = [_served(n) for n in nodes]
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(_ask, [balancer] * 50))
    assert statuses == [200] * 50
    deadline = time.monotonic() + 5  # the engines report their counters every 0.25 s
    while True:
        served = [_served(n) - b for n, b in zip(nodes, before, strict=True)]
        if sum(served) >= 50 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(served) == 50 and min(served) > 0, served
    os.killpg(nodes[0].proc.pid, signal.SIGKILL)
    nodes[0].proc.wait()
    with ThreadPoolExecutor(4) as pool:  # straight away: refused connections go elsewhere
        statuses = list(pool.map(_ask, [balancer] * 10))
    time.sleep(3)  # the health check has noticed by now
    statuses += [_ask(balancer) for _ in range(10)]
    assert statuses == [200] * 20
