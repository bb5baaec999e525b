"""The Rust extension's text tools, through Python (their invariants are tested in Rust)."""

from __future__ import annotations

import orjson

from xllm import _core


def test_delta_framer_emits_valid_json() -> None:
    f = _core.DeltaFramer(b'{"choices":[{"delta":{"content":', b"}}]}")
    for text in ['say "hi"\n', "tab\there", "\x00\x1f", "日本🙂", "\\"]:
        frame = f.frame(text)
        assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
        assert orjson.loads(frame[6:-2])["choices"][0]["delta"]["content"] == text


def test_sse_event() -> None:
    assert _core.sse_event("a\nb", "response.created") == (
        b"event: response.created\ndata: a\ndata: b\n\n"
    )
    assert _core.SSE_DONE == b"data: [DONE]\n\n"
