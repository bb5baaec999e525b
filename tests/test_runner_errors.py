"""Errors raised in a model's runner reach the client as they would from the server itself:
the same class, status, type, code and param.

Each case raises an exception in the runner's real request handlers (`runner._call`,
`runner._submit`) over a stand-in engine, sends the reply through the real IPC framing, and
takes it from the server's real `RunnerClient`, as a handler would.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from xllm import _core
from xllm.engine import ipc, runner
from xllm.engine.llama import Generation, RunnerClient
from xllm.engine.options import EngineOptions
from xllm.errors import EngineError, InsufficientMemory, InvalidRequest, Overloaded, XllmError
from xllm.models.gguf import GGUFError
from xllm.models.metadata import ModelInfo
from xllm.models.template import TemplateError
from xllm.server import pump

MODEL = "m:latest"


class _Engine:
    """The runner's engine, failing every request with `error` (None: never answering)."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def tokenize(self, *args: Any) -> list[int]:
        assert self.error is not None
        raise self.error

    def submit(self, *args: Any) -> None:
        assert self.error is not None
        raise self.error


class _Proc:
    """The runner process as `RunnerClient` sees it: it ends when the stand-in runner does;
    `kill()` closes its end of the socket at once, as the death of a process does."""

    pid = 0

    def __init__(self) -> None:
        self.ended = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self.code = 0

    async def wait(self) -> int:
        await self.ended.wait()
        return self.code

    def kill(self) -> None:
        self.die(-signal.SIGKILL)

    def die(self, code: int) -> None:
        """End as a process does with exit status `code` (-N: killed by signal N)."""
        assert self.writer is not None
        self.code = code
        self.writer.transport.abort()
        self.ended.set()


async def _runner(sock: socket.socket, engine: _Engine, proc: _Proc) -> None:
    """The runner's dispatch (engine/runner.py `_serve`) over a stand-in engine."""
    reader, writer = await asyncio.open_connection(sock=sock)
    proc.writer = writer
    while (msg := await ipc.read(reader)) is not None and msg[0] != ipc.CLOSE:
        if engine.error is None:
            continue
        if msg[0] == ipc.CALL:
            await runner._call(engine, None, None, writer, *msg[1:4])  # type: ignore[arg-type]
        elif msg[0] == ipc.SUBMIT:
            _, cid, rid, prompt, params = msg
            writer.write(ipc.encode(runner._submit(engine, cid, rid, prompt, params)))
    writer.close()
    proc.ended.set()


@contextlib.asynccontextmanager
async def _model(error: Exception | None) -> AsyncIterator[RunnerClient]:
    server_end, runner_end = socket.socketpair()
    proc = _Proc()
    task = asyncio.create_task(_runner(runner_end, _Engine(error), proc))
    reader, writer = await asyncio.open_connection(sock=server_end)
    deltas, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    info = ModelInfo(MODEL, Path("/m.gguf"), "llama", 512, 8, 1, 1, 1, "F32", None)
    model = RunnerClient(
        MODEL, Path("/m.gguf"), EngineOptions(ctx_size=512), info, proc,  # type: ignore[arg-type]
        reader, writer, deltas, None, collections.deque(), asyncio.create_task(asyncio.sleep(0)),
    )  # fmt: skip
    try:
        yield model
    finally:
        await model.close()
        await task


Call = Callable[[RunnerClient], Awaitable[Any]]


def _tokenize(model: RunnerClient) -> Awaitable[Any]:
    return model.tokenize("hello", special=True)


def _start(model: RunnerClient) -> Awaitable[Any]:
    return model.start([1, 2, 3], {"max_tokens": 1})


# raised in the runner, the server's call -> class, status, OpenAI type, code, param, message
M = "model 'm:latest': "
CASES: list[tuple[Exception, Call, type[XllmError], int, str, str | None, str | None, str]] = [
    (TemplateError("chat template error: no system role"), _tokenize, InvalidRequest, 400, "invalid_request_error", None, None, "chat template error: no system role"),
    (InvalidRequest("tools[0]: no name", param="tools"), _tokenize, InvalidRequest, 400, "invalid_request_error", None, "tools", "tools[0]: no name"),
    (GGUFError("not a GGUF file"), _tokenize, InvalidRequest, 400, "invalid_request_error", None, None, "not a GGUF file"),
    (ValueError("the prompt is 600 tokens, the context holds 512"), _start, InvalidRequest, 400, "invalid_request_error", None, None, "the prompt is 600 tokens, the context holds 512"),
    (ValueError("input 0 is empty"), _tokenize, InvalidRequest, 400, "invalid_request_error", None, None, "input 0 is empty"),
    (_core.QueueFull("1000 requests are already waiting"), _start, Overloaded, 503, "server_error", "overloaded", None, M + "1000 requests are already waiting; try again"),
    (RuntimeError("llama_decode failed: -3"), _start, EngineError, 500, "server_error", "engine_error", None, M + "llama_decode failed: -3"),
    (RuntimeError("llama.cpp could not create an embeddings context"), _tokenize, EngineError, 500, "server_error", "engine_error", None, M + "llama.cpp could not create an embeddings context"),
    (EngineError("the engine is closed"), _tokenize, EngineError, 500, "server_error", "engine_error", None, M + "the engine is closed"),
    (InsufficientMemory("no memory for an embeddings context"), _tokenize, InsufficientMemory, 507, "server_error", "insufficient_memory", None, M + "no memory for an embeddings context"),
    (TypeError("unsupported operand"), _tokenize, EngineError, 500, "server_error", "engine_error", None, M + "TypeError: unsupported operand"),
    (KeyError("messages"), _start, EngineError, 500, "server_error", "engine_error", None, M + "KeyError: 'messages'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raised", "call", "cls", "status", "kind", "code", "param", "message"),
    CASES,
    ids=[f"{type(c[0]).__name__}-{c[1].__name__}" for c in CASES],
)
async def test_runner_errors_keep_their_identity(
    raised: Exception,
    call: Call,
    cls: type[XllmError],
    status: int,
    kind: str,
    code: str | None,
    param: str | None,
    message: str,
) -> None:
    async with _model(raised) as model:
        with pytest.raises(XllmError) as caught:
            async with asyncio.timeout(5):  # an unanswered call would hang the request
                await call(model)
    err = caught.value
    assert type(err) is cls and err.status == status
    assert err.openai_body() == {
        "error": {"message": message, "type": kind, "param": param, "code": code}
    }
    assert err.ollama_body() == {"error": message}


@pytest.mark.parametrize(
    ("wire", "cls", "status", "message"),
    [
        (ipc.WireError("InvalidRequest", "bad", "tools"), InvalidRequest, 400, "bad"),
        (ipc.WireError("Overloaded", "full"), Overloaded, 503, "model 'm': full"),
        (ipc.WireError("SystemExit", "x"), XllmError, 500, "model 'm': x"),  # not an error class
        (ipc.WireError("GGUFError", "x"), XllmError, 500, "model 'm': x"),  # not from errors.py
        (ipc.WireError("NoSuchError", "x", "p"), XllmError, 500, "model 'm': x"),
    ],
)
def test_only_known_classes_cross(
    wire: ipc.WireError, cls: type[XllmError], status: int, message: str
) -> None:
    err = ipc.exception(wire, "m")
    assert type(err) is cls and err.status == status and err.message == message
    assert err.param == wire.param


async def test_a_dead_runner_fails_calls_without_its_log(caplog: pytest.LogCaptureFixture) -> None:
    """The runner's last output (llama.cpp's log) is for the server's log, not the client."""
    async with _model(None) as model:
        model._stderr_tail.append("sched_reserve: CPU compute buffer size = 1.50 MiB")
        pending = asyncio.create_task(_tokenize(model))
        await asyncio.sleep(0.05)
        model._proc.kill()
        with pytest.raises(EngineError) as caught:
            async with asyncio.timeout(5):
                await pending
    assert caught.value.status == 500
    assert caught.value.message == (
        f"the runner process for model {MODEL!r} was killed by SIGKILL; the request was aborted"
    )
    assert "sched_reserve: CPU compute buffer size" in caplog.text


async def test_a_runner_killed_by_sigill_says_to_rebuild_its_engine() -> None:
    """SIGILL: llama.cpp built for another CPU, or its AMX kernels in a VM that advertises AMX."""
    async with _model(None) as model:
        pending = asyncio.create_task(_tokenize(model))
        await asyncio.sleep(0.05)
        cast(_Proc, model._proc).die(-signal.SIGILL)
        with pytest.raises(EngineError) as caught:
            async with asyncio.timeout(5):
                await pending
    assert "was killed by SIGILL (an instruction this CPU does not run" in caught.value.message
    assert "without AMX" in caught.value.message


def _running(model: RunnerClient, rid: int, n: int) -> Generation:
    """A generation the runner has accepted (the stand-in runner answers no submission)."""
    gen = Generation(model, rid, n)
    model._queues[rid] = gen.inbox
    return gen


async def test_a_dead_runner_ends_running_generations_with_its_reason() -> None:
    async with _model(None) as model:
        gen = _running(model, 7, 2)
        await asyncio.sleep(0.05)  # the stand-in runner is up
        model._proc.kill()
        with pytest.raises(EngineError) as caught:
            async with asyncio.timeout(5):
                await pump.collect(gen, None)
    assert caught.value.message == (
        f"generation failed: the runner process for model {MODEL!r} was killed by SIGKILL; "
        "the request was aborted"
    )


async def test_abort_ends_every_choice_with_the_servers_error() -> None:
    async with _model(None) as model:
        gen = _running(model, 7, 2)
        model.abort("the server is shutting down")
        batches = [b async for b in gen.deltas()]
        assert [(d.request, d.choice, d.finish) for b in batches for d in b] == [(7, -1, "error")]
        error = batches[0][0].error
        assert isinstance(error, Overloaded) and error.message == "the server is shutting down"
        with pytest.raises(Overloaded):
            await model.start([1], {})
