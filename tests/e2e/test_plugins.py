"""An out-of-tree engine plugin, installed into the test venv like any package
(tests/plugins/xllm-reverse, by tests/setup.sh), serves its model over both API dialects through
a real `xllm serve`, beside the built-in llama.cpp engine; broken plugins on the path are
refused with a log line each while everything else keeps serving.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.conftest import Server, start_server, stop_server
from xllm.engine.protocol import ABI_VERSION

REVERSE = "reverse-lm:latest"


def _folder(root: Path, architecture: str) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    header = b"{}      "
    (root / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return root


def _broken_plugins(root: Path) -> Path:
    """Plugin distributions that must be refused: a missing field, another ABI, an unknown
    format (as `pip install` would leave them: a module and its dist-info)."""
    root.mkdir()
    (root / "brokenplugins.py").write_text(
        textwrap.dedent(
            f"""
            async def load(spec):
                raise RuntimeError("never called")
            BASE = {{"name": "b", "version": "1", "abi": {ABI_VERSION}, "formats": ["gguf"],
                    "architectures": ["llama"], "capabilities": ["chat"], "load": load}}
            NO_NAME = {{k: v for k, v in BASE.items() if k != "name"}}
            OLD_ABI = {{**BASE, "name": "old", "abi": {ABI_VERSION} + 7}}
            ODD_FORMAT = {{**BASE, "name": "odd", "formats": ["weights.zip"]}}
            """
        )
    )
    dist = root / "brokenplugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[xllm.engines]\nnoname = brokenplugins:NO_NAME\nold = brokenplugins:OLD_ABI\n"
        "odd = brokenplugins:ODD_FORMAT\n"
    )
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("plugins")
    reverse = _folder(tmp / "reverse-lm", "ReverseLM")
    llama_hf = _folder(tmp / "hf-llama", "LlamaForCausalLM")
    broken = _broken_plugins(tmp / "site")
    server = start_server(
        tmp,
        ["--model", "smollm2:135m", "--model", str(reverse), "--model", str(llama_hf),
         "--ctx-size", "1024", "--parallel", "2"],
        env={"PYTHONPATH": os.pathsep.join(filter(None, [str(broken), os.environ.get("PYTHONPATH")]))},
        wait_model=False,
    )  # fmt: skip
    yield server
    stop_server(server)


def test_the_plugin_serves_its_model_over_openai(served: Server) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x")
    reply = client.chat.completions.create(
        model=REVERSE, messages=[{"role": "user", "content": "hello plugin world"}]
    )
    assert reply.choices[0].message.content == "dlrow nigulp olleh"
    stream = client.chat.completions.create(
        model=REVERSE, messages=[{"role": "user", "content": "one two"}], stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == "owt eno" and len([p for p in pieces if p]) == 2
    text = client.completions.create(model=REVERSE, prompt="abc def", max_tokens=1)
    assert text.choices[0].text == "fed"


def test_the_plugin_serves_its_model_over_ollama(served: Server) -> None:
    client = ollama.Client(host=served.url)
    reply = client.chat(model=REVERSE, messages=[{"role": "user", "content": "ab cd"}])
    assert reply.message.content == "dc ba"
    chunks = list(client.generate(model=REVERSE, prompt="xy z", stream=True))
    assert "".join(c.response for c in chunks) == "z yx"
    assert chunks[-1].done


def test_gguf_models_still_go_to_llama_cpp(served: Server) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x")
    reply = client.chat.completions.create(
        model="smollm2:135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content
    health = httpx.get(f"{served.url}/v0/health").json()
    kinds = {m["name"]: m["engine"] for m in health["models"]}
    assert kinds["smollm2:135m"] == "llama.cpp"


def test_a_model_no_engine_serves_is_refused_naming_its_architecture(served: Server) -> None:
    r = httpx.post(
        f"{served.url}/v1/chat/completions",
        json={"model": "hf-llama:latest", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert "'LlamaForCausalLM'" in error["message"] and error["param"] == "model"
    ids = {m["id"] for m in httpx.get(f"{served.url}/v1/models").json()["data"]}
    assert REVERSE in ids and "smollm2:135m" in ids and "hf-llama:latest" not in ids


def test_a_forced_engine_must_serve_the_model(served: Server) -> None:
    body = {"model": REVERSE, "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{served.url}/v1/chat/completions", json={**body, "engine": "llama.cpp"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "engine"
    r = httpx.post(f"{served.url}/api/chat", json={**body, "engine": "reverse", "stream": False})
    assert r.status_code == 200 and r.json()["message"]["content"] == "x"


def test_broken_plugins_are_refused_and_reported(served: Server) -> None:
    logs = served.logs()
    assert "engine plugin 'noname'" in logs and "lacks name" in logs
    assert "engine plugin 'old'" in logs and f"this xllm has ABI {ABI_VERSION}" in logs
    assert "engine plugin 'odd'" in logs and "'weights.zip'" in logs
    engines = {e["name"]: e for e in httpx.get(f"{served.url}/v0/health").json()["engines"]}
    assert engines["llama.cpp"]["state"] in ("idle", "loading", "loaded")
    assert engines["reverse"]["state"] in ("idle", "loaded")
    for name in ("noname", "old", "odd"):
        assert engines[name]["state"] == "error"
