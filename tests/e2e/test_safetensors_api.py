"""A safetensors model on a real `xllm serve`: pulled from the local Hub with the official ollama
client, listed and shown, and refused with a clear 400 (no engine runs it) on every endpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from tests.conftest import Server, hf_folder, start_server, stop_server
from tests.upstream import Upstream

REPO = "sentence-transformers/all-MiniLM-L6-v2"
NAME = f"hf.co/{REPO}:latest"


@pytest.fixture(scope="module")
def upstream(minilm_dir: Path) -> Iterator[Upstream]:
    u = Upstream()
    u.add_hf_repo(REPO, hf_folder(minilm_dir))
    u.start()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Server]:
    env = {"XLLM_REGISTRY": upstream.url, "HF_ENDPOINT": upstream.url}
    s = start_server(tmp_path_factory.mktemp("safetensors"), [], env, wait_model=False)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def client(srv: Server) -> ollama.Client:
    c = ollama.Client(host=srv.url)
    assert c.pull(f"hf.co/{REPO}").status == "success"
    return c


def test_listed_and_shown(client: ollama.Client, srv: Server) -> None:
    listed = next(m for m in client.list().models if m.model == NAME)
    assert listed.details is not None and listed.details.format == "safetensors"
    assert listed.details.family == "BertModel" and listed.details.parameter_size == "22.7M"
    assert listed.details.quantization_level == "F32" and (listed.size or 0) > 90_000_000
    shown = client.show(NAME)
    assert shown.details is not None and shown.details.format == "safetensors"
    assert shown.capabilities == ["embedding"]
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "bert"
    assert shown.modelinfo["hidden_size"] == 384
    verbose = httpx.post(f"{srv.url}/api/show", json={"model": NAME, "verbose": True})
    assert verbose.status_code == 200 and verbose.json()["details"]["format"] == "safetensors"
    # no engine here serves it: OpenAI's list, which offers what can be used, leaves it out
    r = httpx.get(f"{srv.url}/v1/models/{NAME}")
    assert r.status_code == 404 and "not served by any engine" in r.json()["error"]["message"]
    assert NAME not in {m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]}


def test_cli_list_and_show(client: ollama.Client, srv: Server) -> None:
    env = {**os.environ, "XLLM_HOST": f"127.0.0.1:{srv.port}"}

    def xllm(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "xllm", *args], capture_output=True,
                              text=True, env=env, timeout=120, check=True)  # fmt: skip
        return done.stdout

    assert NAME in xllm("list")
    shown = xllm("show", NAME)
    for label, value in (("architecture", "bert"), ("parameters", "22.7M"),
                         ("context length", "512"), ("embedding length", "384"),
                         ("quantization", "F32"), ("embedding", "")):  # fmt: skip
        assert re.search(rf"^\s+{label}\s+{value}\s*$", shown, re.M), (label, shown)


def _says_safetensors(message: str) -> None:
    assert "safetensors format" in message and "BertModel" in message and "GGUF" in message
    # the exact commands that make a servable model of it
    assert (
        f"echo 'FROM {NAME}' > Modelfile && xllm create all-minilm-l6-v2-gguf -f Modelfile"
        in message
    )
    assert f"xllm convert {NAME} all-minilm-l6-v2.gguf" in message


def test_embed_is_refused_clearly(client: ollama.Client, srv: Server) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=NAME, input="hello")
    assert e.value.status_code == 400
    _says_safetensors(e.value.error)
    r = httpx.post(f"{srv.url}/api/generate", json={"model": NAME, "prompt": "hi"})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    _says_safetensors(r.json()["error"])


def test_openai_embeddings_is_refused_clearly(client: ollama.Client, srv: Server) -> None:
    r = httpx.post(f"{srv.url}/v1/embeddings", json={"model": NAME, "input": "hello"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    _says_safetensors(error["message"])
    assert httpx.get(f"{srv.url}/api/ps").json()["models"] == []  # no runner was started
    assert "Traceback" not in srv.logs()


def test_create_from_it_converts_and_embeds(client: ollama.Client, srv: Server) -> None:
    """What the 400 says to run: create converts the stored safetensors model to GGUF, and
    the new model embeds through both APIs; quantize works on the way."""
    records = [
        r.status for r in client.create(model="all-minilm-l6-v2-gguf", from_=NAME, stream=True)
    ]
    assert records[-1] == "success"
    shown = client.show("all-minilm-l6-v2-gguf")
    assert (
        shown.details is not None
        and shown.details.format == "gguf"
        and shown.details.family == "bert"
    )
    assert shown.capabilities == ["embedding"]
    a = client.embed(model="all-minilm-l6-v2-gguf", input=["hello", "world"]).embeddings
    r = httpx.post(
        f"{srv.url}/v1/embeddings",
        json={"model": "all-minilm-l6-v2-gguf", "input": "hello"},
        timeout=60,
    )
    assert r.status_code == 200 and len(a) == 2 and len(a[0]) == 384
    b = r.json()["data"][0]["embedding"]
    assert sum(x * y for x, y in zip(a[0], b, strict=True)) / (sum(x * x for x in b) ** 0.5) > 0.999
    client.create(model="minilm-q8", from_=NAME, quantize="q8_0")
    q = client.show("minilm-q8")
    assert q.details is not None and q.details.quantization_level == "Q8_0"
    assert len(client.embed(model="minilm-q8", input="hello").embeddings[0]) == 384


def test_delete_removes_it(client: ollama.Client) -> None:
    client.delete(NAME)
    assert NAME not in [m.model for m in client.list().models]
