"""The Rust extension's text tools, through Python (their invariants are tested in Rust)."""

from __future__ import annotations

import orjson
import pytest

from xllm import _core


@pytest.mark.parametrize(
    ("stops", "pieces", "text", "stopped"),
    [
        (["</s>"], [b"abc</", b"s>tail"], "abc", True),
        (["\n\nUser:"], [b"ok\n", b"\nUs", b"er: x"], "ok", True),
        (["STOP"], [b"a ST", b"OP"], "a ", True),
        (["STOP"], [b"a ST", b"ART"], "a START", False),
        (["終"], ["日本".encode()[:4], "日本".encode()[4:] + "終".encode()], "日本", True),
        ([], [b"\xe6\x97", b"\xa5"], "日", False),
    ],
)
def test_stop_matcher(stops: list[str], pieces: list[bytes], text: str, stopped: bool) -> None:
    m = _core.StopMatcher(stops)
    out = ""
    for p in pieces:
        t, s = m.push(p)
        out += t
        if s:
            break
    if not m.stopped:
        out += m.flush()
    assert (out, m.stopped) == (text, stopped)


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
