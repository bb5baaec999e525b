"""Chat templates render like Hugging Face's, and hostile templates run no code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xllm.models.template import CHATML_TEMPLATE, TemplateError, render_chat

PWNED = Path("/tmp/xllm_pwned")

PAYLOADS = [
    # CVE-2024-34359 (llama-cpp-python)
    "{% for x in ().__class__.__base__.__subclasses__() %}{% if 'warning' in x.__name__ %}"
    "{{ x()._module.__builtins__['__import__']('os').popen('touch /tmp/xllm_pwned') }}"
    "{% endif %}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.popen('touch /tmp/xllm_pwned').read() }}",
    "{{ lipsum.__globals__['os'].popen('touch /tmp/xllm_pwned').read() }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch /tmp/xllm_pwned') }}",
    # CVE-2025-27516: |attr("format")
    "{{ ('{0.__class__.__init__.__globals__}' | attr('format'))(cycler) }}",
    # CVE-2024-56326: stored str.format reference
    "{% set f = '{0.__class__}'.format %}{{ f(messages) }}",
    "{{ messages.append(1) }}",
]


def test_chatml_fallback() -> None:
    out = render_chat(CHATML_TEMPLATE, [{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_features() -> None:
    src = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'bad' %}"
        "{{ raise_exception('bad role') }}{% endif %}{{ m['content'] | tojson }}{% endfor %}"
    )
    assert render_chat(src, [{"role": "user", "content": "<é>"}], bos_token="<s>") == '<s>"<é>"'
    with pytest.raises(TemplateError, match="bad role"):
        render_chat(src, [{"role": "bad", "content": ""}])


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_blocked(payload: str) -> None:
    PWNED.unlink(missing_ok=True)
    try:
        out = render_chat(payload, [{"role": "user", "content": "hi"}])
    except TemplateError:
        out = ""
    # Either refused, or rendered without reaching anything internal.
    assert "class" not in out and "globals" not in out and "module" not in out
    assert not PWNED.exists()


def test_no_child_process_spawned() -> None:
    # Audit hooks can't be removed, so watch from a child interpreter.
    code = (
        "import sys\n"
        "seen = []\n"
        "sys.addaudithook(lambda e, a: seen.append(e) if e in ('os.system', 'subprocess.Popen', 'os.exec', 'os.posix_spawn') else None)\n"
        "from xllm.models.template import render_chat\n"
        f"for p in {PAYLOADS!r}:\n"
        "    try: render_chat(p, [{'role': 'user', 'content': 'x'}])\n"
        "    except Exception: pass\n"
        "print(len(seen))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ
    )
    assert out.stdout.strip() == "0", out.stderr
