"""The wire between the server and a model's runner process.

Frames are a 4-byte big-endian length and a pickle. Pickle is safe here: both ends are xllm
processes joined by a socketpair that nothing else can reach. One frame per decode step carries
every event of every request, so the per-token cost of the process boundary stays small.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024  # a batch of embeddings can be large; anything bigger is a bug

# server -> runner
SUBMIT = "submit"  # (SUBMIT, call_id, request_id, prompt, params, frames)
CANCEL = "cancel"  # (CANCEL, request_id)
CALL = "call"  # (CALL, call_id, method, args)
CLOSE = "close"  # (CLOSE,)
# runner -> server
READY = "ready"  # (READY, ModelInfo)
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
        header = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ConnectionError(f"runner frame of {size} bytes exceeds the limit")
        message: tuple[Any, ...] = pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None
    return message
