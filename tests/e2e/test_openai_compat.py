"""Where OpenAI clients rely on details of the contract: streamed usage sent once, the
`developer` role. Through the official `openai` SDK."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import Server

MODEL = "smollm2:135m"
ASK = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def _summed(chunks: list[Any]) -> tuple[int, int, int]:
    """Usage as LangChain's `stream_usage` counts it: summed over every chunk that has one."""
    used = [c.usage for c in chunks if c.usage is not None]
    return (
        sum(u.prompt_tokens for u in used),
        sum(u.completion_tokens for u in used),
        sum(u.total_tokens for u in used),
    )


def _create(client: openai.OpenAI, kind: str, **kw: Any) -> Any:
    common = {"model": MODEL, "temperature": 0, "max_tokens": 6, **kw}
    if kind == "chat":
        return client.chat.completions.create(messages=ASK, **common)
    return client.completions.create(prompt="Three colors:", **common)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_usage_comes_once(client: openai.OpenAI, kind: str, n: int) -> None:
    whole = _create(client, kind, n=n).usage
    expected = (whole.prompt_tokens, whole.completion_tokens, whole.total_tokens)
    assert whole.completion_tokens > 0

    chunks = list(_create(client, kind, n=n, stream=True, stream_options={"include_usage": True}))
    assert [i for i, c in enumerate(chunks) if c.usage is not None] == [len(chunks) - 1]
    assert chunks[-1].choices == []  # the chunk of its own that include_usage asks for
    assert sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == n
    assert _summed(chunks) == expected

    # without include_usage, usage rides on the last chunk (xllm sends it always)
    chunks = list(_create(client, kind, n=n, stream=True))
    assert [i for i, c in enumerate(chunks) if c.usage is not None] == [len(chunks) - 1]
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason is not None
    assert _summed(chunks) == expected


def _instructed(role: str) -> list[Any]:
    return [
        {"role": role, "content": "You answer in one word."},
        {"role": "user", "content": "What color is the sky?"},
    ]


def test_developer_role_is_the_system_role(client: openai.OpenAI) -> None:
    """Templates know no `developer`: sent as it is, it came after the template's own default
    system prompt, and the request's prompt differed from the same one with `system`."""
    chat = {
        role: client.chat.completions.create(
            model=MODEL, messages=_instructed(role), temperature=0, max_tokens=8
        )
        for role in ("developer", "system")
    }
    assert chat["developer"].usage.prompt_tokens == chat["system"].usage.prompt_tokens
    assert chat["developer"].choices[0].message.content == chat["system"].choices[0].message.content

    # the Responses API maps it in the same place
    responses = {
        role: client.responses.create(
            model=MODEL, input=_instructed(role), temperature=0, max_output_tokens=8
        )
        for role in ("developer", "system")
    }
    assert responses["developer"].usage.input_tokens == chat["system"].usage.prompt_tokens
    assert responses["system"].usage.input_tokens == chat["system"].usage.prompt_tokens
    assert responses["developer"].output_text == responses["system"].output_text
