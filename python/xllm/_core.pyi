"""Type stub of the Rust extension `xllm._core` (checked by `mypy.stubtest xllm._core`)."""

from typing import Final

__version__: Final[str]
SSE_DONE: Final[bytes]

class StopMatcher:
    """Streaming stop-sequence matcher: releases text once it cannot start a stop string."""

    def __init__(self, stops: list[str]) -> None: ...
    def push(self, piece: bytes) -> tuple[str, bool]:
        """Feed token bytes; returns (text safe to send, stopped)."""
    def push_str(self, text: str) -> tuple[str, bool]: ...
    def flush(self) -> str:
        """End of generation: the text still held back."""
    @property
    def stopped(self) -> bool: ...

class DeltaFramer:
    """Frames one streamed token as `data: <prefix><json text><suffix>\\n\\n`."""

    def __init__(self, prefix: bytes, suffix: bytes) -> None: ...
    def frame(self, text: str) -> bytes: ...

def sse_event(data: str, event: str | None = None) -> bytes:
    """One SSE event with an optional event name."""

class GzipStream:
    """One gzip member written piece by piece; each write is flushed so nothing is held back."""

    def __init__(self, level: int = 1) -> None: ...
    def write(self, data: bytes) -> bytes: ...
    def finish(self) -> bytes:
        """The gzip trailer; later writes return nothing."""

def gzip_compress(data: bytes, level: int = 6) -> bytes:
    """gzip a whole body (runs without the GIL)."""
