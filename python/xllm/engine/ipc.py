"""The wire between xllm and its child processes: a model's runner, and the runner's render
worker (engine/render.py).

Frames are a 4-byte big-endian length and a pickle. Pickle is safe here: both ends are xllm
processes joined by a socketpair or pipes that nothing else can reach. One frame per decode step
carries every `Delta` of every request, so the per-token cost of the process boundary stays small.

An error crosses as a `WireError`, made from the exception in the runner and raised again in the
server as the same class of `xllm.errors`, so a client sees the status, type and param it would
have seen had the model run in the server.
"""

from __future__ import annotations

import asyncio
import ctypes
import pickle
import signal
import struct
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO

from xllm import _core
from xllm.errors import BY_NAME, EngineError, InvalidRequest, Overloaded, XllmError

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024  # a batch of embeddings can be large; anything bigger is a bug

# server -> runner
SUBMIT = "submit"  # (SUBMIT, call_id, request_id, prompt, params)
CANCEL = "cancel"  # (CANCEL, request_id)
CALL = "call"  # (CALL, call_id, method, args)
CLOSE = "close"  # (CLOSE,)
# runner -> server
READY = "ready"  # (READY, ModelInfo); a render worker sends (READY,)
FAILED = "failed"  # (FAILED, message)
DELTAS = "deltas"  # (DELTAS, [Delta, ...])
REPLY = "reply"  # (REPLY, call_id, WireError | None, value)
BEAT = "beat"  # (BEAT, stats)


@dataclass(frozen=True)
class WireError:
    """An exception of the runner on its way to the server."""

    kind: str
    """The name of its class in `xllm.errors` (`BY_NAME`)."""
    message: str
    param: str | None = None


def wire_error(e: Exception) -> WireError:
    """The runner's side: what the server will raise for `e`. Beside xllm's own errors, the
    engine's built-in ones mean: ValueError a bad request, QueueFull a full queue, RuntimeError
    a failure of the engine; anything else is a bug, named by its class."""
    if isinstance(e, XllmError):
        err = e
    elif isinstance(e, _core.QueueFull):
        err = Overloaded(f"{e}; try again")
    elif isinstance(e, ValueError):
        err = InvalidRequest(str(e))
    elif isinstance(e, RuntimeError):
        err = EngineError(str(e))
    else:
        err = EngineError(f"{type(e).__name__}: {e}")
    kind = next(c.__name__ for c in type(err).__mro__ if BY_NAME.get(c.__name__) is c)
    return WireError(kind, err.message, err.param)


def exception(wire: WireError, model: str) -> XllmError:
    """The server's side: the error to raise for a runner's `wire`; a class it does not know
    is a server error. A server error's message gets the model's name (for whoever reads the
    log); a client's error is about the request and stays as it is."""
    cls = BY_NAME.get(wire.kind, XllmError)
    message = wire.message if cls.status < 500 else f"model {model!r}: {wire.message}"
    return cls(message, param=wire.param)


def encode(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def read(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message, or None at end of stream (the other side is gone)."""
    try:
        size = _size(await reader.readexactly(_HEADER.size))
        message: tuple[Any, ...] = pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None
    return message


def read_blocking(f: BinaryIO) -> tuple[Any, ...] | None:
    """`read` for a child that has nothing else to do while it waits (the render worker)."""
    header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    size = _size(header)
    body = f.read(size)
    if len(body) < size:
        return None
    message: tuple[Any, ...] = pickle.loads(body)
    return message


def _size(header: bytes) -> int:
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ConnectionError(f"frame of {size} bytes exceeds the limit")
    return int(size)


def die_with_parent() -> None:
    """A child process is killed when its parent goes, however the parent ends (Linux)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
