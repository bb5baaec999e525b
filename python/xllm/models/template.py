"""Chat templates: Hugging Face style Jinja2, rendered in an immutable sandbox.

Templates come from model files, which are untrusted: the sandbox blocks attribute tricks that
reach Python internals (CVE-2024-34359 and its relatives). Models without a template get ChatML,
the fallback llama.cpp uses too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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


@lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
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
) -> str:
    """Render `messages` into a prompt with the model's template."""
    template = _compile(source)
    try:
        return template.render(
            messages=list(messages),
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            tools=list(tools) if tools else None,
        )
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template error: unsafe operation blocked: {e}") from None
    except Exception as e:  # a template is code from a file: any failure is its error
        raise TemplateError(f"chat template error: {type(e).__name__}: {e}") from None
