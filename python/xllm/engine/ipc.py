"""The wire between xllm and its child processes: a model's runner, and the runner's render
worker (engine/render.py).

Frames are a 4-byte big-endian length and a pickle. Pickle is safe here: both ends are xllm
processes joined by a socketpair or pipes that nothing else can reach. One frame per decode step
carries every event of every request, so the per-token cost of the process boundary stays small.
"""

from __future__ import annotations

import asyncio
import ctypes
import pickle
import signal
import struct
import sys
from typing import Any, BinaryIO

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024  # a batch of embeddings can be large; anything bigger is a bug

# server -> runner
SUBMIT = "submit"  # (SUBMIT, call_id, request_id, prompt, params, frames)
CANCEL = "cancel"  # (CANCEL, request_id)
CALL = "call"  # (CALL, call_id, method, args)
CLOSE = "close"  # (CLOSE,)
# runner -> server
READY = "ready"  # (READY, ModelInfo); a render worker sends (READY,)
FAILED = "failed"  # (FAILED, message)
EVENTS = "events"  # (EVENTS, [event, ...])
REPLY = "reply"  # (REPLY, call_id, error_kind | None, value)
BEAT = "beat"  # (BEAT, stats)

# error kinds a reply may carry, mapped back to exceptions by the server
QUEUE_FULL = "queue_full"
BAD_REQUEST = "bad_request"
ENGINE = "engine"


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
