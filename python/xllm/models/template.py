"""Chat templates: Hugging Face style Jinja2, rendered in an immutable sandbox.

Templates come from model files, which are untrusted: the sandbox blocks attribute tricks that
reach Python internals (CVE-2024-34359 and its relatives). Models without a template get ChatML,
the fallback llama.cpp uses too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from xllm.errors import InvalidRequest

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Used when a model carries no chat template; generation then also stops at `<|im_end|>`."""
CHATML_STOP = "<|im_end|>"


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


# 3.1.6 fixes the sandbox escapes CVE-2024-56326 and CVE-2025-27516.
if _version_tuple(jinja2.__version__) < (3, 1, 6):
    raise ImportError(
        f"xllm needs jinja2>=3.1.6 for a safe template sandbox, found {jinja2.__version__}"
    )


class TemplateError(InvalidRequest):
    """The chat template failed to render (or asked to raise)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template error: {message}")


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    # HF's tojson: real JSON, no HTML escaping (Jinja's own escapes <, > and &).
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


MAX_OUTPUT = 1 << 20
"""A rendered prompt larger than this (1 MiB) is refused as soon as rendering passes it; the
render worker's time and memory limits do the rest (engine/render.py)."""


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus no `*`/`**` that would build huge values in one step."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise jinja2.exceptions.SecurityError("exponent too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(n, int)
                if sized and len(seq) * n > MAX_OUTPUT:
                    raise jinja2.exceptions.SecurityError("repetition too large")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    env = _LimitedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template error: {e}") from None


def render_chat(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    enable_thinking: bool | None = None,
) -> str:
    """Render `messages` into a prompt with the model's template.

    `enable_thinking` (Qwen3-style templates read it) is passed only when a request set it.
    """
    template = _compile(source)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    try:
        out = _capped(
            template.generate(
                messages=list(messages),
                bos_token=bos_token,
                eos_token=eos_token,
                add_generation_prompt=add_generation_prompt,
                tools=list(tools) if tools else None,
                **extra,
            )
        )
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template error: unsafe operation blocked: {e}") from None
    except Exception as e:  # a template is code from a file: any failure is its error
        raise TemplateError(f"chat template error: {type(e).__name__}: {e}") from None
    return out


def _capped(chunks: Iterable[str]) -> str:
    """The output joined, refused as soon as it passes MAX_OUTPUT: a loop that writes a lot
    stops there, it does not fill memory first."""
    parts: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_OUTPUT:
            raise TemplateError("chat template error: the rendered prompt exceeds 1 MiB")
        parts.append(chunk)
    return "".join(parts)


def build_prompt(
    chat_template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str,
    eos_token: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    enable_thinking: bool | None = None,
) -> tuple[str, list[str]]:
    """(prompt text, extra stop strings) with the model's template, or ChatML without one."""
    text = render_chat(
        chat_template or CHATML_TEMPLATE,
        messages,
        bos_token=bos_token,
        eos_token=eos_token,
        tools=tools,
        enable_thinking=enable_thinking,
    )
    # The template may write BOS itself; tokenizing adds it again when the vocab wants one.
    if bos_token and text.startswith(bos_token):
        text = text[len(bos_token) :]
    return text, [] if chat_template else [CHATML_STOP]
