"""Several instances at once: replicas of one model served in turn, two quantizations of one
model side by side, and the memory watch that unloads idle models above the high watermark."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import httpx
import llama_cpp
import pytest

from tests.conftest import package_file, start_server, stop_server

MODEL = "smollm2:135m"
ARGS = ["--ctx-size", "512", "--parallel", "2"]


def _health(url: str) -> list[dict]:  # type: ignore[type-arg]
    models: list[dict] = httpx.get(f"{url}/v0/health").json()["models"]  # type: ignore[type-arg]
    return models


def _complete(url: str, model: str, tokens: int = 2) -> httpx.Response:
    body = {"model": model, "prompt": "Hello", "max_tokens": tokens, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


def test_replicas_take_requests_in_turn(tmp_path: Path) -> None:
    s = start_server(tmp_path, [*ARGS, "--model", MODEL], env={"XLLM_REPLICAS": f"{MODEL}=2"})
    try:
        deadline = time.monotonic() + 60
        while len(_health(s.url)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # the preload loads both
        models = _health(s.url)
        assert sorted(m["instance"] for m in models) == [MODEL, f"{MODEL}#2"]
        assert {m["name"] for m in models} == {MODEL}
        assert len({m["runner_pid"] for m in models}) == 2
        for _ in range(6):
            r = _complete(s.url, MODEL)
            assert r.status_code == 200 and r.json()["model"] == MODEL
        time.sleep(0.6)  # the runners' counters arrive every 0.25 s
        served = {m["instance"]: m["stats"]["requests_total"] for m in _health(s.url)}
        assert served == {MODEL: 3, f"{MODEL}#2": 3}
        ps = httpx.get(f"{s.url}/api/ps").json()["models"]
        assert [m["name"] for m in ps] == [MODEL, MODEL]
        r = httpx.post(f"{s.url}/api/generate", json={"model": MODEL, "keep_alive": 0})
        assert r.status_code == 200 and r.json()["done_reason"] == "unload"
        assert _health(s.url) == []  # every replica unloaded
    finally:
        stop_server(s)


@pytest.fixture(scope="module")
def two_quants(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny F16 model and a Q8_0 quantization of it, made with llama.cpp's quantizer."""
    f16 = package_file("tinycoder", "models/tiny.gguf")
    q8 = tmp_path_factory.mktemp("quant") / "tiny-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(q8).encode(), params) == 0
    return f16, q8


def test_two_quantizations_of_one_model_at_once(
    tmp_path: Path, two_quants: tuple[Path, Path]
) -> None:
    s = start_server(tmp_path, ARGS, wait_model=False)
    try:
        for tag, path in zip(("f16", "q8_0"), two_quants, strict=True):
            data = path.read_bytes()
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            assert httpx.post(f"{s.url}/api/blobs/{digest}", content=data).status_code == 201
            body = {"model": f"tiny:{tag}", "files": {path.name: digest}, "stream": False}
            r = httpx.post(f"{s.url}/api/create", json=body, timeout=60)
            assert r.status_code == 200, r.text
        levels = {
            tag: httpx.post(f"{s.url}/api/show", json={"model": f"tiny:{tag}"}).json()["details"][
                "quantization_level"
            ]
            for tag in ("f16", "q8_0")
        }
        assert levels == {"f16": "F16", "q8_0": "Q8_0"}
        assert _complete(s.url, "tiny:f16").status_code == 200
        assert _complete(s.url, "tiny:q8_0").status_code == 200
        loaded = {m["name"] for m in _health(s.url)}
        assert loaded == {"tiny:f16", "tiny:q8_0"}
        assert len({m["runner_pid"] for m in _health(s.url)}) == 2
    finally:
        stop_server(s)


def test_memory_watch_unloads_idle_models_above_the_watermark(tmp_path: Path) -> None:
    """With the watermark below what the machine uses, the watch unloads every idle model,
    least valuable first, one a second, and never one that is generating."""
    tiny = package_file("tinycoder", "models/tiny.gguf")
    env = {"XLLM_MEMORY_HIGH_WATERMARK": "1%"}
    args = [*ARGS, "--model", MODEL, "--model", str(tiny)]
    s = start_server(tmp_path, args, env=env, wait_model=False)
    try:
        done: list[int] = []
        busy = threading.Thread(
            target=lambda: done.append(_complete(s.url, MODEL, 400).status_code)
        )
        busy.start()
        assert _complete(s.url, "tiny").status_code == 200
        deadline = time.monotonic() + 10
        while "tiny:latest" in {m["name"] for m in _health(s.url)}:
            assert time.monotonic() < deadline, "the idle model was not unloaded"
            time.sleep(0.2)
        assert busy.is_alive() and {m["name"] for m in _health(s.url)} == {MODEL}
        busy.join()
        assert done == [200]  # the watch never touched the generating model
        deadline = time.monotonic() + 10
        while _health(s.url):
            assert time.monotonic() < deadline, "the model was not unloaded once idle"
            time.sleep(0.2)
        assert "RAM is" in s.logs() and "above 1%" in s.logs()
    finally:
        stop_server(s)


def test_num_ctx_reloads_with_that_context(tmp_path: Path) -> None:
    """Ollama's `options.num_ctx`: the model is reloaded with that context (once its running
    requests are done); requests without it take the model as loaded."""
    tiny = package_file("tinycoder", "models/tiny.gguf")
    s = start_server(tmp_path, ["--model", str(tiny), "--ctx-size", "256", "--parallel", "1"])
    try:

        def generate(**options: int) -> dict:  # type: ignore[type-arg]
            body = {"model": "tiny", "prompt": "x " * 400, "stream": False, "raw": True,
                    "options": {"num_predict": 2, **options}}  # fmt: skip
            r = httpx.post(f"{s.url}/api/generate", json=body, timeout=120)
            return {"status": r.status_code, **r.json()}

        def loaded() -> tuple[int, int]:
            m = _health(s.url)[0]
            return m["context_length"], m["runner_pid"]

        ctx, pid = loaded()
        assert ctx == 256
        assert generate()["status"] == 400  # 400 tokens do not fit in 256
        busy = threading.Thread(target=_complete, args=(s.url, "tiny", 200))
        busy.start()
        time.sleep(0.2)
        r = generate(num_ctx=1024)  # waits for the running request, then reloads
        busy.join()
        assert r["status"] == 200 and r["eval_count"] == 2
        ctx2, pid2 = loaded()
        assert ctx2 == 1024 and pid2 != pid
        assert generate()["status"] == 200 and loaded() == (1024, pid2)  # no num_ctx: as loaded
        assert generate(num_ctx=1024)["status"] == 200 and loaded() == (1024, pid2)
        ps = httpx.get(f"{s.url}/api/ps").json()["models"][0]
        assert ps["context_length"] == 1024
        assert generate(num_ctx=99_999)["status"] == 200  # capped at the training context
        assert loaded()[0] == 2048
    finally:
        stop_server(s)
