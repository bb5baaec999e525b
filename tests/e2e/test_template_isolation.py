"""A runaway chat template fails its own request only (RELIABILITY items 5 and 6): it renders
in the runner's render worker, which is stopped at 2 s, 1 MiB of output or its memory cap,
while the runner, the other tenants' streams and the server carry on."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, child_pids, proc_status_bytes, start_server, stop_server

MODEL = "smollm2:135m"
SILENT_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
ATTACKS = [
    # (template, what stops it (None: either limit), whether the worker is killed for it)
    # RELIABILITY's 10^10 iterations: 1 MiB of output, or 2 s on a busy machine
    (
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        None,
        None,
    ),
    # 10^10 iterations that write nothing: the time limit, and the worker is replaced
    (SILENT_LOOP, "rendering took longer than 2 s", True),
    # 10 GB of output: refused once past 1 MiB, before memory grows
    (
        "{% set s = 'a' * 100000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
        "the rendered prompt exceeds 1 MiB",
        False,
    ),
    # a 2 GB value built in one step and never written: the worker's memory cap
    (
        "{% set s = 'a' * 1000000 %}{{ ([s] * 2000) | join | length }}",
        "MemoryError",
        False,
    ),
]
SAFE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
HOSTILE = "hostile:latest"
MiB = 1 << 20


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("isolation"),
        ["--model", MODEL, "--ctx-size", "1024", "--parallel", "2"],
    )
    yield s
    stop_server(s)


def _runner_pid(server: Server, model: str) -> int:
    models = httpx.get(f"{server.url}/v0/health", timeout=5).json()["models"]
    return int(next(m["runner_pid"] for m in models if m["name"] == model))


def _complete(model: str, max_tokens: int, stream: bool) -> dict[str, object]:
    # a raw prompt: the model's own template may be the hostile one
    return {
        "model": model,
        "prompt": "Count from one to a thousand: 1, 2, 3,",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


def _tokens_for(url: str, model: str, seconds: float) -> int:
    """How many tokens the model streams in about `seconds` on this machine right now (a
    shared CI box can be fifty times slower than an idle one)."""
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json=_complete(model, 8, False), timeout=120)
    assert r.status_code == 200, r.text
    return max(20, min(900, int(8 / (time.monotonic() - t0) * seconds)))


class _Stream(threading.Thread):
    """Another tenant's long streamed completion on the same runner, long enough to outlast
    the attack."""

    def __init__(self, url: str, model: str) -> None:
        super().__init__()
        self.url = url
        self.model = model
        self.lines: list[str] = []
        self.first = threading.Event()

    def run(self) -> None:
        body = _complete(self.model, _tokens_for(self.url, self.model, 10.0), True)
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=300) as r:
            self.lines.append(f"status {r.status_code}")
            for line in r.iter_lines():
                if line:
                    self.lines.append(line)
                    self.first.set()
        self.first.set()

    def check_finished_normally(self) -> None:
        self.join(timeout=300)
        assert self.lines[0] == "status 200"
        assert not any('"error"' in line for line in self.lines), self.lines[-3:]
        assert self.lines[-1] == "data: [DONE]"
        finishes = [
            c["finish_reason"]
            for line in self.lines[1:-1]
            for c in json.loads(line.removeprefix("data: "))["choices"]
            if c["finish_reason"]
        ]
        assert finishes == ["length"]


class _Watch(threading.Thread):
    """While an attack runs: /api/tags latency (a dashboard polling) and the peak RSS of the
    server and the runner."""

    def __init__(self, server: Server, runner: int) -> None:
        super().__init__()
        self.url = server.url
        self.pids = {"server": server.proc.pid, "runner": runner}
        self.base = {k: proc_status_bytes(p, "VmRSS") for k, p in self.pids.items()}
        httpx.get(f"{self.url}/api/tags", timeout=30)  # its first answer reads the model files
        self.peak = dict(self.base)
        self.latencies: list[float] = []
        self.done = threading.Event()
        self.sampled = threading.Event()  # set after the first listing: the attack waits for it

    def run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self.done.is_set():
                t0 = time.monotonic()
                assert c.get(f"{self.url}/api/tags").status_code == 200
                self.latencies.append(time.monotonic() - t0)
                for k, pid in self.pids.items():
                    self.peak[k] = max(self.peak[k], proc_status_bytes(pid, "VmRSS"))
                self.sampled.set()
                time.sleep(0.02)

    def growth(self) -> dict[str, float]:
        return {k: (self.peak[k] - self.base[k]) / MiB for k in self.pids}


def _attack_during_stream(
    server: Server, model: str, attack: Callable[[], httpx.Response]
) -> tuple[httpx.Response, float, _Watch]:
    """Run `attack` while another tenant streams from the same runner; the attack's reply
    and time, once the stream has ended as it should and the runner is the same process."""
    runner = _runner_pid(server, model)
    stream = _Stream(server.url, model)
    stream.start()
    assert stream.first.wait(120)
    watch = _Watch(server, runner)
    watch.start()
    assert watch.sampled.wait(30)
    t0 = time.monotonic()
    r = attack()
    elapsed = time.monotonic() - t0
    watch.done.set()
    watch.join()
    overlapped = stream.is_alive()
    stream.check_finished_normally()
    assert overlapped, "the stream ended before the attack did"
    assert _runner_pid(server, model) == runner
    assert server.proc.poll() is None
    return r, elapsed, watch


def _generate(server: Server, model: str, template: str | None = None) -> httpx.Response:
    body = {"model": model, "prompt": "Say hi.", "stream": False, "options": {"num_predict": 4}}
    if template is not None:
        body["template"] = template
    return httpx.post(f"{server.url}/api/generate", json=body, timeout=60)


@pytest.mark.parametrize(("template", "reason", "killed"), ATTACKS)
def test_runaway_request_template_fails_alone(
    srv: Server, template: str, reason: str | None, killed: bool | None
) -> None:
    assert _generate(srv, MODEL).status_code == 200  # loaded, whatever came before
    runner = _runner_pid(srv, MODEL)
    workers = child_pids(runner)
    r, elapsed, watch = _attack_during_stream(srv, MODEL, lambda: _generate(srv, MODEL, template))
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("chat template error: "), r.text
    assert reason is None or reason in r.json()["error"], r.text
    assert elapsed < 3.0
    growth = watch.growth()
    assert growth["server"] < 200 and growth["runner"] < 200, growth
    assert max(watch.latencies) < 0.5, sorted(watch.latencies)[-3:]
    [worker] = workers
    [after] = child_pids(runner)  # the render worker, replaced if it was killed
    if killed is not None:
        assert (after != worker) is killed
    if killed is False:  # its peak: a little over its 256 MiB cap at most
        assert proc_status_bytes(after, "VmHWM") < 400 * MiB
    ok = _generate(srv, MODEL)
    assert ok.status_code == 200 and ok.json()["done"], ok.text


def test_stored_hostile_template_fails_alone(srv: Server, smollm2_path: Path) -> None:
    data = smollm2_path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert httpx.post(f"{srv.url}/api/blobs/{digest}", content=data).status_code == 201
    body = {
        "model": HOSTILE,
        "files": {smollm2_path.name: digest},
        "template": SILENT_LOOP,
        "stream": False,
    }
    assert httpx.post(f"{srv.url}/api/create", json=body, timeout=60).status_code == 200
    assert _generate(srv, HOSTILE, SAFE).status_code == 200  # loads it
    r, elapsed, _ = _attack_during_stream(srv, HOSTILE, lambda: _generate(srv, HOSTILE))
    assert r.status_code == 400 and "longer than 2 s" in r.json()["error"], r.text
    assert elapsed < 3.0
    # still loaded, same runner, and the model's other requests keep working
    assert _generate(srv, HOSTILE, SAFE).status_code == 200
