"""`Delta`, the typed event of the engine seam: its constructor, its trip through the runner's
IPC, and what the Rust loop puts in it for a real model."""

from __future__ import annotations

import io
import select
import socket
from pathlib import Path
from typing import Any

import pytest

from xllm import _core
from xllm._core import Delta
from xllm.engine import ipc
from xllm.engine.llamacpp import LlamaCppEngine
from xllm.engine.options import EngineOptions
from xllm.errors import Overloaded


def test_defaults() -> None:
    d = Delta(7, 1, "hi")
    assert (d.request, d.choice, d.text, d.tokens) == (7, 1, "hi", [])
    assert (d.logprobs, d.tool_calls, d.finish, d.usage, d.error) == (None,) * 5
    assert Delta().text == ""
    assert repr(d) == "Delta(request=7, choice=1, text='hi')"


def test_fields_are_read_only() -> None:
    with pytest.raises(AttributeError):
        Delta().text = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"finish": "tool_calls"}, 'finish "tool_calls" is none of'),
        ({"choice": -2, "finish": "error"}, "choice -2 is below -1"),
        ({"choice": -1}, "choice -1 is only for a finishing delta"),
    ],
)
def test_refuses_what_no_consumer_understands(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Delta(1, **kwargs)


def test_crosses_the_runner_wire_whole() -> None:
    """Every field survives the IPC framing (pickle), an error object included."""
    logprobs = [("a", -0.5, b"a", [("a", -0.5, b"a"), ("b", -1.5, b"b")])]
    deltas = [
        Delta(3, 0, "a", tokens=[64], logprobs=logprobs),
        Delta(3, 1, tool_calls=[{"index": 0, "function": {"name": "f"}}]),
        Delta(3, 0, finish="stop", usage={"prompt_tokens": 4, "ttft_ms": 1.5}),
        Delta(3, -1, finish="error", error=Overloaded("shutting down")),
    ]
    frame = ipc.encode((ipc.DELTAS, deltas))
    message = ipc.read_blocking(io.BytesIO(frame))
    assert message is not None and message[0] == ipc.DELTAS
    got = message[1]
    assert [repr(d) for d in got[:3]] == [repr(d) for d in deltas[:3]]
    err = got[3].error
    assert isinstance(err, Overloaded) and err.message == "shutting down"
    assert (got[3].choice, got[3].finish) == (-1, "error")


def _run(engine: LlamaCppEngine, rid: int, params: dict[str, Any]) -> list[Delta]:
    engine.submit(rid, engine.tokenize("def fibonacci(n):", True, True), params)
    deltas: list[Delta] = []
    while not any(d.finish for d in deltas):
        select.select([engine.fileno()], [], [], 30.0)
        deltas += engine.poll()
    return deltas


def test_the_rust_loop_reports_every_generated_token(tiny_path: Path) -> None:
    """Token ids come with their text; a stop string's tokens are reported though its text
    never goes out."""
    engine = LlamaCppEngine(tiny_path, EngineOptions(ctx_size=256, parallel=1, threads=1))
    try:
        greedy = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
        deltas = _run(engine, 1, greedy)
        tokens = [t for d in deltas for t in d.tokens]
        text = "".join(d.text for d in deltas)
        last = deltas[-1]
        assert last.finish == "length" and last.usage is not None and last.error is None
        assert len(tokens) == last.usage["completion_tokens"] == 12
        assert engine.detokenize(tokens) == text
        # the same generation, stopped at a piece of it
        stop = text[len(text) // 2 :][:3]
        deltas = _run(engine, 2, {**greedy, "stop": [stop]})
        cut = "".join(d.text for d in deltas)
        stopped = [t for d in deltas for t in d.tokens]
        assert deltas[-1].finish == "stop" and cut == text[: text.index(stop)]
        assert stopped == tokens[: len(stopped)]
        assert engine.detokenize(stopped).startswith(cut + stop)
        assert len(stopped) == deltas[-1].usage["completion_tokens"]  # type: ignore[index]
    finally:
        engine.close()


def test_the_rust_loop_sends_deltas_to_the_server_itself(tiny_path: Path) -> None:
    """In a runner the loop writes its deltas to a socket (`send_to`) and the server reads them
    (`read_deltas`): the same deltas `poll()` gives, logprobs and the finish included, then
    None once the loop's end is closed."""
    options = EngineOptions(ctx_size=256, parallel=1, threads=1)
    params = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True, "logprobs": 2}
    polled = LlamaCppEngine(tiny_path, options)
    try:
        expected = _run(polled, 1, params)
    finally:
        polled.close()
    server, runner = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.setblocking(False)
    engine = LlamaCppEngine(tiny_path, options)
    engine.send_to(runner.fileno())
    runner.close()  # the engine keeps its own copy
    try:
        engine.submit(1, engine.tokenize("def fibonacci(n):", True, True), params)
        got: list[Delta] = []
        while not any(d.finish for d in got):
            select.select([server], [], [], 30.0)
            got += _core.read_deltas(server.fileno()) or []
        assert engine.poll() == []
        assert [_fields(d) for d in got] == [_fields(d) for d in expected]
        assert any(d.logprobs for d in got)
    finally:
        engine.close()
    select.select([server], [], [], 30.0)
    assert _core.read_deltas(server.fileno()) is None
    server.close()


def _fields(d: Delta) -> tuple[Any, ...]:
    """What a delta says, its timings apart."""
    usage = {k: v for k, v in (d.usage or {}).items() if not k.endswith("_ms")}
    return (d.request, d.choice, d.text, d.tokens, d.logprobs, d.finish, usage, d.error)
