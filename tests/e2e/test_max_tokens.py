"""`xllm serve --max-tokens N`: the server's cap on what one request generates (llama-server's
`-n`), whatever the request asks, in both dialects; a request asking for less gets less."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import start_server, stop_server


def test_no_request_generates_past_the_servers_cap(tmp_path: Path, smollm2_path: Path) -> None:
    s = start_server(tmp_path, ["--model", str(smollm2_path), "--max-tokens", "5"])
    try:
        name = smollm2_path.stem
        body = {"model": name, "prompt": "Count to fifty:", "temperature": 0, "ignore_eos": True}
        unasked = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).json()
        more = httpx.post(f"{s.url}/v1/completions", json={**body, "max_tokens": 100},
                          timeout=60).json()  # fmt: skip
        less = httpx.post(f"{s.url}/v1/completions", json={**body, "max_tokens": 3},
                          timeout=60).json()  # fmt: skip
        ollama = httpx.post(f"{s.url}/api/generate", timeout=60, json={
            "model": name, "prompt": "Count to fifty:", "stream": False,
            "options": {"temperature": 0, "num_predict": 100},
        }).json()  # fmt: skip
    finally:
        stop_server(s)
    assert unasked["usage"]["completion_tokens"] == 5
    assert unasked["choices"][0]["finish_reason"] == "length"
    assert more["usage"]["completion_tokens"] == 5
    assert less["usage"]["completion_tokens"] == 3
    assert ollama["eval_count"] == 5 and ollama["done_reason"] == "length"
