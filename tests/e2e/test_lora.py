"""LoRA adapters per request on a real `xllm serve` (SmolLM2 135M).

The adapters are random LoRA weights for the model's attention projections (tests/gguf_make.py),
in the loras folder (`XLLM_LORAS_DIR`). What an adapted request answers is checked against
llama.cpp itself applying the same adapters with the same scales (llama-cpp-python's low-level
calls in this process), token for token, greedy; requests with different adapter sets served
together against each served alone; and a short request with one adapter against a long stream
with another (the batching loop gives adapter groups their steps in turn).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import gguf_make
from tests.conftest import Server, start_server, stop_server

PROMPT = "The capital of France is"
N = 16


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, tiny_path: Path) -> Path:
    d = tmp_path_factory.mktemp("loras")
    gguf_make.lora(smollm2_path, d / "a.gguf", seed=1, strength=0.2)
    gguf_make.lora(smollm2_path, d / "b.gguf", seed=2, strength=0.2)
    gguf_make.lora(tiny_path, d / "tiny.gguf")  # for another model
    shutil.copy(tiny_path, d / "model.gguf")  # a model, not an adapter
    return d


MODEL = "smol"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    path = tmp_path_factory.mktemp("model") / f"{MODEL}.gguf"
    path.symlink_to(smollm2_path)
    return path


def serve(tmp: Path, model: Path, loras: Path, parallel: int) -> Server:
    args = ["--model", str(model), "--ctx-size", "512", "--parallel", str(parallel)]
    return start_server(tmp, args, {"XLLM_LORAS_DIR": str(loras)})


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, loras: Path, model: Path) -> Iterator[Server]:
    s = serve(tmp_path_factory.mktemp("serve-lora"), model, loras, 4)
    yield s
    stop_server(s)


def complete(srv: Server, lora: Any = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL, "prompt": PROMPT, "max_tokens": N, "temperature": 0,
        "cache": False, **extra,
    }  # fmt: skip
    if lora is not None:
        body["lora"] = lora
    r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return dict(r.json())


def text(srv: Server, lora: Any = None, **extra: Any) -> str:
    return str(complete(srv, lora, **extra)["choices"][0]["text"])


def reference(model: Path, adapters: list[tuple[Path, float]]) -> str:
    """What llama.cpp itself generates with these adapters at these scales (flash attention
    on, as on a CPU context xllm creates with llama.cpp's defaults)."""
    import llama_cpp as lc
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=512, flash_attn=True, n_threads=2, verbose=False)
    try:
        loaded = [
            lc.llama_adapter_lora_init(llm._model.model, str(p).encode()) for p, _ in adapters
        ]
        assert all(loaded)
        n = len(loaded)
        ptrs = (lc.llama_adapter_lora_p_ctypes * n)(*loaded)
        scales = (ctypes.c_float * n)(*(s for _, s in adapters))
        assert lc.llama_set_adapters_lora(llm._ctx.ctx, ptrs, n, scales) == 0
        out = llm.create_completion(PROMPT, max_tokens=N, temperature=0, repeat_penalty=1.0)
        return str(out["choices"][0]["text"])  # type: ignore[index]
    finally:
        llm.close()


def test_adapters_change_the_output_and_their_scales_matter(srv: Server) -> None:
    base = text(srv)
    a = text(srv, [{"name": "a", "scale": 1.0}])
    half = text(srv, "a", scale=0.5)  # the single-adapter form
    assert len({base, a, half}) == 3, (base, a, half)
    assert text(srv, [{"name": "a"}]) == a  # scale 1 by default
    assert text(srv, [{"name": "a", "scale": 0}]) == base  # scale 0: off
    # Ollama's options take the same list
    body = {
        "model": MODEL, "prompt": PROMPT, "raw": True, "stream": False, "cache": False,
        "options": {
            "temperature": 0, "num_predict": N, "repeat_penalty": 1.0,
            "lora": [{"name": "a", "scale": 0.5}],
        },
    }  # fmt: skip
    r = httpx.post(f"{srv.url}/api/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["response"] == half


def test_responses_apply_adapters_as_chat_does(srv: Server) -> None:
    """`/v1/responses` takes `lora` in both forms and answers as chat with the same adapters
    (scale 2 and an open prompt: at scale 1 the instruct template keeps a short factual
    answer as it is)."""
    prompt = "Write a poem about the sea."

    def chat(**extra: Any) -> str:
        body = {
            "model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": N,
            "temperature": 0, "cache": False, **extra,
        }  # fmt: skip
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["message"]["content"])

    def respond(**extra: Any) -> str:
        body = {
            "model": MODEL, "input": prompt, "max_output_tokens": N, "temperature": 0,
            "cache": False, **extra,
        }  # fmt: skip
        r = httpx.post(f"{srv.url}/v1/responses", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return str(r.json()["output"][0]["content"][0]["text"])

    base = respond()
    a = respond(lora=[{"name": "a", "scale": 2.0}])
    assert a != base, a
    assert a == chat(lora=[{"name": "a", "scale": 2.0}])
    assert respond(lora="b", scale=2.0) == chat(lora="b", scale=2.0) not in (a, base)
    assert base == chat()
    r = httpx.post(
        f"{srv.url}/v1/responses",
        json={"model": MODEL, "input": PROMPT, "lora": [{"name": "nope"}]},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora", r.text


def test_two_adapters_merged_equal_llama_cpp(srv: Server, loras: Path, smollm2_path: Path) -> None:
    both = text(srv, [{"name": "a", "scale": 1.0}, {"name": "b", "scale": 0.5}])
    assert both == reference(smollm2_path, [(loras / "a.gguf", 1.0), (loras / "b.gguf", 0.5)])
    assert both != text(srv, [{"name": "a"}])
    # the order they are named in does not matter
    assert text(srv, [{"name": "b", "scale": 0.5}, {"name": "a", "scale": 1.0}]) == both


def _tokens(srv: Server, lora: Any) -> list[int]:
    body: dict[str, Any] = {
        "model": MODEL, "prompt": PROMPT, "raw": True, "stream": False, "cache": False,
        "options": {"temperature": 0, "num_predict": 12, "repeat_penalty": 1.0},
    }  # fmt: skip
    if lora is not None:
        body["options"]["lora"] = lora
    r = httpx.post(f"{srv.url}/api/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return list(r.json()["context"])


def test_mixed_adapter_sets_served_together_answer_as_alone(srv: Server) -> None:
    sets: list[Any] = [
        None,
        [{"name": "a"}],
        [{"name": "b"}],
        [{"name": "a", "scale": 0.5}, {"name": "b", "scale": 0.5}],
    ]
    alone = [_tokens(srv, s) for s in sets]
    assert len({tuple(t) for t in alone}) == len(sets)
    together: list[list[int]] = [[] for _ in sets]

    def run(i: int) -> None:
        together[i] = _tokens(srv, sets[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the opening tokens (batch composition may flip a late argmax)
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        prompt_len = len(a) - 12
        assert a[: prompt_len + 6] == b[: prompt_len + 6], sets[i]
    stats = httpx.get(f"{srv.url}/v0/metrics").text
    assert "lora_switches" in stats


def test_a_long_stream_does_not_hold_back_another_adapters_request(srv: Server) -> None:
    """llama-server decodes the first slot's adapter group until it finishes; xllm gives each
    group a step in turn, so B's first token comes after about one step of A's group."""
    complete(srv, "b", max_tokens=1)  # loaded: B's request then waits for the loop only
    arrivals: list[float] = []
    stop = threading.Event()
    started = threading.Event()

    def long_a() -> None:
        body = {
            "model": MODEL, "prompt": PROMPT, "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True, "cache": False, "lora": "a",
        }  # fmt: skip
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
                    if len(arrivals) == 20:
                        started.set()
                if stop.is_set():
                    return

    a = threading.Thread(target=long_a)
    a.start()
    assert started.wait(120)
    sent = time.monotonic()
    body = {
        "model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True,
        "cache": False, "lora": "b",
    }  # fmt: skip
    first = None
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and first is None:
                first = time.monotonic()
    a_total = len(arrivals)
    stop.set()
    a.join()
    assert first is not None
    during = sum(1 for t in arrivals if sent < t < first)
    # A's steps while B's request was rendered, queued and prefilled: a few, not A's stream
    assert during <= 6, (during, a_total)
    assert a_total < 300  # A was still streaming when B had answered


@pytest.mark.parametrize(
    ("lora", "scale", "param", "message"),
    [
        ([{"name": "nope"}], None, "lora", "no LoRA adapter is named 'nope'"),
        ([{"name": "tiny"}], None, "lora", "do not fit it (an adapter for another model?)"),
        ([{"name": "model"}], None, "lora", "is not a LoRA adapter"),
        ([{"name": "a", "scale": 2.5}], None, "lora[0].scale", "less than or equal to 2"),
        ([{"name": "a", "scale": -0.5}], None, "lora[0].scale", "greater than or equal to 0"),
        ([{"name": "a"}, {"name": "a", "scale": 0.5}], None, "lora", "'a' is named twice"),
        ([{"name": "../a"}], None, "lora[0].name", "should match pattern"),
        ([{"name": "a", "weight": 1}], None, "lora[0].weight", "Extra inputs are not permitted"),
        ([{"name": f"x{i}"} for i in range(9)], None, "lora", "at most 8 items"),
        ("a", 3.0, "scale", "less than or equal to 2"),
        (None, 0.5, "scale", "scale goes with lora given as one adapter's name"),
    ],
)
def test_bad_adapters_are_400s_naming_the_field_in_both_dialects(
    srv: Server, lora: Any, scale: float | None, param: str, message: str
) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    if lora is not None:
        body["lora"] = lora
    if scale is not None:
        body["scale"] = scale
    r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"], err
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    if isinstance(lora, list):
        options = {"num_predict": 2, "lora": lora}
        body = {"model": MODEL, "prompt": PROMPT, "stream": False, "options": options}
        r = httpx.post(f"{srv.url}/api/generate", json=body, timeout=60)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"] and "lora" in r.json()["error"], r.text
    assert httpx.get(f"{srv.url}/v0/health").json()["status"] == "ok"


def test_embeddings_refuse_a_requests_adapters(srv: Server) -> None:
    """Embeddings apply no per-request adapters: a 400 naming the field, and the model still
    embeds without one."""
    for path, body, param in (
        ("/v1/embeddings", {"model": MODEL, "input": PROMPT, "lora": "a"}, "lora"),
        ("/api/embed", {"model": MODEL, "input": PROMPT, "options": {"lora": [{"name": "a"}]}},
         "options.lora"),
    ):  # fmt: skip
        r = httpx.post(f"{srv.url}{path}", json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        message = err if isinstance(err, str) else err["message"]
        assert isinstance(err, str) or err["param"] == param, err
        assert message.startswith(f"{param}: embeddings take no per-request LoRA"), err
    r = httpx.post(f"{srv.url}/v1/embeddings", json={"model": MODEL, "input": PROMPT}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 576, r.text


def test_show_lists_the_adapters_and_ps_the_loaded_ones(srv: Server, loras: Path) -> None:
    shown = httpx.post(f"{srv.url}/api/show", json={"model": MODEL}).json()
    names = [a["name"] for a in shown["adapters"]]
    assert names[:2] == ["a", "b"]
    assert "tiny" not in names and "model" not in names  # they do not fit it
    assert shown["adapters"][0]["size"] == (loras / "a.gguf").stat().st_size

    def loaded() -> tuple[int, list[str]]:
        ps = httpx.get(f"{srv.url}/api/ps").json()["models"]
        m = next(m for m in ps if m["name"] == f"{MODEL}:latest")
        return m["size"], [a["name"] for a in m["adapters"]]

    text(srv, [{"name": "a"}])
    size, names = loaded()
    assert "a" in names
    if "b" not in names:  # the memory plan counts each adapter it loads
        text(srv, [{"name": "b"}])
        after, names = loaded()
        assert "b" in names and after - size == (loras / "b.gguf").stat().st_size
    env = {**os.environ, "XLLM_HOST": f"127.0.0.1:{srv.port}", "XLLM_HOME": str(srv.home)}
    out = subprocess.run(
        [sys.executable, "-m", "xllm", "ps"], capture_output=True, text=True, env=env, timeout=60
    ).stdout
    assert "ADAPTERS" in out and "a, b" in out
    out = subprocess.run(
        [sys.executable, "-m", "xllm", "show", MODEL], capture_output=True, text=True, env=env,
        timeout=60,
    ).stdout  # fmt: skip
    assert "Adapters" in out and "loras folder" in out


def test_the_response_cache_keys_on_the_adapter_set(
    tmp_path_factory: pytest.TempPathFactory, loras: Path, model: Path, smollm2_path: Path
) -> None:
    s = serve(tmp_path_factory.mktemp("serve-lora-cache"), model, loras, 2)
    try:

        def ask(lora: Any) -> tuple[str, str]:
            body: dict[str, Any] = {
                "model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
            }  # fmt: skip
            if lora is not None:
                body["lora"] = lora
            r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            return r.headers["x-xllm-cache"], json.dumps(r.json()["choices"][0]["text"])

        first = ask("a")
        assert first[0] == "miss"
        assert ask("a") == ("hit", first[1])
        assert ask([{"name": "a", "scale": 0.5}])[0] == "miss"
        assert ask("b")[0] == "miss"
        none = ask(None)
        assert none[0] == "miss" and none[1] != first[1]
        # an adapter file replaced under its name is another adapter
        shutil.copy(loras / "b.gguf", loras / "c.gguf")
        c = ask("c")
        assert c[0] == "miss" and ask("c") == ("hit", c[1])
        gguf_make.lora(smollm2_path, loras / "c.gguf", seed=3, strength=0.2)
        assert ask("c")[0] == "miss"
    finally:
        stop_server(s)
