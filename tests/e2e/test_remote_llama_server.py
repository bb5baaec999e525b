"""A llama-server (built from the llama.cpp that the pinned llama-cpp-python vendors, by
benchmarks/build_llama_server.sh, which tests/setup.sh runs) as the upstream of a remote model:
chat, streams, Responses and Ollama's API through xllm with the official clients, and
`/api/show` with the context llama-server lists. (Tool calls are tested over an xllm upstream:
this llama-server answers the test models' forced calls as plain text even when asked
directly.)"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.conftest import Server, free_port, start_server, stop_server
from tests.e2e.test_remote import chat_and_stream, ollama_chat_and_generate

ROOT = Path(__file__).parents[2]
ALIAS = "smollm2-135m"


@pytest.fixture(scope="module")
def llama_server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "build_llama_server.sh")],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    proc = subprocess.Popen(
        [binary, "-m", str(smollm2_path), "-a", ALIAS, "--host", "127.0.0.1",
         "--port", str(port), "-t", "2", "-np", "2", "-c", "2048", "--jinja", "--no-webui"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def front(llama_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    remote = [
        {"name": "ls", "base_url": f"{llama_server}/v1", "flavour": "llama-server",
         "health_interval": 1, "models": {"tiny": ALIAS}},
    ]  # fmt: skip
    s = start_server(
        tmp_path_factory.mktemp("front"), [], {"XLLM_REMOTE": json.dumps(remote)}, wait_model=False
    )
    yield s
    stop_server(s)


def test_openai_client(front: Server) -> None:
    oai = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)
    chat_and_stream(oai, "tiny")
    answer = oai.responses.create(model="tiny", input="Say hello.", max_output_tokens=8)
    assert answer.output_text and answer.status in ("completed", "incomplete")
    events = list(oai.responses.create(model="tiny", input="Hi", max_output_tokens=6, stream=True))
    assert events[-1].type == "response.completed"


def test_ollama_client_and_show(front: Server, llama_server: str) -> None:
    c = ollama.Client(host=front.url)
    ollama_chat_and_generate(c, "tiny")
    listed = httpx.get(f"{llama_server}/v1/models").json()["data"]
    trained = next(m["meta"]["n_ctx_train"] for m in listed if m["id"] == ALIAS)
    info = c.show("tiny").modelinfo or {}
    assert info[f"{info['general.architecture']}.context_length"] == trained > 0
